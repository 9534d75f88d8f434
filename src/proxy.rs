//! The request pipeline. The journey it follows, step by step, is told once,
//! in the crate docs ([`crate`]); this module is that journey in code:
//! [`Proxy::handle`] (id, record, the one place a [`ProxyError`] becomes a
//! response) calls `forward` (prepare, body out, send, dead token, body back).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};

use crate::body::Finished;
use crate::body::Prefixed;
use crate::error::{ErrorClass, ProxyError};
use crate::headers::{self, X_REQUEST_ID, X_UPSTREAM_REQUEST_ID};
use crate::identity::Identities;
use crate::links::{ApiLocation, LinkScan};
use crate::metrics::{IdentityMetrics, Metrics};
use crate::request_id;
use crate::server::{CallerBody, ConnectionInfo};
use crate::tokens::refresh::RefreshHandle;
use crate::tokens::{CredentialId, CredentialTokens};
use crate::traffic::{CountedRequest, Traffic, throttle};
use crate::upstream::{Outbound, Tenant, Upstream, UpstreamBody};
use crate::{dates, links, tokens};

mod prepare;
mod record;
mod replay;
mod request_body;
mod response_body;
mod send;
mod settings;

pub use prepare::Prepared;
use record::RequestRecord;
use replay::Replay;
use request_body::Outgoing;
use response_body::LinksTo;
use send::{Answer, SentWith, Target};
pub use settings::{RequestLimits, Settings};

/// What callers receive: Tallyfy's body streamed (after any part read for link
/// rewriting), or a body the proxy wrote (a rewritten one, or a JSON error).
pub type ProxyBody = Either<Prefixed<UpstreamBody>, Full<Bytes>>;

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
    tokens: CredentialTokens,
    refresher: RefreshHandle,
    metrics: Arc<Metrics>,
    limits: RequestLimits,
    token_rules: tokens::Settings,
    dates: dates::Settings,
    links: links::Settings,
    /// `scheme://host[/prefix]` of Tallyfy, as it writes absolute links.
    upstream_base: String,
    /// The pre-scan for those links.
    link_scan: LinkScan,
    /// `{upstream_base}/api/` as a `Location` may spell it.
    api_location: ApiLocation,
    /// `listen.public_url`, or `None` to derive it from each request.
    public_url: Option<String>,
    /// Scheme of the proxy listener, for derived public URLs.
    listener_scheme: &'static str,
    /// Local limits, remembered 429s and retries of this generation.
    traffic: Traffic,
    /// `listen.unprefixed`.
    unprefixed: bool,
    /// Each identity's request figures, resolved on its first request.
    identity_metrics: Box<[OnceLock<Arc<IdentityMetrics>>]>,
    /// The figures of callers no identity matched.
    unidentified: OnceLock<Arc<IdentityMetrics>>,
}

impl Shared {
    fn identity_metrics(&self, index: usize) -> &IdentityMetrics {
        let name = &self.identities.get(index).name;
        self.identity_metrics[index].get_or_init(|| self.metrics.requests.identity(name))
    }

    /// The name and figures of the identity at `index`, or of unknown callers.
    fn identity_figures(&self, index: Option<usize>) -> (&str, &IdentityMetrics) {
        match index {
            Some(index) => (&self.identities.get(index).name, self.identity_metrics(index)),
            None => ("-", self.unidentified.get_or_init(|| self.metrics.requests.identity("-"))),
        }
    }
}

impl Proxy {
    pub fn new(
        settings: Settings,
        upstream: Upstream,
        tokens: CredentialTokens,
        refresher: RefreshHandle,
        metrics: Arc<Metrics>,
        traffic: Traffic,
    ) -> Proxy {
        let Settings {
            identities,
            limits,
            tokens: token_rules,
            dates,
            links,
            public_url,
            listener_scheme,
            unprefixed,
        } = settings;
        let identity_metrics = identities.iter().map(|_| OnceLock::new()).collect();
        Proxy {
            shared: Arc::new(Shared {
                upstream_base: upstream.base(),
                link_scan: LinkScan::new(&upstream.origin()),
                api_location: ApiLocation::new(&upstream.base()),
                upstream,
                identities: Identities::new(identities),
                tokens,
                refresher,
                metrics,
                limits,
                token_rules,
                dates,
                links,
                public_url,
                listener_scheme,
                traffic,
                unprefixed,
                identity_metrics,
                unidentified: OnceLock::new(),
            }),
        }
    }

    /// The tokens this generation's credentials read.
    pub fn tokens(&self) -> &CredentialTokens {
        &self.shared.tokens
    }

    /// What bodies (and long unfinished heads) held in memory are counted
    /// against: `server.max_buffered_bytes`.
    pub fn buffer_budget(&self) -> crate::body::Budget {
        self.shared.limits.buffer_budget
    }

    /// Handles one request to the end: Tallyfy's response or a JSON error.
    ///
    /// Not an `async fn`: the request's future would keep the request twice
    /// (as its argument and as the local it is moved into), and every
    /// request's future is allocated and copied whole. What needs no waiting
    /// is done here, before the future is made.
    pub fn handle(
        self,
        mut request: Request<CallerBody>,
        connection: Arc<ConnectionInfo>,
    ) -> impl Future<Output = Response<Finished<ProxyBody, RequestRecord>>> + Send + 'static {
        headers::mark_sensitive(request.headers_mut());
        let request_id = request_id::for_request(request.headers());
        request.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        let mut log =
            RequestRecord::start(&request, connection.peer, request_id.clone(), self.shared.clone());
        async move {
            let response = match self.forward(request, &connection, &mut log).await {
                Ok(response) => response,
                Err(error) => {
                    let response = error.to_response().map(Either::Right);
                    if error.class() == ErrorClass::Caller
                        || matches!(error, ProxyError::TokenUnavailable { .. })
                    {
                        self.shared.metrics.rejected(error.code());
                    }
                    log.failed(error);
                    response
                }
            };
            let mut response = response;
            log.upstream_request_id = response.headers().get(X_UPSTREAM_REQUEST_ID).cloned();
            response.headers_mut().insert(X_REQUEST_ID, request_id);
            log.head_ready(response.status());
            response.map(|body| Finished::new(body, log))
        }
    }

    async fn forward(
        &self,
        request: Request<CallerBody>,
        connection: &ConnectionInfo,
        log: &mut RequestRecord,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let shared = &*self.shared;
        let (mut head, body) = request.into_parts();
        let Prepared { identity, index, lease, links_to, admitted, fleet_budgets } =
            self.prepare(&mut head, connection)?;
        log.identity = Some(index);
        log.place = admitted.place;
        let figures = shared.identity_metrics(index);
        let credential = identity.credential;
        let target =
            Target { method: head.method.clone(), uri: head.uri.clone(), rule: admitted.rule, credential };
        // Until it is sent, a refusal (or the caller's going away) gives back
        // what the limits counted.
        let unsent = shared.traffic.unsent(CountedRequest {
            identity: index,
            credential: credential.index(),
            method: &target.method,
            path: shared.upstream.received_path(&target.uri),
            at: admitted.at,
            fleet: fleet_budgets.as_deref(),
        });
        // The rare paths are boxed (here and below): a future has room for its
        // largest await, and every request's future is allocated and moved whole.
        let lease = match lease {
            Some(lease) => lease,
            None => {
                let lease = Box::pin(self.first_token(credential)).await?;
                head.headers.insert(http::header::AUTHORIZATION, lease.authorization.clone());
                lease
            }
        };
        let mut sent_with = SentWith { generation: lease.generation, token: None };
        if !admitted.delay.is_zero() {
            // Tallyfy's last 429 for this credential lifts within upstream.retry_429_max_wait_ms.
            log.throttle = Some("waited");
            let asleep = throttle::spread(admitted.delay, rand::random());
            Box::pin(tokio::time::sleep(asleep)).await;
        }
        let Outgoing { body, kept, waited } = self.request_body(&mut head, body, identity).await?;
        if !admitted.delay.is_zero() || waited {
            // Time passed: the token may have been replaced, or have expired.
            if let Some(token) = self.token_since(credential, &mut sent_with)? {
                head.headers.insert(http::header::AUTHORIZATION, token);
            }
        }
        if let Some(spend) = &fleet_budgets {
            Box::pin(self.spend_fleet_wide(spend)).await?;
        }
        unsent.sent();
        // Boxed: only kept (OAuth) requests have one, and this future is copied whole.
        let tenant = Tenant(credential.index());
        let replay = kept.map(|body| Box::new(Replay::of(&head, body, tenant)));
        let mut first = Outbound::new(head, body, tenant);
        let response =
            match self.send(&mut first, replay.as_deref(), &target, &mut sent_with, log, figures).await? {
                Answer::Streaming(response) => response,
                Answer::Read(response) => return Ok(response),
            };
        if !shared.token_rules.dead_token_statuses.contains(&response.status())
            || !shared.tokens.is_refreshable(credential)
        {
            return self.response(response, &links_to).await;
        }
        let rejected = Rejected { response, replay, generation: sent_with.generation };
        Box::pin(self.token_rejected(rejected, &target, &links_to, log, figures)).await
    }

    /// The credential's first token, once its first fetch ends with one (a
    /// 503 when it fails, or takes longer than a refresh may).
    async fn first_token(&self, credential: CredentialId) -> Result<tokens::Lease, ProxyError> {
        let shared = &*self.shared;
        let slot = shared.tokens.slot(credential);
        Metrics::credential(&shared.metrics.single_flight_waiters, &shared.tokens.name(credential));
        let wait = shared.token_rules.refresh_wait();
        shared
            .tokens
            .store()
            .newer_than(slot, 0, 0, wait)
            .await
            .ok_or_else(|| self.token_unavailable(credential))
    }

    /// Tallyfy rejected the token. One refresh runs however many requests saw it;
    /// a kept request waits for it and goes again, a streamed one cannot.
    async fn token_rejected(
        &self,
        rejected: Rejected,
        target: &Target,
        links_to: &LinksTo,
        log: &mut RequestRecord,
        figures: &IdentityMetrics,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let shared = &*self.shared;
        let Rejected { response, replay, generation } = rejected;
        let credential = target.credential;
        let slot = shared.tokens.slot(credential);
        let store = shared.tokens.store();
        let settled = store.settled(slot);
        shared.refresher.token_rejected(slot, generation);
        let Some(replay) = replay else {
            return self.response(response, links_to).await;
        };
        let credential_name = shared.tokens.name(credential);
        Metrics::credential(&shared.metrics.single_flight_waiters, &credential_name);
        // A failed or declined refresh releases the wait at once.
        let wait = shared.token_rules.refresh_wait();
        let Some(fresh) = store.newer_than(slot, generation, settled, wait).await else {
            return self.response(response, links_to).await;
        };
        drop(response);
        log.replayed = true;
        Metrics::credential(&shared.metrics.replays, &credential_name);
        // Sent as any request is: retried, and a 429 remembered, as
        // `[upstream.retry]` and Tallyfy's limits say; a second dead-token
        // answer is passed on.
        let mut sent_with = SentWith { generation: fresh.generation, token: Some(fresh.authorization) };
        let mut outbound = replay.outbound(sent_with.token.clone());
        match self.deliver(&mut outbound, Some(&replay), target, &mut sent_with, log, figures).await? {
            Answer::Streaming(response) => self.response(response, links_to).await,
            Answer::Read(response) => Ok(response),
        }
    }
}

/// A response whose status says Tallyfy refused the token it was sent with.
struct Rejected {
    response: Response<UpstreamBody>,
    replay: Option<Box<Replay>>,
    /// The token generation the request was sent with.
    generation: u64,
}
