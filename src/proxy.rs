//! The request pipeline, phase by phase. Every failure becomes a response here,
//! through [`ProxyError::to_response`], and every request ends in one access-log line.
//!
//! ```text
//! target -> limits -> identity -> policy -> token -> rewrite head -> send -> dead token? refresh + replay once
//! 404/400   431/413     401        403      503                     502/504/413
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::access_log::AccessLog;
use crate::config::{self, Config, Identity};
use crate::error::{ErrorClass, ProxyError};
use crate::headers;
use crate::identity::{Caller, Identities};
use crate::metrics::Metrics;
use crate::server::ConnectionInfo;
use crate::target;
use crate::tokens::refresh::RefreshHandle;
use crate::tokens::{Lease, TokenStore};
use crate::upstream::Upstream;

/// What callers receive: Tallyfy's streamed body, or a local JSON error.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// How long a caller is told to wait when its credential has no valid token.
pub const TOKEN_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The forwarding proxy. Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    identities: Identities,
    tokens: Arc<TokenStore>,
    refresher: RefreshHandle,
    metrics: Arc<Metrics>,
    client_header: http::HeaderValue,
    limits: config::Server,
    token_rules: config::Tokens,
}

/// A request whose head has been rewritten for Tallyfy.
pub struct Prepared<'p> {
    pub identity: &'p Identity,
    pub lease: Lease,
}

/// A kept copy of a request, so it can be sent again with a fresh token.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Proxy {
    pub fn new(
        config: &Config,
        tokens: Arc<TokenStore>,
        refresher: RefreshHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, rustls::Error> {
        Ok(Proxy {
            shared: Arc::new(Shared {
                upstream: Upstream::new(&config.upstream, config.server.max_request_body_bytes)?,
                identities: Identities::new(config.identities.clone()),
                tokens,
                refresher,
                metrics,
                client_header: config.upstream.client_header.clone(),
                limits: config.server.clone(),
                token_rules: config.tokens.clone(),
            }),
        })
    }

    /// Handles one request to the end: Tallyfy's response or a JSON error.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        connection: &ConnectionInfo,
    ) -> Response<ProxyBody> {
        let metrics = &self.shared.metrics;
        let _in_flight = InFlight::enter(&metrics.in_flight);
        let mut log = AccessLog::start(&request, connection.peer);
        let span = tracing::info_span!("request", request_id = log.request_id());
        let response = match self.forward(request, connection, &mut log).instrument(span).await {
            Ok(response) => response.map(Either::Left),
            Err(error) => {
                let response = error.to_response().map(Either::Right);
                if error.class() == ErrorClass::Caller || matches!(error, ProxyError::TokenUnavailable { .. })
                {
                    metrics.rejected(error.code());
                }
                log.failed(error);
                response
            }
        };
        metrics.request(log.identity, log.method(), response.status(), log.elapsed());
        log.finish(response.status());
        response
    }

    async fn forward<'a>(
        &'a self,
        request: Request<Incoming>,
        connection: &ConnectionInfo,
        log: &mut AccessLog<'a>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let shared = &*self.shared;
        let (mut head, body) = request.into_parts();
        let Prepared { identity, lease } = self.prepare(&mut head, connection)?;
        log.identity = Some(&identity.name);
        let credential = identity.credential;

        // Keep small bodies when the token could be refreshed, so a request whose
        // token Tallyfy rejects can be sent once more.
        let (body, replay) = if shared.refresher.is_refreshable(credential) {
            match self.keep_if_small(&head, body).await? {
                Ok(bytes) => {
                    let replay = Replay {
                        method: head.method.clone(),
                        uri: head.uri.clone(),
                        version: head.version,
                        headers: head.headers.clone(),
                        body: bytes.clone(),
                    };
                    (Either::Left(Full::new(bytes)), Some(replay))
                }
                Err(streaming) => (Either::Right(streaming), None),
            }
        } else {
            (Either::Right(self.limited(body)), None)
        };

        let sent = Instant::now();
        let response = shared.upstream.send(Request::from_parts(head, body)).await?;
        shared.metrics.upstream(&identity.name, sent.elapsed());
        log.upstream_status = Some(response.status());
        if !shared.token_rules.dead_token_statuses.contains(&response.status())
            || !shared.refresher.is_refreshable(credential)
        {
            return Ok(clean(response));
        }
        let settled = shared.tokens.settled(credential);
        shared.refresher.token_rejected(credential, lease.generation);
        // Tallyfy rejected the token. One refresh runs however many requests saw it;
        // a kept request waits for it and goes again, a streamed one cannot.
        let Some(replay) = replay else {
            return Ok(clean(response));
        };
        let credential_name = shared.tokens.name(credential);
        Metrics::credential(&shared.metrics.single_flight_waiters, credential_name);
        // One refresh may take up to three calls (refresh, then password; or mint,
        // provision, mint). A failed or declined refresh releases the wait at once.
        let wait = shared.token_rules.fetch_timeout * 3 + Duration::from_secs(1);
        let Some(fresh) = shared.tokens.newer_than(credential, lease.generation, settled, wait).await else {
            return Ok(clean(response));
        };
        drop(response);
        log.replayed = true;
        Metrics::credential(&shared.metrics.replays, credential_name);
        let mut request = Request::new(Either::Left(Full::new(replay.body)));
        *request.method_mut() = replay.method;
        *request.uri_mut() = replay.uri;
        *request.version_mut() = replay.version;
        *request.headers_mut() = replay.headers;
        request.headers_mut().insert(AUTHORIZATION, fresh.authorization);
        let sent = Instant::now();
        let response = shared.upstream.send(request).await?;
        shared.metrics.upstream(&identity.name, sent.elapsed());
        log.upstream_status = Some(response.status());
        Ok(clean(response))
    }

    /// Every decision about a request that needs no I/O: checks the target and
    /// limits, identifies the caller, applies its policy, takes its token (one
    /// atomic load) and rewrites the head into the upstream request's. The hot
    /// path measured by the benches.
    pub fn prepare(&self, head: &mut Parts, connection: &ConnectionInfo) -> Result<Prepared<'_>, ProxyError> {
        let shared = &*self.shared;
        target::check(&head.method, head.version, &head.uri, shared.upstream.authority())?;
        headers::check_limits(&head.headers, shared.limits.max_headers, shared.limits.max_header_bytes)?;
        if declared_length(&head.headers).is_some_and(|n| n > shared.limits.max_request_body_bytes) {
            return Err(ProxyError::BodyTooLarge { limit: shared.limits.max_request_body_bytes });
        }
        let caller =
            Caller { headers: &head.headers, peer: connection.peer, cert_names: &connection.cert_names };
        let identity = shared.identities.identify(&caller).ok_or(ProxyError::UnknownCaller)?;
        if !identity.policy.is_unrestricted() {
            if let Some(aliased) = head.uri.path_and_query().and_then(|pq| identity.policy.resolve_alias(pq))
            {
                let mut parts = head.uri.clone().into_parts();
                parts.path_and_query = Some(aliased);
                head.uri =
                    Uri::from_parts(parts).map_err(|e| ProxyError::Internal(format!("aliased URI: {e}")))?;
            }
            identity
                .policy
                .authorize(&head.method, head.uri.path())
                .map_err(|denied| ProxyError::Forbidden(denied.reason()))?;
        }
        let lease = shared.tokens.lease(identity.credential, Instant::now()).map_err(|_| {
            ProxyError::TokenUnavailable {
                credential: shared.tokens.name(identity.credential).to_owned(),
                retry_after: TOKEN_RETRY_AFTER,
            }
        })?;
        head.uri = shared.upstream.uri_for(&head.uri)?;
        headers::to_upstream(&mut head.headers, lease.authorization.clone(), &shared.client_header);
        Ok(Prepared { identity, lease })
    }

    /// The whole body when it is known to fit `replay_max_body_bytes` (or empty),
    /// else the body to stream.
    async fn keep_if_small(
        &self,
        head: &Parts,
        body: Incoming,
    ) -> Result<Result<Bytes, Limited<Incoming>>, ProxyError> {
        let max = self.shared.token_rules.replay_max_body_bytes;
        if body.is_end_stream() {
            return Ok(Ok(Bytes::new()));
        }
        match declared_length(&head.headers) {
            Some(length) if length <= max => {
                // A slow caller may not hold a task forever: the kept body must
                // arrive within the upstream request timeout.
                let limit = self.shared.upstream.request_timeout();
                let collected = tokio::time::timeout(limit, Limited::new(body, length as usize).collect())
                    .await
                    .map_err(|_| ProxyError::BodyTimeout(limit))?;
                let bytes = collected.map_err(|e| ProxyError::BodyRead(e.to_string()))?.to_bytes();
                Ok(Ok(bytes))
            }
            _ => Ok(Err(self.limited(body))),
        }
    }

    fn limited(&self, body: Incoming) -> Limited<Incoming> {
        Limited::new(body, usize::try_from(self.shared.limits.max_request_body_bytes).unwrap_or(usize::MAX))
    }
}

/// Counts a request in flight for as long as it lives, even if the caller hangs
/// up and the handler future is dropped.
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn clean(mut response: Response<Incoming>) -> Response<Incoming> {
    headers::to_caller(response.headers_mut());
    response
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
