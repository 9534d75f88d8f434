//! Sending to Tallyfy: once, again while `[upstream.retry]` and its budget
//! allow, and Tallyfy's 429s remembered (and, when short, waited out).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::response::Parts;
use http::{HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};

use super::record::RequestRecord;
use super::replay::Replay;
use super::response_body::refuse_unframeable;
use super::{Proxy, ProxyBody};
use crate::body;
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::{IdentityMetrics, Metrics};
use crate::tokens::CredentialId;
use crate::traffic::{Failure, Said, clock, throttle};
use crate::upstream::{Outbound, UpstreamBody};

/// A 429 body is read to tell an hourly cap from a burst throttle; more than
/// this is not one of Tallyfy's.
const MAX_429_BODY: usize = 64 * 1024;

/// What a request was, for remembering a 429 against it.
pub(super) struct Target {
    pub method: Method,
    pub uri: Uri,
    /// The `[[limits]]` rule it was counted under.
    pub rule: Option<usize>,
    pub credential: CredentialId,
}

/// Tallyfy's answer: still streaming, or already read (a 429 passed on).
pub(super) enum Answer {
    Streaming(Response<UpstreamBody>),
    Read(Response<ProxyBody>),
}

impl Proxy {
    /// Sends `first`; sends the `replay` again after a failure that cannot
    /// have done anything at Tallyfy, while `[upstream.retry]` and its budget
    /// allow; then remembers a 429 (see [`crate::traffic::throttle`]).
    /// `sent_with` is the token the request goes with; a request sent again
    /// after a wait goes with the credential's token then, and `sent_with`
    /// follows.
    pub(super) async fn send(
        &self,
        first: &mut Outbound,
        replay: Option<&Replay>,
        target: &Target,
        sent_with: &mut SentWith,
        log: &mut RequestRecord,
        figures: &IdentityMetrics,
    ) -> Result<Answer, ProxyError> {
        self.shared.traffic.sent(now());
        log.request_body = Some(first.progress().clone());
        self.deliver(first, replay, target, sent_with, log, figures).await
    }

    /// [`Proxy::send`] past what counts a request once: also how a request
    /// replayed after a dead token is sent.
    pub(super) async fn deliver(
        &self,
        first: &mut Outbound,
        replay: Option<&Replay>,
        target: &Target,
        sent_with: &mut SentWith,
        log: &mut RequestRecord,
        figures: &IdentityMetrics,
    ) -> Result<Answer, ProxyError> {
        let shared = &*self.shared;
        let traffic = &shared.traffic;
        let retry = &traffic.settings.retry;
        let mut outcome = self.send_once(first, log, figures).await;
        while let Some(failure) = retryable(&outcome) {
            let Some(replay) =
                replay.filter(|_| retry.covers(&target.method, failure) && log.retries + 1 < retry.attempts)
            else {
                break;
            };
            if !traffic.may_retry(now()) {
                shared.metrics.retry_budget_exhausted.inc();
                break;
            }
            log.retries += 1;
            shared.metrics.retried(failure.reason());
            let delay = retry.delay(log.retries, rand::random());
            // Boxed, as the other rare paths: the common one's future stays small.
            outcome = Box::pin(async {
                tokio::time::sleep(delay).await;
                let token = self.token_since(target.credential, sent_with)?;
                self.send_once(&mut replay.outbound(token), log, figures).await
            })
            .await;
        }
        let response = outcome?;
        if response.status() != StatusCode::TOO_MANY_REQUESTS {
            traffic.answered(target.credential.index());
            return Ok(Answer::Streaming(response));
        }
        Box::pin(self.throttled(response, replay, target, sent_with, log, figures)).await
    }

    /// The token a request sent after a wait goes with: the credential's
    /// token now, when a refresh replaced the one `sent_with` names (which
    /// then follows), so it does not meet a 401 first; else the one it last
    /// went with (`None`: the one it was first sent with). When the
    /// credential holds no valid token now (it expired during the wait, its
    /// refreshes failing), nothing goes: 503, as for a request that arrives
    /// then.
    pub(super) fn token_since(
        &self,
        credential: CredentialId,
        sent_with: &mut SentWith,
    ) -> Result<Option<HeaderValue>, ProxyError> {
        let lease = self
            .shared
            .tokens
            .lease(credential, tokio::time::Instant::now())
            .map_err(|_| self.token_unavailable(credential))?;
        if lease.generation != sent_with.generation {
            sent_with.generation = lease.generation;
            sent_with.token = Some(lease.authorization);
        }
        Ok(sent_with.token.clone())
    }

    /// Tallyfy answered 429: remember it for the requests after this one, and
    /// send this one again after `Retry-After` when that is short enough and
    /// its body is kept; otherwise pass the 429 on.
    async fn throttled(
        &self,
        response: Response<UpstreamBody>,
        replay: Option<&Replay>,
        target: &Target,
        sent_with: &mut SentWith,
        log: &mut RequestRecord,
        figures: &IdentityMetrics,
    ) -> Result<Answer, ProxyError> {
        let shared = &*self.shared;
        let traffic = &shared.traffic;
        let retry_after = throttle::retry_after(response.headers(), unix_now());
        let (parts, answer) = response.into_parts();
        // A body that stalls past the request timeout, breaks or runs long is
        // no reason to forget the 429: it is read as an empty one (a burst throttle).
        let limit = shared.upstream.request_timeout();
        let bytes = tokio::time::timeout(limit, Limited::new(answer, MAX_429_BODY).collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        // Read as Tallyfy coded it (a caller asking for gzip gets a gzipped
        // 429): read coded, an hourly cap would pass for a credential-wide one.
        let hourly = body::encoding(&parts.headers).is_some_and(|encoding| {
            matches!(body::decode(&bytes, encoding, MAX_429_BODY as u64),
                body::Decoded::Whole(decoded) if throttle::is_hourly_cap(&decoded))
        });
        let credential = target.credential.index();
        let path = shared.upstream.received_path(&target.uri);
        let said = Said { retry_after, hourly };
        let remembered = traffic.remember_429(credential, &target.method, path, target.rule, said, now());
        if let (Some(fleet), Some(remembered)) = (traffic.fleet(), remembered) {
            let fleet = fleet.clone();
            tokio::spawn(async move { fleet.tell_throttled(remembered).await });
        }
        Metrics::credential(&shared.metrics.upstream_429s, &shared.tokens.name(target.credential));
        // A max wait of 0 is "never", even for a `Retry-After: 0` (or a date past).
        let max_wait = traffic.settings.retry_429_max_wait;
        if let (Some(replay), Some(wait)) = (replay, retry_after)
            && !max_wait.is_zero()
            && wait <= max_wait
        {
            log.throttle = Some("absorbed");
            tokio::time::sleep(wait).await;
            let token = self.token_since(target.credential, sent_with)?;
            let response = self.send_once(&mut replay.outbound(token), log, figures).await?;
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                // Remembered, counted and told like the first; never waited out twice.
                return Box::pin(self.throttled(response, None, target, sent_with, log, figures)).await;
            }
            traffic.answered(credential);
            return Ok(Answer::Streaming(response));
        }
        Ok(Answer::Read(passed_on(parts, bytes)))
    }

    /// One send, timed for the identity's upstream latency. An answer the
    /// proxy cannot pass on safely is refused here, as it comes: before
    /// anything reads its body (a 429's is read) or remembers it.
    pub(super) async fn send_once(
        &self,
        outbound: &mut Outbound,
        log: &mut RequestRecord,
        figures: &IdentityMetrics,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let sent = Instant::now();
        let response = self.shared.upstream.send(outbound).await?;
        figures.upstream(sent.elapsed());
        log.upstream_status = Some(response.status());
        refuse_unframeable(&response)?;
        Ok(response)
    }
}

/// The token a request last went with: its generation, and its value when
/// it is not the one the request was first sent with.
pub(super) struct SentWith {
    pub generation: u64,
    pub token: Option<HeaderValue>,
}

/// The failure a retry may mend, if this outcome is one.
fn retryable(outcome: &Result<Response<UpstreamBody>, ProxyError>) -> Option<Failure> {
    match outcome {
        Err(ProxyError::UpstreamUnreachable(_)) => Some(Failure::Connect),
        Err(ProxyError::UpstreamBroken(_)) => Some(Failure::Reset),
        Err(_) => None,
        Ok(response) => Failure::of_status(response.status()),
    }
}

/// A read upstream response as the caller gets it.
fn passed_on(mut parts: Parts, body: Bytes) -> Response<ProxyBody> {
    headers::to_caller(&mut parts.headers);
    if body.is_empty() {
        // Nothing was read (an empty body, or one too large or broken to
        // read): no coding describes the empty body sent instead.
        parts.headers.remove(CONTENT_ENCODING);
    }
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, Either::Right(Full::new(body)))
}

fn now() -> clock::Nanos {
    clock::nanos(tokio::time::Instant::now())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzipped_429() -> Parts {
        let mut parts = Response::new(()).into_parts().0;
        parts.status = StatusCode::TOO_MANY_REQUESTS;
        parts.headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        parts
    }

    #[test]
    fn a_429_whose_body_could_not_be_read_goes_on_empty_and_uncoded() {
        let response = passed_on(gzipped_429(), Bytes::new());
        assert!(!response.headers().contains_key(CONTENT_ENCODING), "no coding for an empty body");
        assert_eq!(response.headers()[CONTENT_LENGTH], "0");
        let response = passed_on(gzipped_429(), Bytes::from_static(b"\x1f\x8b..."));
        assert_eq!(response.headers()[CONTENT_ENCODING], "gzip", "a body read whole keeps its coding");
    }
}
