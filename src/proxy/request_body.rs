//! The request body on its way to Tallyfy: dates rewritten when it may hold
//! some, kept when small enough to replay after a token refresh, streamed
//! otherwise.

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::request::Parts;
use http_body::Body as _;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

use super::Proxy;
use crate::config::Identity;
use crate::dates::{self, DateRules};
use crate::error::ProxyError;
use crate::rewrite::{self, BodyStart, Decoded, Encoding, Kind, Prefixed};
use crate::upstream::RequestBody;

/// The body to send, and a copy when it may be sent again.
pub(super) struct Outgoing {
    pub body: RequestBody,
    pub kept: Option<Bytes>,
}

impl Proxy {
    pub(super) async fn request_body(
        &self,
        head: &mut Parts,
        body: Incoming,
        identity: &Identity,
    ) -> Result<Outgoing, ProxyError> {
        let shared = &*self.shared;
        let replayable = shared.refresher.is_refreshable(identity.credential);
        let replay_max = shared.token_rules.replay_max_body_bytes;
        if body.is_end_stream() {
            return Ok(Outgoing {
                body: Either::Left(Full::new(Bytes::new())),
                kept: replayable.then(Bytes::new),
            });
        }
        let rewrite =
            identity.dates.as_deref().zip(rewrite::kind(&head.headers)).zip(rewrite::encoding(&head.headers));
        if let Some(((rules, kind), encoding)) = rewrite {
            let max = shared.dates.max_body_bytes.min(shared.limits.max_request_body_bytes);
            return match self.read_start(body, max).await? {
                BodyStart::Complete(bytes) => {
                    let bytes = self.rewrite_dates(head, bytes, kind, encoding, rules)?;
                    if bytes.len() as u64 > shared.limits.max_request_body_bytes {
                        return Err(ProxyError::BodyTooLarge { limit: shared.limits.max_request_body_bytes });
                    }
                    let kept = (replayable && bytes.len() as u64 <= replay_max).then(|| bytes.clone());
                    Ok(Outgoing { body: Either::Left(Full::new(bytes)), kept })
                }
                BodyStart::Over(prefix, rest) => {
                    // Too large to rewrite. Refuse it if its start shows dates
                    // Tallyfy would misread; otherwise let it through as it is.
                    if holds_dates(&rewrite::decode(&prefix, encoding, max), kind, rules) {
                        return Err(ProxyError::DatesBodyTooLarge { limit: max });
                    }
                    Ok(Outgoing { body: Either::Right(self.streamed(Some(prefix), rest)), kept: None })
                }
            };
        }
        let declared = super::declared_length(&head.headers);
        if replayable && declared.is_some_and(|length| length <= replay_max) {
            return match self.read_start(body, replay_max).await? {
                BodyStart::Complete(bytes) => {
                    Ok(Outgoing { body: Either::Left(Full::new(bytes.clone())), kept: Some(bytes) })
                }
                BodyStart::Over(prefix, rest) => {
                    Ok(Outgoing { body: Either::Right(self.streamed(Some(prefix), rest)), kept: None })
                }
            };
        }
        Ok(Outgoing { body: Either::Right(self.streamed(None, body)), kept: None })
    }

    /// Reads up to `max` bytes of the caller's body, within the upstream request
    /// timeout (a slow caller may not hold a task forever).
    async fn read_start(&self, body: Incoming, max: u64) -> Result<BodyStart<Incoming>, ProxyError> {
        let limit = self.shared.upstream.request_timeout();
        tokio::time::timeout(limit, rewrite::read_up_to(body, max))
            .await
            .map_err(|_| ProxyError::BodyTimeout(limit))?
            .map_err(|e| ProxyError::BodyRead(e.to_string()))
    }

    /// The rest of the caller's body, streamed, within the overall size limit.
    fn streamed(&self, prefix: Option<Bytes>, rest: Incoming) -> Prefixed<Limited<Incoming>> {
        let max = self.shared.limits.max_request_body_bytes;
        let already = prefix.as_ref().map_or(0, |p| p.len() as u64);
        let remaining = usize::try_from(max.saturating_sub(already)).unwrap_or(usize::MAX);
        Prefixed::new(prefix, Limited::new(rest, remaining))
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
        let decoded = match rewrite::decode(&bytes, encoding, max) {
            Decoded::Whole(decoded) => decoded,
            too_large @ Decoded::TooLarge(_) => {
                return if holds_dates(&too_large, kind, rules) {
                    Err(ProxyError::DatesBodyTooLarge { limit: max })
                } else {
                    Ok(bytes)
                };
            }
            Decoded::Corrupt(_) => {
                metrics.bodies_invalid.inc();
                return Ok(bytes);
            }
        };
        let rewritten = match kind {
            Kind::Json => match dates::rewrite_json(&decoded, rules) {
                Ok(rewrite) => rewrite,
                Err(_) => {
                    metrics.bodies_invalid.inc();
                    return Ok(bytes);
                }
            },
            Kind::Form => dates::rewrite_form(&decoded, rules),
        };
        let Some(new_body) = rewritten.body else {
            return Ok(bytes);
        };
        metrics.dates_rewritten.inc_by(rewritten.dates_rewritten as u64);
        head.headers.remove(CONTENT_ENCODING);
        head.headers.insert(CONTENT_LENGTH, HeaderValue::from(new_body.len()));
        Ok(Bytes::from(new_body))
    }
}

/// Whether the (start of a) decoded body shows date fields.
fn holds_dates(decoded: &Decoded, kind: Kind, rules: &DateRules) -> bool {
    let (Decoded::Whole(bytes) | Decoded::TooLarge(bytes) | Decoded::Corrupt(bytes)) = decoded;
    match kind {
        Kind::Json => dates::may_need_rewrite(bytes, rules),
        Kind::Form => dates::form_may_need_rewrite(bytes, rules),
    }
}
