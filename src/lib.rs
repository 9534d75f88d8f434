//! tallyfy-proxy: an authenticating reverse proxy in front of Tallyfy's REST API.
//!
//! Legacy apps that cannot do OAuth, bearer tokens or `X-Tallyfy-Client` are
//! pointed at the proxy instead of `https://go.tallyfy.com`. The proxy recognises
//! the calling app, swaps whatever it presented for the Tallyfy token its identity
//! is mapped to, adds the headers Tallyfy requires and streams the request on.
//!
//! # The journey of one request
//!
//! 1. [`server`] accepts the connection (HTTP/1.1 or h2c by its first bytes, or TLS
//!    with the client certificate's names from [`client_cert`]) under its timers and
//!    cap; tower-http marks the caller's credential headers sensitive. [`app`] loads
//!    the current config generation once: the request finishes on it even if
//!    [`reload`] swaps another in.
//! 2. [`proxy::Proxy::handle`] gives the request its id ([`request_id`]) and runs
//!    the pipeline:
//!    - [`target::check`]: only `/api/*` leaves the proxy; `CONNECT`, `TRACE`,
//!      foreign absolute-form targets, ambiguous decoded segments and `/api/oauth`
//!      are refused; [`target::host`]: one plain `Host`; [`framing::check`]: no
//!      length beside chunking, no codings but `chunked`;
//!    - [`headers::check_limits`] and the declared body size: 431 / 413;
//!    - [`identity`]: which `[[identities]]` rule the caller matches, or 401;
//!    - [`policy`]: the identity's orgs, methods and paths on the decoded path, a
//!      `_method` override judged as the method it names ([`method_override`]), or 403;
//!    - [`tokens::TokenStore::lease`]: the identity's token from one lock-free
//!      `ArcSwap` snapshot, or 503 `token_unavailable`;
//!    - [`upstream::Upstream::uri_for`] and [`headers::to_upstream`]: the configured
//!      host with the caller's path and query byte for byte; credentials stripped,
//!      bearer token and `X-Tallyfy-Client` set;
//!    - the body ([`rewrite`], [`dates`]): request dates rewritten byte-preservingly,
//!      kept when small enough to replay, otherwise streamed and size-capped;
//!    - [`upstream::Upstream::send`]: pooled rustls client, timeout on Tallyfy's
//!      silence ([`upload`]): 502 / 504 on failure;
//!    - on a dead-token status: the rejection goes to the refresher, one refresh
//!      runs however many requests saw it, and a kept request is replayed once;
//!    - [`headers::to_caller`] and [`links`]: hop-by-hop headers dropped, upstream
//!      URLs in JSON pointed back at the proxy.
//! 3. Any [`error::ProxyError`] becomes a JSON response in one place;
//!    [`access_log`] writes one line and [`metrics`] count the request when its
//!    response body ends.
//!
//! Beside the request path: the refresher ([`tokens::refresh`]) is the single
//! writer of a generation's token store; the reloader ([`reload`]) is the single
//! writer of the current generation; [`admin`] answers `/livez`, `/readyz` and
//! `/metrics`.
//!
//! # Modules
//! - [`config`]: `proxy.toml` -> validated [`config::Config`] (errors name file, line, key)
//! - [`app`]: wiring, used by the binary, the tests and the benches; [`reload`]: live reload
//! - [`server`], [`client_cert`]: accept loop, TLS, graceful drain
//! - [`proxy`], [`target`], [`framing`], [`headers`], [`request_id`], [`identity`],
//!   [`policy`], [`method_override`], [`upstream`], [`upload`], [`access_log`]: the pipeline
//! - [`rewrite`], [`dates`], [`links`]: body rewriting
//! - [`tokens`]: the token store, its refresher, the token endpoint client and schedule
//! - [`error`]: failures, classified, and their responses
//! - [`metrics`], [`admin`], [`telemetry`]: operations
//! - [`secret`]: values that cannot print
//! - [`sandbox_mode`]: the `sandbox` command (the `tallyfy-sandbox` crate behind the
//!   proxy), with the default `sandbox` feature

pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod client_cert;
pub mod config;
pub mod dates;
pub mod error;
pub mod framing;
pub mod headers;
pub mod identity;
pub(crate) mod json;
pub mod links;
pub mod method_override;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod request_id;
#[cfg(feature = "sandbox")]
pub mod sandbox_mode;
pub mod secret;
pub mod server;
pub mod target;
pub mod telemetry;
pub mod tokens;
pub mod upstream;
