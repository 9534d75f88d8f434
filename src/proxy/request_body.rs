//! The request body on its way to Tallyfy: read whole when dates may need
//! rewriting or a `_method` override must be judged, kept when small enough to
//! replay after a token refresh, streamed otherwise (multipart bodies of
//! identities with a `methods` rule through the override [`Screen`]).

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::request::Parts;
use http::{HeaderValue, Method};
use http_body::Body as _;
use http_body_util::{Either, Full, Limited};

use super::Proxy;
use super::prepare::judge_overrides;
use crate::body::{self, BodyStart, DataOnly, Decoded, Encoding, Kind, Prefixed};
use crate::dates::{self, DateRules};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::method_override::multipart::{Screen, Screened};
use crate::method_override::{self, BodyKind};
use crate::server::CallerBody;
use crate::upstream::{RequestBody, StreamedBody};

/// The body to send, and a copy when it may be sent again.
pub(super) struct Outgoing {
    pub body: RequestBody,
    pub kept: Option<Bytes>,
    /// The proxy waited for (some of) the body before sending: time passed.
    pub waited: bool,
}

/// What must be read in a body the proxy reads whole.
struct Reading<'i> {
    /// Date rules, content kind and encoding, when dates may need rewriting.
    dates: Option<(&'i DateRules, Kind, Encoding)>,
    /// How PHP will read the body, when a `_method` override must be judged.
    overrides: Option<BodyKind>,
}

impl Proxy {
    pub(super) async fn request_body(
        &self,
        head: &mut Parts,
        body: CallerBody,
        identity: &Identity,
    ) -> Result<Outgoing, ProxyError> {
        let shared = &*self.shared;
        // Kept to be sent again: after a dead token, a retryable failure or a short 429.
        let replayable =
            shared.tokens.is_refreshable(identity.credential) || shared.traffic.may_resend(&head.method);
        let replay_max = shared.token_rules.replay_max_body_bytes;
        if body.is_end_stream() {
            return Ok(Outgoing {
                body: Either::Left(Full::new(Bytes::new())),
                kept: replayable.then(Bytes::new),
                waited: false,
            });
        }
        let judged = identity.policy.restricts_methods() && head.method == Method::POST;
        let overrides = judged
            .then(|| method_override::body_kind(&head.headers))
            .transpose()
            .map_err(|unreadable| ProxyError::OverrideUnreadable(unreadable.0))?;
        if let Some(BodyKind::Multipart(boundary)) = &overrides {
            let boundary = boundary
                .as_deref()
                .ok_or(ProxyError::OverrideUnreadable("a multipart body needs a boundary"))?;
            if body::encoding(&head.headers) != Some(Encoding::Identity) {
                return Err(ProxyError::OverrideUnreadable("a compressed multipart body cannot be judged"));
            }
            let allowed = identity.policy.methods.clone().unwrap_or_default();
            let screen = Screen::new(boundary, allowed);
            let body = Either::Right(self.streamed(None, body, Some(screen)));
            return Ok(Outgoing { body, kept: None, waited: false });
        }
        let reading = Reading {
            dates: identity
                .dates
                .as_deref()
                .zip(body::request_kind(&head.method, &head.headers))
                .zip(body::encoding(&head.headers))
                .map(|((rules, kind), encoding)| (rules, kind, encoding)),
            overrides: overrides.filter(|kind| *kind != BodyKind::Opaque),
        };
        if reading.dates.is_some() || reading.overrides.is_some() {
            // Boxed: only requests with a body read it, and a GET's future stays small.
            return Box::pin(self.read_whole(head, body, &reading, identity, replayable)).await;
        }
        let declared = super::prepare::declared_length(&head.headers);
        if replayable && declared.is_some_and(|length| length <= replay_max) {
            return match Box::pin(self.read_start(body, replay_max)).await? {
                BodyStart::Complete(bytes) => {
                    whole_as_declared(&bytes, declared)?;
                    Ok(Outgoing {
                        body: Either::Left(Full::new(bytes.clone())),
                        kept: Some(bytes),
                        waited: true,
                    })
                }
                // Too large to keep, or no room to: it streams, and is not replayed.
                BodyStart::Over(prefix, rest) | BodyStart::Unbudgeted(prefix, rest) => {
                    let body = Either::Right(self.streamed(Some(prefix), rest, None));
                    Ok(Outgoing { body, kept: None, waited: true })
                }
            };
        }
        Ok(Outgoing { body: Either::Right(self.streamed(None, body, None)), kept: None, waited: false })
    }

    /// Reads a body whole (up to `dates.max_body_bytes`) to judge its override
    /// and rewrite its dates.
    async fn read_whole(
        &self,
        head: &mut Parts,
        body: CallerBody,
        reading: &Reading<'_>,
        identity: &Identity,
        replayable: bool,
    ) -> Result<Outgoing, ProxyError> {
        let shared = &*self.shared;
        let max = shared.dates.max_body_bytes.min(shared.limits.max_request_body_bytes);
        let declared = super::prepare::declared_length(&head.headers);
        // Declared too large to judge: 413 before a byte is read (or counted).
        if reading.overrides.is_some() && declared.is_some_and(|length| length > max) {
            return Err(ProxyError::PolicyBodyTooLarge { limit: max });
        }
        let mut bytes = match self.read_start(body, max).await? {
            BodyStart::Complete(bytes) => {
                whole_as_declared(&bytes, declared)?;
                bytes
            }
            // What must be judged or rewritten cannot stream unread: nothing is sent.
            BodyStart::Unbudgeted(..) => {
                shared.metrics.buffers_full.inc();
                return Err(ProxyError::BuffersFull);
            }
            BodyStart::Over(prefix, rest) => {
                if reading.overrides.is_some() {
                    return Err(ProxyError::PolicyBodyTooLarge { limit: max });
                }
                // Too large to rewrite. Refuse it if its start shows dates
                // Tallyfy would misread; otherwise let it through as it is.
                if let Some((rules, kind, encoding)) = reading.dates
                    && holds_dates(&body::decode(&prefix, encoding, max), kind, rules)
                {
                    return Err(ProxyError::DatesBodyTooLarge { limit: max });
                }
                return Ok(Outgoing {
                    body: Either::Right(self.streamed(Some(prefix), rest, None)),
                    kept: None,
                    waited: true,
                });
            }
        };
        let mut dates = reading.dates;
        if let Some(kind) = &reading.overrides
            && let Some(decoded) = judge_body_overrides(&bytes, kind, &head.headers, max, identity)?
        {
            // What was judged is what goes: a compressed body's raw bytes can
            // hide a `_method` (in a gzip header's file name, or after the
            // stream's end) that PHP, which reads a body as it comes, would
            // find and the decoded reading would not.
            head.headers.remove(CONTENT_ENCODING);
            head.headers.insert(CONTENT_LENGTH, HeaderValue::from(decoded.len()));
            bytes = body::held_forced(shared.limits.buffer_budget, decoded);
            dates = dates.map(|(rules, kind, _)| (rules, kind, Encoding::Identity));
        }
        let bytes = match dates {
            Some((rules, kind, encoding)) => self.rewrite_dates(head, bytes, kind, encoding, rules)?,
            None => bytes,
        };
        if bytes.len() as u64 > shared.limits.max_request_body_bytes {
            return Err(ProxyError::BodyTooLarge { limit: shared.limits.max_request_body_bytes });
        }
        let kept = (replayable && bytes.len() as u64 <= shared.token_rules.replay_max_body_bytes)
            .then(|| bytes.clone());
        Ok(Outgoing { body: Either::Left(Full::new(bytes)), kept, waited: true })
    }

    /// Reads up to `max` bytes of the caller's body, within the upstream request
    /// timeout (a slow caller may not hold a task forever).
    async fn read_start(&self, body: CallerBody, max: u64) -> Result<BodyStart<CallerBody>, ProxyError> {
        let limit = self.shared.upstream.request_timeout();
        body::within(limit, body::read_up_to(body, max, self.shared.limits.buffer_budget))
            .await
            .ok_or(ProxyError::BodyTimeout(limit))?
            .map_err(|e| ProxyError::BodyRead(e.to_string()))
    }

    /// The rest of the caller's body, streamed, within the overall size limit.
    fn streamed(&self, prefix: Option<Bytes>, rest: CallerBody, screen: Option<Screen>) -> StreamedBody {
        let max = self.shared.limits.max_request_body_bytes;
        let already = prefix.as_ref().map_or(0, |p| p.len() as u64);
        let remaining = usize::try_from(max.saturating_sub(already)).unwrap_or(usize::MAX);
        Prefixed::new(prefix, Screened::new(Limited::new(DataOnly::new(rest), remaining), screen))
    }

    /// Rewrites the dates of a whole body. Returns the bytes to send: the very
    /// same ones when nothing changed (or the body is not valid JSON or not valid
    /// for its encoding: Tallyfy will answer it), else the rewritten body, sent
    /// decoded, with `Content-Length` set to its new length. A compressed body
    /// that inflates past `dates.max_body_bytes` with dates in it is refused.
    fn rewrite_dates(
        &self,
        head: &mut Parts,
        bytes: Bytes,
        kind: Kind,
        encoding: Encoding,
        rules: &DateRules,
    ) -> Result<Bytes, ProxyError> {
        let metrics = &self.shared.metrics;
        let max = self.shared.dates.max_body_bytes;
        // An uncompressed body is scanned where it lies, not copied.
        let rewritten = match body::decode(&bytes, encoding, max) {
            Decoded::Whole(decoded) => match kind {
                Kind::Json => dates::rewrite_json(&decoded, rules).ok(),
                Kind::Form => Some(dates::rewrite_form(&decoded, rules)),
            },
            too_large @ Decoded::TooLarge(_) => {
                return if holds_dates(&too_large, kind, rules) {
                    Err(ProxyError::DatesBodyTooLarge { limit: max })
                } else {
                    Ok(bytes)
                };
            }
            Decoded::Corrupt(_) => None,
        };
        // Not valid for its encoding, or not valid JSON: Tallyfy will answer it.
        let Some(rewritten) = rewritten else {
            metrics.bodies_invalid.inc();
            return Ok(bytes);
        };
        let Some(new_body) = rewritten.body else {
            return Ok(bytes);
        };
        metrics.dates_rewritten.inc_by(rewritten.dates_rewritten as u64);
        head.headers.remove(CONTENT_ENCODING);
        head.headers.insert(CONTENT_LENGTH, HeaderValue::from(new_body.len()));
        Ok(body::held_forced(self.shared.limits.buffer_budget, Bytes::from(new_body)))
    }
}

/// Judges the `_method` overrides a whole JSON or form body carries, decoded
/// first when it is compressed (the stack behind Tallyfy's edge may decode it).
/// Returns the decoded bytes of a compressed body: they, not the raw ones, are
/// what must be sent.
fn judge_body_overrides(
    bytes: &[u8],
    kind: &BodyKind,
    headers: &http::HeaderMap,
    max: u64,
    identity: &Identity,
) -> Result<Option<Bytes>, ProxyError> {
    let encoding = body::encoding(headers)
        .ok_or(ProxyError::OverrideUnreadable("a body in an unknown Content-Encoding cannot be judged"))?;
    let decoded = match body::decode(bytes, encoding, max) {
        Decoded::Whole(decoded) => decoded,
        Decoded::TooLarge(_) => return Err(ProxyError::PolicyBodyTooLarge { limit: max }),
        Decoded::Corrupt(_) => {
            return Err(ProxyError::OverrideUnreadable("a body that does not decode cannot be judged"));
        }
    };
    let found = match kind {
        BodyKind::Json => method_override::in_json(&decoded),
        BodyKind::Form => method_override::in_urlencoded(&decoded),
        // Both readings: a form that may carry `_method` must also hold as JSON.
        BodyKind::FormOrJson => method_override::in_urlencoded(&decoded).and_then(|mut found| {
            found.extend(method_override::in_json(&decoded)?);
            Ok(found)
        }),
        BodyKind::Multipart(_) | BodyKind::Opaque => Ok(Vec::new()),
    };
    judge_overrides(&identity.policy, found)?;
    Ok((encoding != Encoding::Identity).then(|| Bytes::from(decoded.into_owned())))
}

/// A body read whole that ended short of its `Content-Length` is not sent:
/// an HTTP/2 caller that cancels its upload with `RST_STREAM(NO_ERROR)` looks
/// to hyper like one whose body ended, and the proxy would otherwise send the
/// part it had, framed anew (rewritten, or kept for a replay), as a complete
/// request the caller never finished.
fn whole_as_declared(bytes: &Bytes, declared: Option<u64>) -> Result<(), ProxyError> {
    match declared {
        Some(declared) if declared != bytes.len() as u64 => {
            Err(ProxyError::BodyRead(format!("the body ended after {} of its {declared} bytes", bytes.len())))
        }
        _ => Ok(()),
    }
}

/// Whether the (start of a) decoded body shows date fields.
fn holds_dates(decoded: &Decoded<'_>, kind: Kind, rules: &DateRules) -> bool {
    let bytes = decoded.bytes();
    match kind {
        Kind::Json => dates::may_need_rewrite(bytes, rules),
        Kind::Form => dates::form_may_need_rewrite(bytes, rules),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper hands over when an HTTP/2 caller resets its upload with
    /// `NO_ERROR` after 7 of 100 bytes: a body that "ended". (End to end, hyper
    /// drops the request before its upstream send in every case tried, so the
    /// check is shown here.)
    #[test]
    fn a_whole_body_short_of_its_length_is_refused() {
        let part = Bytes::from_static(b"title=t");
        let refused = whole_as_declared(&part, Some(100)).expect_err("short of its length");
        assert_eq!(refused.status(), http::StatusCode::BAD_REQUEST);
        assert!(refused.to_string().contains("7 of its 100"), "{refused}");
        assert!(whole_as_declared(&part, Some(7)).is_ok());
        assert!(whole_as_declared(&part, None).is_ok(), "no length declared: nothing to hold it to");
    }
}
