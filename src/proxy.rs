//! The request pipeline, phase by phase. Every failure becomes a response here,
//! through [`ProxyError::to_response`], and every request ends in one access-log line.
//!
//! ```text
//! check target -> check limits -> identify caller -> take token -> rewrite head -> send -> clean response
//!   404 / 400        431 / 413          401              503                          502 / 504 / 413
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

use crate::access_log::AccessLog;
use crate::config::{self, Config, Identity};
use crate::error::ProxyError;
use crate::headers;
use crate::identity::{Caller, Identities};
use crate::target;
use crate::tokens::TokenStore;
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
    client_header: HeaderValue,
    limits: config::Server,
}

impl Proxy {
    pub fn new(config: &Config, tokens: Arc<TokenStore>) -> Result<Proxy, rustls::Error> {
        Ok(Proxy {
            shared: Arc::new(Shared {
                upstream: Upstream::new(&config.upstream, config.server.max_request_body_bytes)?,
                identities: Identities::new(config.identities.clone()),
                tokens,
                client_header: config.upstream.client_header.clone(),
                limits: config.server.clone(),
            }),
        })
    }

    /// Handles one request from `peer` to the end: Tallyfy's response or a JSON error.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let mut log = AccessLog::start(&request, peer);
        let response = match self.forward(request, peer, &mut log).await {
            Ok(response) => response.map(Either::Left),
            Err(error) => {
                let response = error.to_response().map(Either::Right);
                log.failed(error);
                response
            }
        };
        log.finish(response.status());
        response
    }

    async fn forward<'a>(
        &'a self,
        request: Request<Incoming>,
        peer: SocketAddr,
        log: &mut AccessLog<'a>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (mut head, body) = request.into_parts();
        let identity = self.prepare(&mut head, peer)?;
        log.identity = Some(&identity.name);
        let body = Limited::new(
            body,
            usize::try_from(self.shared.limits.max_request_body_bytes).unwrap_or(usize::MAX),
        );
        let mut response = self.shared.upstream.send(Request::from_parts(head, body)).await?;
        log.upstream_status = Some(response.status());
        headers::to_caller(response.headers_mut());
        Ok(response)
    }

    /// Every decision about a request that needs no I/O: checks the target and
    /// limits, identifies the caller, takes its token (one atomic load) and rewrites
    /// the head into the upstream request's. The hot path measured by the benches.
    pub fn prepare(&self, head: &mut Parts, peer: SocketAddr) -> Result<&Identity, ProxyError> {
        let shared = &*self.shared;
        target::check(&head.method, head.version, &head.uri, shared.upstream.authority())?;
        headers::check_limits(&head.headers, shared.limits.max_headers, shared.limits.max_header_bytes)?;
        if declared_length(&head.headers).is_some_and(|n| n > shared.limits.max_request_body_bytes) {
            return Err(ProxyError::BodyTooLarge { limit: shared.limits.max_request_body_bytes });
        }
        let caller = Caller { headers: &head.headers, peer };
        let identity = shared.identities.identify(&caller).ok_or(ProxyError::UnknownCaller)?;
        let authorization =
            shared.tokens.authorization(identity.credential, Instant::now()).map_err(|_| {
                ProxyError::TokenUnavailable {
                    credential: shared.tokens.name(identity.credential).to_owned(),
                    retry_after: TOKEN_RETRY_AFTER,
                }
            })?;
        head.uri = shared.upstream.uri_for(&head.uri)?;
        headers::to_upstream(&mut head.headers, authorization, &shared.client_header);
        Ok(identity)
    }
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
