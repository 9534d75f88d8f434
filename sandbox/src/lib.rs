//! tallyfy-sandbox: a fake Tallyfy for `tallyfy-proxy sandbox` and the proxy's tests.
//!
//! It mirrors the parts of Tallyfy's REST API the proxy relies on (see
//! `TALLYFY_API.md`): the Laravel Passport token endpoint (client credentials,
//! password and rotating refresh grants), the application user-token flow,
//! a handful of resource routes with Tallyfy's date format and pagination, and
//! streaming upload/download routes. It records every request it receives and
//! lets a test inject token-endpoint faults or revoke tokens.
//!
//! Routes (every `/api` route but the token endpoint needs `X-Tallyfy-Client`):
//! - `POST /api/oauth/token`, `POST /oauth/token`: form-encoded grants.
//! - Application token: `POST /api/applications/{org}/users/{email}/token`,
//!   `POST /api/applications/{org}/users`.
//! - User or personal token: `GET /api/me`, `GET /api/me/organizations`, and under
//!   `/api/organizations/{org}`: `GET me/tasks`, `GET|POST tasks`, `PUT tasks/{task}`,
//!   `GET|POST runs`, `PUT runs/{run}/tasks/{task}`, `POST guests`, `POST file`,
//!   `GET file/{id}/dl?bytes=N`.
//!
//! Decisions where Tallyfy is vague:
//! - An application token on a user route, and a user or personal token on an
//!   application route, get 401 `{"message":"Unauthenticated."}`: Laravel's guard
//!   finds no principal of the right kind.
//! - `revoke_all_tokens` kills access tokens only; refresh tokens stay redeemable.
//! - Routes are matched before authentication (Laravel order): an unknown route is
//!   404 even without a token. `X-Tallyfy-Client` is checked before both.
//! - `X-RateLimit-*` headers are informational; the sandbox never answers 429.
//! - `client_credentials` is for the application client, `password` for the user
//!   client (the other gets 401 `invalid_client`); a refresh token only redeems
//!   with the client it was issued to.
//! - Every body is read as a stream (hashed, counted, first 1 MiB kept) before
//!   routing; a JSON body over 1 MiB is 413.
//! - `prerun`/`taskdata` keys other than the fixture field IDs are 422.
//!
//! It knows nothing of the proxy: a crate of its own, depending only on
//! external crates, so the proxy can be built without it.

// Handlers short-circuit with the error `Reply` itself (`Result<Reply, Reply>`); a
// response is ~128 bytes, moved once per request, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod fixtures;

mod applications;
mod auth;
mod body;
mod dates;
mod encoding;
mod files;
mod oauth;
mod pagination;
mod people;
mod respond;
mod router;
mod runs;
mod seed;
mod server;
mod state;
mod store;
mod tasks;
mod tokens;
mod validation;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use self::state::Shared;

/// How the sandbox behaves; `Default` mirrors the project's specification.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// strftime format every request date must match exactly.
    pub request_date_format: String,
    /// `expires_in` of tokens from the token endpoint.
    pub token_lifetime: Duration,
    /// `expires_in` of application-minted user tokens.
    pub user_token_lifetime: Duration,
    /// Base of absolute links (`links.next`); default `http(s)://{local addr}`
    /// followed by `path_prefix`.
    pub public_base_url: Option<String>,
    /// A path the API is served under (Tallyfy behind a prefix: `/tallyfy`
    /// serves `/tallyfy/api/...`; no trailing slash); empty by default. Any
    /// other path gets a plain 404.
    pub path_prefix: String,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            request_date_format: "%Y-%d-%m %H:%M:%S".to_owned(),
            token_lifetime: Duration::from_secs(3600),
            user_token_lifetime: Duration::from_secs(3600),
            public_base_url: None,
            path_prefix: String::new(),
        }
    }
}

/// One request as it reached the sandbox. `Debug` redacts credential headers.
#[derive(Clone)]
pub struct ReceivedRequest {
    pub method: http::Method,
    /// Path and query exactly as received.
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// The first 1 MiB of the body.
    pub body: bytes::Bytes,
    /// The full body length (what arrived before the body ended or failed).
    pub body_len: u64,
    /// The body ended as its framing says (not cut off by a reset or a close).
    pub body_complete: bool,
    /// Trailer fields sent after the body (empty when none came).
    pub trailers: http::HeaderMap,
}

const REDACTED_HEADERS: [&str; 4] = ["authorization", "cookie", "x-api-key", "proxy-authorization"];

impl fmt::Debug for ReceivedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(name, value)| {
                let shown = if REDACTED_HEADERS.contains(&name.as_str()) {
                    "[redacted]".to_owned()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                };
                (name.as_str(), shown)
            })
            .collect();
        f.debug_struct("ReceivedRequest")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("version", &self.version)
            .field("headers", &headers)
            .field("body_len", &self.body_len)
            .field("body_complete", &self.body_complete)
            .field("trailers", &self.trailers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One call of the token endpoint or of the user-token mint route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// `grant_type` as sent (empty when absent or unreadable); `"user_token"` for a mint.
    pub grant: String,
    pub client_id: Option<String>,
    /// The status sent; 0 when the connection was dropped without an answer.
    pub answered: u16,
}

/// A failure the token endpoint and the user-token mint route simulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenFault {
    /// 500 `{"error":"server_error","message":...}`.
    ServerError,
    /// 503 with an HTML maintenance page.
    Maintenance,
    /// 200 with an empty body.
    Empty,
    /// 200 `text/plain`, not JSON.
    Garbage,
    /// 200 JSON without `access_token`.
    MissingToken,
    /// 200 JSON with an `access_token` and 1 MiB of padding beside it: an
    /// answer no client should read whole.
    Oversized,
    /// Answers correctly after the delay.
    Slow(Duration),
    /// Closes the connection without answering (HTTP/2: resets the stream).
    Drop,
}

/// An answer API routes give on demand ([`Sandbox::fail_api`]), before routing
/// and authentication, as Tallyfy's throttling and load balancers answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiFault {
    /// 429 as the burst throttling answers: `{"message":"Too Many Attempts."}`,
    /// with `Retry-After` when given.
    Throttled { retry_after: Option<u64> },
    /// 429 as an hourly cap answers: `Retry-After` and a body whose `code` is
    /// `RATE_LIMIT_EXCEEDED`.
    HourlyCap { retry_after: u64 },
    /// This status with a short JSON body (502, 503, 504 from a load balancer).
    Status(u16),
}

/// A running sandbox. Dropping it (or [`Sandbox::shutdown`]) stops the server.
pub struct Sandbox {
    addr: SocketAddr,
    base_url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Serves plain HTTP/1.1 and h2c on `listener`; ready when this returns.
    pub async fn start(listener: TcpListener, config: SandboxConfig) -> std::io::Result<Sandbox> {
        Self::launch(listener, config, None)
    }

    /// Serves the same API over TLS. ALPN defaults to `h2`, `http/1.1` when `tls` sets none.
    pub async fn start_tls(
        listener: TcpListener,
        config: SandboxConfig,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Sandbox> {
        Self::launch(listener, config, Some(tls))
    }

    fn launch(
        listener: TcpListener,
        config: SandboxConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Sandbox> {
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{addr}");
        let shared = Arc::new(Shared::new(config, &base_url));
        let task = server::spawn(listener, Arc::clone(&shared), tls);
        tracing::debug!(%base_url, "sandbox listening");
        Ok(Sandbox { addr, base_url, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (https for TLS), no trailing slash.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn token_url(&self) -> String {
        format!("{}/api/oauth/token", self.base_url)
    }

    /// Every request that reached the sandbox, oldest first (the last 10 000).
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.shared.lock().log.received()
    }

    pub fn clear_received(&self) {
        self.shared.lock().log.clear_received();
    }

    /// Every token-endpoint call and user-token mint, oldest first.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.shared.lock().log.token_requests()
    }

    /// How often an already-redeemed refresh token was presented.
    pub fn double_redemptions(&self) -> usize {
        self.shared.lock().tokens.double_redemptions()
    }

    /// Applies to `/api/oauth/token` and the user-token mint; `None` clears it.
    pub fn set_token_fault(&self, fault: Option<TokenFault>) {
        self.shared.lock().fault = fault;
    }

    /// The next `times` API requests whose path contains `path` get `fault`
    /// (each call adds a rule; the first matching rule with answers left wins).
    pub fn fail_api(&self, path: &str, times: u32, fault: ApiFault) {
        self.shared.lock().api_faults.push((path.to_owned(), times, fault));
    }

    /// API requests received whose path starts with `prefix`, by method.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        let log = self.shared.lock();
        log.log
            .received()
            .iter()
            .filter(|r| r.method == method && r.uri.split('?').next().is_some_and(|p| p.starts_with(prefix)))
            .count()
    }

    /// Lifetime of tokens the token endpoint issues from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = lifetime;
    }

    /// Every issued access token (not the personal token) answers 401 from now on.
    pub fn revoke_all_tokens(&self) {
        self.shared.lock().tokens.revoke_all();
    }

    /// Every refresh token becomes unknown (`invalid_grant` when redeemed).
    pub fn revoke_refresh_tokens(&self) {
        self.shared.lock().tokens.revoke_refresh_tokens();
    }

    pub fn revoke_personal_token(&self) {
        self.shared.lock().tokens.set_personal_revoked(true);
    }

    pub fn restore_personal_token(&self) {
        self.shared.lock().tokens.set_personal_revoked(false);
    }

    /// A rolling restart, as Tallyfy's load balancer shows it: the address stays
    /// up, and every connection open now is closed after its next response
    /// (`Connection: close`), so clients reconnect to the "new instance".
    pub fn restart_connections(&self) {
        self.shared.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}
