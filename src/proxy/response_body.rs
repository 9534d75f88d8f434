//! The response on its way back: hop-by-hop headers dropped, and Tallyfy's
//! absolute links in JSON bodies pointed at the proxy so callers stay on it.

use bytes::Bytes;
use http::header::{ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, LOCATION, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::{Proxy, ProxyBody};
use crate::body::{self, ChunkStart, Decoded, Encoding, Kind, Prefixed, Unread};
use crate::error::ProxyError;
use crate::headers;
use crate::links::LinkRewriter;
use crate::upstream::UpstreamBody;

impl Proxy {
    /// Where this caller's links should point, decided while its head is at hand:
    /// `listen.public_url`, else the request's `Host` (or HTTP/2 authority),
    /// which [`crate::target::host`] has checked is a plain `host[:port]`. No
    /// string is built until a link is actually rewritten.
    /// `unprefixed`: the caller left out `/api`, so its links do too.
    /// A caller that named no host (HTTP/1.0 without `Host`, HTTP/2 without
    /// `:authority`) is pointed at the address it reached, `local`, as nginx
    /// falls back to its own name: never left with Tallyfy's links.
    pub(super) fn links_to(
        &self,
        head: &http::request::Parts,
        host: Option<&str>,
        local: std::net::SocketAddr,
        unprefixed: bool,
    ) -> LinksTo {
        let shared = &*self.shared;
        let base = if !shared.links.enabled {
            Base::Nowhere
        } else if shared.public_url.is_some() {
            Base::PublicUrl
        } else if host.is_none() {
            Base::Local(local)
        } else if head.version >= http::Version::HTTP_2
            && let Some(authority) = head.uri.authority()
        {
            Base::Authority(authority.clone())
        } else {
            head.headers.get(http::header::HOST).map_or(Base::Nowhere, |value| Base::Host(value.clone()))
        };
        LinksTo { base, unprefixed, head_request: head.method == http::Method::HEAD }
    }

    fn public_base(&self, to: &LinksTo) -> Option<String> {
        let shared = &*self.shared;
        let host = match &to.base {
            Base::Nowhere => return None,
            Base::PublicUrl => return shared.public_url.clone(),
            Base::Host(value) => value.to_str().ok()?,
            Base::Authority(authority) => authority.as_str(),
            Base::Local(local) => return Some(local_base(shared.listener_scheme, *local)),
        };
        Some(format!("{}://{host}", shared.listener_scheme))
    }

    /// Cleans the response and, for JSON bodies that carry upstream links,
    /// rewrites them. Bodies larger than `links.max_body_bytes`, other types and
    /// unknown encodings stream through untouched.
    pub(super) async fn response(
        &self,
        mut response: Response<UpstreamBody>,
        links_to: &LinksTo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let shared = &*self.shared;
        // (Its framing was checked as it came: [`refuse_unframeable`].)
        headers::to_caller(response.headers_mut());
        // Looked at only where a `Location` means something to follow (no
        // lookup on a plain 200).
        let status = response.status();
        if status.is_redirection() || status == StatusCode::CREATED {
            self.location_to_proxy(response.headers_mut(), links_to);
        }
        let headers = response.headers();
        let encoding = body::encoding(headers);
        // The one length the head reader left (it restates a repeated one).
        let declared = headers::single_length(headers);
        // A part of a body (206) is never rewritten: its `Content-Range`
        // counts Tallyfy's bytes, and a link may straddle its ends.
        let whole = !matches!(
            response.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
        );
        let read_for_links = !matches!(links_to.base, Base::Nowhere)
            && whole
            && body::kind(headers) == Some(Kind::Json)
            && encoding.is_some()
            && declared.is_none_or(|n| n <= shared.links.max_body_bytes);
        if links_to.head_request && read_for_links {
            // The `GET`'s body may be rewritten: like nginx's body filters, the
            // `HEAD` answer then names no length and describes no bytes.
            let headers = response.headers_mut();
            headers.remove(CONTENT_LENGTH);
            drop_byte_promises(headers);
        } else if status == StatusCode::NOT_MODIFIED && !matches!(links_to.base, Base::Nowhere) {
            // Its `ETag` may stand for a body sent rewritten, with a weak one.
            weaken_etag(response.headers_mut());
        }
        let encoding = match encoding {
            Some(encoding) if read_for_links && !links_to.head_request => encoding,
            _ => return Ok(response.map(|body| Either::Left(Prefixed::new(None, body)))),
        };
        let (mut parts, body) = response.into_parts();
        let limit = shared.upstream.request_timeout();
        let budget = shared.limits.buffer_budget;
        // A body that stops for the request timeout is a 504 (nothing of it
        // sent yet); one still coming after that long streams on as it is
        // (Tallyfy's answer is never lost, or held back, for being slow).
        let start =
            body::read_chunks(body, shared.links.max_body_bytes, budget, limit).await.map_err(|unread| {
                match unread {
                    Unread::Quiet => ProxyError::UpstreamTimeout(limit),
                    Unread::Failed(e) => {
                        ProxyError::UpstreamBroken(format!("reading the response body: {e}"))
                    }
                }
            })?;
        let (chunks, ended) = match start {
            // Too large to hold, or still coming after the request timeout:
            // it streams on as it is, links unrewritten.
            ChunkStart::Over(chunks, rest) | ChunkStart::Late(chunks, rest) => {
                return Ok(Response::from_parts(parts, Either::Left(Prefixed::chunks(chunks, rest))));
            }
            // No room to hold it: it streams as it is, links unrewritten, as
            // one too large would (the answer is never lost for it).
            ChunkStart::Unbudgeted(chunks, rest) => {
                shared.metrics.buffers_full.inc();
                return Ok(Response::from_parts(parts, Either::Left(Prefixed::chunks(chunks, rest))));
            }
            ChunkStart::Complete(chunks, ended) => (chunks, ended),
        };
        // The common case: no upstream link can be in it. The chunks go out as
        // they came, uncopied, with the length of the bytes sent. (A body short
        // of its length fails as it is read: the upstream body holds it to it.)
        if encoding == Encoding::Identity && !shared.link_scan.may_need_rewrite_chunks(&chunks) {
            let total: usize = chunks.iter().map(Bytes::len).sum();
            // Tallyfy's own length is kept when it is exactly that (a new header
            // value would cost an allocation on every request).
            if declared != Some(total as u64) {
                parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(total));
            }
            return Ok(Response::from_parts(parts, Either::Left(Prefixed::chunks(chunks, ended))));
        }
        let bytes = match chunks.len() {
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => body::held_forced(budget, Bytes::from(chunks.concat())),
        };
        let Some(public_base) = self.public_base(links_to) else {
            return Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))));
        };
        let rewriter = LinkRewriter::new(&shared.upstream_base, &public_base, !links_to.unprefixed);
        let decoded = match body::decode(&bytes, encoding, shared.links.max_body_bytes) {
            Decoded::Whole(decoded) => Some(decoded),
            Decoded::TooLarge(_) | Decoded::Corrupt(_) => None,
        };
        let rewritten = decoded
            .filter(|decoded| rewriter.may_need_rewrite(decoded))
            .and_then(|decoded| rewriter.rewrite_json(&decoded).ok())
            .and_then(|rewrite| rewrite.body.map(|body| (body, rewrite.links_rewritten)));
        let body = match rewritten {
            None => bytes,
            Some((body, count)) => {
                shared.metrics.links_rewritten.inc_by(count as u64);
                describe_rewritten(&mut parts.headers);
                body::held_forced(budget, Bytes::from(body))
            }
        };
        // A body the proxy re-frames is described by the bytes it sends, never
        // by a length Tallyfy declared.
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
    }

    /// A `Location` that points into Tallyfy's API (`{upstream_base}/api/...`)
    /// is pointed at the proxy, as the body's links are: a caller that follows
    /// a redirect stays on the proxy instead of taking its own credential
    /// (an `X-Api-Key` a client keeps across hosts) to Tallyfy. Other
    /// locations (a file's storage URL) are left as they are.
    fn location_to_proxy(&self, headers: &mut http::HeaderMap, to: &LinksTo) {
        let Some(location) = headers.get(LOCATION) else { return };
        let Some(rest) = self.shared.api_location.rest(location.as_bytes()) else { return };
        let Some(public_base) = self.public_base(to) else { return };
        let mut pointed = public_base.trim_end_matches('/').as_bytes().to_vec();
        pointed.extend_from_slice(if to.unprefixed { b"/" } else { b"/api/" });
        pointed.extend_from_slice(rest);
        if let Ok(value) = HeaderValue::from_bytes(&pointed) {
            headers.insert(LOCATION, value);
        }
    }
}

/// `scheme://address` for a caller that named no host. An IPv4 caller on a
/// dual-stack socket reached `::ffff:a.b.c.d`: written as the IPv4 address it
/// dialled. A link-local scope (`%2`) is no part of a URL's host: left out.
fn local_base(scheme: &str, local: std::net::SocketAddr) -> String {
    let local = std::net::SocketAddr::new(local.ip().to_canonical(), local.port());
    format!("{scheme}://{local}")
}

/// A rewritten body is sent decoded, and is not the bytes Tallyfy's fields
/// promise ([`drop_byte_promises`]).
fn describe_rewritten(headers: &mut HeaderMap) {
    headers.remove(CONTENT_ENCODING);
    drop_byte_promises(headers);
}

/// Drops what promises Tallyfy's very bytes: a strong `ETag` becomes weak, as
/// nginx's body filters make it, and `Accept-Ranges` and the digests go, since
/// a range or a digest of Tallyfy's bytes would splice or check the wrong ones.
fn drop_byte_promises(headers: &mut HeaderMap) {
    headers.remove(ACCEPT_RANGES);
    for digest in ["content-md5", "digest", "content-digest", "repr-digest"] {
        headers.remove(digest);
    }
    weaken_etag(headers);
}

/// A strong `ETag` made weak (`"v1"` becomes `W/"v1"`); a weak or malformed
/// one is left as it is. Weak comparison (`If-None-Match`, a cache's update
/// on `304`) still matches it with Tallyfy's.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(ETAG)
        && etag.as_bytes().starts_with(b"\"")
        && let Ok(weak) = HeaderValue::from_bytes(&[b"W/", etag.as_bytes()].concat())
    {
        headers.insert(ETAG, weak);
    }
}

/// Responses the proxy cannot pass on safely (502), checked on every answer as
/// it comes ([`Proxy::send_once`]): one declaring both `Content-Length` and `Transfer-Encoding`, whose length an intermediary must
/// not forward (RFC 9112 §6.3) and which nginx and Envoy refuse too; and a
/// `101 Switching Protocols`, since the proxy does not tunnel upgrades.
pub(super) fn refuse_unframeable(response: &Response<UpstreamBody>) -> Result<(), ProxyError> {
    let headers = response.headers();
    if headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH) {
        return Err(ProxyError::UpstreamBroken(
            "Tallyfy's response declared both Content-Length and Transfer-Encoding".to_owned(),
        ));
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProxyError::UpstreamBroken(
            "Tallyfy answered 101 Switching Protocols; the proxy does not tunnel upgrades".to_owned(),
        ));
    }
    Ok(())
}

/// Where a caller's links should point (see [`Proxy::links_to`]), and in which
/// style: `/api/...` as Tallyfy writes them, or without `/api` when the caller
/// sent its request so.
pub(super) struct LinksTo {
    base: Base,
    unprefixed: bool,
    /// A `HEAD`: its answer has no body to rewrite (and names no length where
    /// the `GET`'s body would be read for links), but its `Location` is
    /// pointed at the proxy all the same.
    head_request: bool,
}

enum Base {
    /// Links are off.
    Nowhere,
    /// The caller named no host: the address it reached.
    Local(std::net::SocketAddr),
    /// `listen.public_url`.
    PublicUrl,
    /// The request's `Host`.
    Host(HeaderValue),
    /// The HTTP/2 `:authority`.
    Authority(http::uri::Authority),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_naming_no_host_is_pointed_at_the_address_it_dialled() {
        let base = |addr: &str| local_base("http", addr.parse().expect("address"));
        assert_eq!(base("10.0.0.5:8080"), "http://10.0.0.5:8080");
        assert_eq!(base("[::ffff:127.0.0.1]:8080"), "http://127.0.0.1:8080", "IPv4 on a dual-stack socket");
        assert_eq!(base("[fe80::1%2]:8080"), "http://[fe80::1]:8080", "no scope in a URL");
        assert_eq!(base("[2001:db8::1]:443"), "http://[2001:db8::1]:443");
    }
}
