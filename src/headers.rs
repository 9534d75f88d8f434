//! Header hygiene, both directions. Pure functions over `HeaderMap`s.
//!
//! Upstream requests lose hop-by-hop headers (RFC 9110 §7.6.1, including every
//! name listed in `Connection` but the proxy's `X-Request-Id`), the caller's own
//! credentials and `Host`, the headers a framework behind Tallyfy's edge could
//! trust for routing or addressing (`UNTRUSTED`), `Proxy` and every `Proxy-*`
//! name, and every name holding anything but letters, digits and `-`; they gain
//! the Tallyfy bearer token, `X-Tallyfy-Client` and, when absent,
//! `Accept: application/json`. Everything else passes as sent.

use http::header::{ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, COOKIE, PROXY_AUTHORIZATION};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::ProxyError;

pub const X_TALLYFY_CLIENT: HeaderName = HeaderName::from_static("x-tallyfy-client");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Connection-scoped headers that a proxy must not forward. `hop_by_hop`
/// matches them by name; this list is what its test checks.
#[cfg(test)]
const HOP_BY_HOP: [HeaderName; 9] = {
    use http::header::{PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    [
        CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
    ]
};

/// Credentials a caller may present to the proxy; none of them goes upstream.
pub const CALLER_CREDENTIALS: [HeaderName; 4] = [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, X_API_KEY];

/// Caller headers that Laravel (and the proxies in front of it) read as facts
/// about the request rather than as data: the method overrides would turn a
/// policy-checked `POST` into a `DELETE`; the `X-Forwarded-*` family,
/// `Forwarded` and `X-Real-IP` would let an app claim another client address,
/// host or scheme; `X-Original-URL` and `X-Rewrite-URL` make some stacks route
/// by a path the proxy never checked. The proxy adds none of them itself.
/// [`not_forwarded`] matches them by name; this list is what its test checks.
#[cfg(test)]
const UNTRUSTED: [HeaderName; 13] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-upstream-request-id"),
];

/// Tallyfy's own request id, returned to the caller under this name (the
/// caller's `X-Request-Id` is the proxy's).
pub const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Marks the caller's credential headers sensitive, so that no `Debug` of the
/// request (in a log line, a panic message) can show them. One pass over the
/// headers sent (a few), not a lookup per credential name.
pub fn mark_sensitive(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if CALLER_CREDENTIALS.contains(name) {
            value.set_sensitive(true);
        }
    }
}

/// Removes the headers whose names `dropped` picks, and those a `Connection`
/// header lists (hop-by-hop by declaration) except `spared`, in one pass over
/// the names present.
fn remove_named(headers: &mut HeaderMap, dropped: impl Fn(&str) -> bool, spared: Option<&HeaderName>) {
    let mut connection = false;
    let mut names: smallvec::SmallVec<[HeaderName; 8]> = headers
        .keys()
        .filter(|name| {
            connection |= *name == CONNECTION;
            dropped(name.as_str())
        })
        .cloned()
        .collect();
    if connection {
        names.extend(connection_listed(headers).filter(|name| Some(name) != spared));
    }
    for name in names {
        headers.remove(name);
    }
}

/// Whether a header is connection-scoped (RFC 9110 §7.6.1): `Connection`,
/// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`,
/// `Upgrade`, `Proxy-Authenticate`, `Proxy-Authorization`.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// Turns the caller's headers into the upstream request's headers, in one pass
/// over the names the caller sent.
pub fn to_upstream(headers: &mut HeaderMap, authorization: Option<HeaderValue>, client_header: &HeaderValue) {
    // The request id is the proxy's own, set before the caller's headers are
    // cleaned: no `Connection` list of the caller's removes it.
    remove_named(headers, not_forwarded, Some(&X_REQUEST_ID));
    if let Some(authorization) = authorization {
        debug_assert!(authorization.is_sensitive(), "tokens are stored as sensitive values");
        headers.insert(AUTHORIZATION, authorization);
    }
    headers.insert(X_TALLYFY_CLIENT, client_header.clone());
    if !headers.contains_key(ACCEPT) {
        headers.insert(ACCEPT, APPLICATION_JSON);
    }
    narrow_accept_encoding(headers);
}

/// Leaves in `Accept-Encoding` only the codings the proxy can undo (`gzip`,
/// `deflate`, `identity`), with their weights; `identity` when none is left.
/// A body Tallyfy codes otherwise (`br`, `zstd`) could not be read: its dates
/// and links would pass unrewritten, and a 429's `RATE_LIMIT_EXCEEDED` would go
/// unseen (an org's hourly cap taken for the whole credential's throttle).
fn narrow_accept_encoding(headers: &mut HeaderMap) {
    let undone = |item: &[u8]| {
        let coding = item.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
        [&b"gzip"[..], b"x-gzip", b"deflate", b"identity"]
            .iter()
            .any(|known| coding.eq_ignore_ascii_case(known))
    };
    let mut values = headers.get_all(ACCEPT_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => return,
        // The common case, one value holding only such codings: nothing to change.
        (Some(only), None)
            if only
                .as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .all(|item| item.is_empty() || undone(item)) =>
        {
            return;
        }
        _ => {}
    }
    let items = || {
        headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|item| !item.is_empty())
    };
    let kept: Vec<&[u8]> = items().filter(|item| undone(item)).collect();
    let narrowed = if kept.is_empty() { b"identity".to_vec() } else { kept.join(&b", "[..]) };
    let narrowed = HeaderValue::from_bytes(&narrowed).unwrap_or(HeaderValue::from_static("identity"));
    headers.insert(ACCEPT_ENCODING, narrowed);
}

/// Whether a caller header never goes upstream: hop-by-hop ones, the caller's
/// credentials, `Host` (the client writes the upstream's), the `UNTRUSTED`
/// claims, `Proxy` and every `Proxy-*` name (PHP behind FastCGI reads a
/// `Proxy` header as its `HTTP_PROXY` setting, the "httpoxy" hole, and a
/// caller's `Proxy-*` fields speak to proxies, not to Tallyfy), and every name
/// holding anything but letters, digits and `-`, as
/// nginx drops them (`ignore_invalid_headers`): PHP folds `-`, `_` and `.`
/// alike into its server variables, so `X_Api_Key` or `X-HTTP-Method.Override`
/// would alias headers the proxy controls or drops.
fn not_forwarded(name: &str) -> bool {
    hop_by_hop(name)
        || matches!(
            name,
            "authorization"
                | "cookie"
                | "x-api-key"
                | "host"
                | "x-http-method-override"
                | "x-http-method"
                | "x-method-override"
                | "x-forwarded-for"
                | "x-forwarded-host"
                | "x-forwarded-proto"
                | "x-forwarded-port"
                | "x-forwarded-prefix"
                | "forwarded"
                | "x-real-ip"
                | "x-original-url"
                | "x-rewrite-url"
                | "x-upstream-request-id"
                | "proxy"
        )
        || name.starts_with("proxy-")
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The names a `Connection` header lists (hop-by-hop by declaration). Read as
/// bytes: a value holding a byte above 0x7F (which hyper accepts) still lists
/// the names beside it.
fn connection_listed(headers: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        // Most listed names (`keep-alive`, `close`) name no field of this head:
        // looked up first, so no name is built (and allocated) for them.
        .filter(|name| std::str::from_utf8(name).is_ok_and(|name| headers.contains_key(name)))
        .filter_map(|name| HeaderName::from_bytes(name).ok())
}

/// Turns the upstream response's headers into the caller's: hop-by-hop headers
/// dropped, fields that speak for Tallyfy's origin dropped (`Set-Cookie`: a
/// session minted for the proxy's token, usable straight at Tallyfy as that
/// token's user, whatever the caller's policy, and useless through the proxy,
/// which never forwards a `Cookie`; `Alt-Svc`: an alternative service for the
/// proxy's origin), and Tallyfy's own `X-Request-Id` moved to
/// `X-Upstream-Request-Id` (the caller's `X-Request-Id` is set by the pipeline).
pub fn to_caller(headers: &mut HeaderMap) {
    // In the one pass over the names present: no lookup per dropped name.
    remove_named(headers, |name| hop_by_hop(name) || matches!(name, "set-cookie" | "alt-svc"), None);
    if let Some(upstream_id) = headers.remove(X_REQUEST_ID) {
        headers.insert(X_UPSTREAM_REQUEST_ID, upstream_id);
    }
}

/// Checks the caller's fields: the count and size limits (a JSON 431), and no
/// value starting or ending with white space (400). HTTP/1 parsing leaves that
/// white space out; an HTTP/2 value that holds it is malformed (RFC 9113
/// §8.2.1), and a server in front of Tallyfy would trim what the proxy judged
/// untrimmed (a `Content-Type` of ` application/x-www-form-urlencoded`).
pub fn check_fields(headers: &HeaderMap, max_headers: usize, max_bytes: usize) -> Result<(), ProxyError> {
    if headers.len() > max_headers {
        return Err(ProxyError::HeadersTooLarge { limit: "server.max_headers", value: headers.len() });
    }
    let mut bytes = 0;
    for (name, value) in headers {
        bytes += name.as_str().len() + value.len();
        if let (Some(first), Some(last)) = (value.as_bytes().first(), value.as_bytes().last())
            && (matches!(first, b' ' | b'\t') || matches!(last, b' ' | b'\t'))
        {
            return Err(ProxyError::BadRequest(
                "header values starting or ending with white space are refused",
            ));
        }
    }
    if bytes > max_bytes {
        return Err(ProxyError::HeadersTooLarge { limit: "server.max_header_bytes", value: bytes });
    }
    Ok(())
}

/// The single `Content-Length` in `headers`, in plain digits; `None` when there
/// is none, or several, or it is not a plain number.
pub fn single_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_plain_length_is_a_length() {
        let with = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(http::header::CONTENT_LENGTH, HeaderValue::from_static(value));
            }
            single_length(&headers)
        };
        assert_eq!(with(&["700"]), Some(700));
        assert_eq!(with(&["+700"]), None, "not plain digits");
        assert_eq!(with(&["700", "700"]), None, "two fields");
        assert_eq!(with(&[""]), None);
        assert_eq!(with(&[]), None);
    }
    use http::header::HOST;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect()
    }

    fn bearer() -> HeaderValue {
        let mut v = HeaderValue::from_static("Bearer tallyfy-token");
        v.set_sensitive(true);
        v
    }

    #[test]
    fn caller_credentials_are_swapped_for_the_tallyfy_token() {
        let mut headers = map(&[
            ("authorization", "Bearer caller-key"),
            ("proxy-authorization", "Basic xyz"),
            ("cookie", "session=1"),
            ("x-api-key", "k"),
            ("x-tallyfy-client", "TallyfySDK"),
            ("host", "127.0.0.1:8080"),
            ("content-type", "application/json"),
            ("x-request-id", "r-1"),
        ]);
        to_upstream(&mut headers, Some(bearer()), &HeaderValue::from_static("APIClient"));
        assert_eq!(headers["authorization"], "Bearer tallyfy-token");
        assert_eq!(headers.get_all("authorization").iter().count(), 1);
        assert_eq!(headers["x-tallyfy-client"], "APIClient");
        assert_eq!(headers["accept"], "application/json");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-request-id"], "r-1");
        for gone in ["proxy-authorization", "cookie", "x-api-key", "host"] {
            assert!(!headers.contains_key(gone), "{gone} must not go upstream");
        }
    }

    #[test]
    fn the_one_pass_filter_drops_exactly_the_listed_names() {
        for name in CALLER_CREDENTIALS.iter().chain(&UNTRUSTED).chain(&HOP_BY_HOP).chain([&HOST]) {
            assert!(not_forwarded(name.as_str()), "{name}");
        }
        for kept in ["accept", "content-type", "x-request-id", "x-tallyfy-client", "x-custom"] {
            assert!(!not_forwarded(kept), "{kept}");
        }
    }

    #[test]
    fn routing_claims_overrides_and_names_php_would_fold_are_dropped() {
        let mut headers = map(&[
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-original-url", "/api/oauth/token"),
            ("x-rewrite-url", "/api/oauth/token"),
            ("x_api_key", "k"),
            ("x_tallyfy_client", "Other"),
            ("x-http-method.override", "DELETE"),
            ("x-forwarded.for", "1.2.3.4"),
            ("x-custom", "kept"),
        ]);
        to_upstream(&mut headers, Some(bearer()), &HeaderValue::from_static("APIClient"));
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "authorization", "x-custom", "x-tallyfy-client"]);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "text/csv"),
        ]);
        to_upstream(&mut headers, Some(bearer()), &HeaderValue::from_static("APIClient"));
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "transfer-encoding", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        assert_eq!(headers["accept"], "text/csv", "an explicit Accept is kept");
    }

    #[test]
    fn names_listed_beside_a_byte_above_0x7f_are_dropped_too() {
        let mut headers = map(&[("x-secret-hop", "1"), ("accept", "text/csv")]);
        headers.insert(CONNECTION, HeaderValue::from_bytes(b"X-Secret-Hop, \xff").expect("obs-text value"));
        to_upstream(&mut headers, Some(bearer()), &HeaderValue::from_static("APIClient"));
        assert!(!headers.contains_key("x-secret-hop"));
        assert_eq!(headers["accept"], "text/csv");
    }

    #[test]
    fn responses_keep_tallyfy_headers_and_lose_hop_by_hop() {
        let mut headers = map(&[
            ("content-type", "application/json"),
            ("retry-after", "30"),
            ("x-ratelimit-remaining", "9"),
            ("x-request-id", "abc"),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
        ]);
        to_caller(&mut headers);
        assert_eq!(headers.len(), 4);
        assert_eq!(headers["retry-after"], "30");
        assert_eq!(headers["x-upstream-request-id"], "abc", "Tallyfy's id keeps its own name");
        assert!(!headers.contains_key("x-request-id"), "the caller's id is the proxy's");

        let mut every: HeaderMap =
            HOP_BY_HOP.iter().map(|name| (name.clone(), HeaderValue::from_static("x"))).collect();
        every.insert("connection", HeaderValue::from_static("X-Listed, keep-alive"));
        every.insert("x-listed", HeaderValue::from_static("1"));
        every.insert("content-length", HeaderValue::from_static("2"));
        to_caller(&mut every);
        assert_eq!(
            every.keys().collect::<Vec<_>>(),
            ["content-length"],
            "every hop-by-hop name, and the listed one"
        );
    }

    #[test]
    fn credential_headers_are_marked_sensitive_and_others_are_not() {
        let mut headers = map(&[("authorization", "Bearer k"), ("cookie", "a=1"), ("accept", "*/*")]);
        headers.append("x-api-key", HeaderValue::from_static("one"));
        headers.append("x-api-key", HeaderValue::from_static("two"));
        mark_sensitive(&mut headers);
        for (name, value) in &headers {
            assert_eq!(value.is_sensitive(), name != "accept", "{name}");
        }
    }

    #[test]
    fn limits_count_fields_and_bytes() {
        let headers = map(&[("a", "1"), ("b", "22")]);
        assert!(check_fields(&headers, 2, 100).is_ok());
        assert!(check_fields(&headers, 1, 100).is_err());
        assert!(check_fields(&headers, 2, 4).is_err());
        for spaced in [" application/json", "application/json\t", "\tx ", " "] {
            let headers = map(&[("content-type", spaced)]);
            assert!(matches!(check_fields(&headers, 2, 100), Err(ProxyError::BadRequest(_))), "{spaced:?}");
        }
        assert!(check_fields(&map(&[("x", "a b"), ("y", "")]), 2, 100).is_ok(), "inner space, empty value");
    }
}
