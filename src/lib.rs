//! tallyfy-proxy: an authenticating reverse proxy in front of Tallyfy's REST API.
//!
//! Legacy apps that cannot do OAuth, bearer tokens or `X-Tallyfy-Client` are
//! pointed at the proxy instead of `https://go.tallyfy.com`. The proxy recognises
//! the calling app, swaps whatever it presented for the Tallyfy token its identity
//! is mapped to, adds the headers Tallyfy requires and streams the request on.
//!
//! # The journey of one request
//!
//! 1. [`server`] accepts the connection (HTTP/1.1 or h2c), enforces the header-read
//!    timeout and marks the caller's credential headers sensitive.
//! 2. [`proxy::Proxy::handle`] runs the pipeline:
//!    - [`target::check`]: only `/api/*` leaves the proxy; `CONNECT`, foreign
//!      absolute-form targets and dot segments are refused;
//!    - [`headers::check_limits`] and the declared body size: 431 / 413;
//!    - [`identity`]: which `[[identities]]` rule the caller matches, or 401;
//!    - [`tokens::TokenStore::authorization`]: the identity's token from one
//!      lock-free `ArcSwap` snapshot, or 503 `token_unavailable`;
//!    - [`upstream::Upstream::uri_for`] and [`headers::to_upstream`]: the configured
//!      host with the caller's path and query byte for byte; credentials stripped,
//!      bearer token and `X-Tallyfy-Client` set;
//!    - [`upstream::Upstream::send`]: pooled rustls client, body streamed and size
//!      capped, timeout to the response head: 502 / 504 on failure;
//!    - [`headers::to_caller`]: hop-by-hop headers dropped, the rest kept.
//! 3. Any [`error::ProxyError`] becomes a JSON response in one place, and
//!    [`access_log`] writes one line for the request.
//!
//! Beside the request path, [`admin`] answers `/livez` and `/readyz`, and whoever
//! obtains tokens publishes whole new snapshots into the [`tokens`] store.
//!
//! # Modules
//! - [`config`]: `proxy.toml` -> validated [`config::Config`] (errors name file, line, key)
//! - [`app`]: wiring, used by the binary, the tests and the benches
//! - [`server`]: accept loop and graceful drain
//! - [`proxy`], [`target`], [`headers`], [`identity`], [`upstream`], [`access_log`]: the pipeline
//! - [`tokens`]: the token store (read side)
//! - [`error`]: failures, classified, and their responses
//! - [`secret`]: values that cannot print
//! - [`sandbox`]: an embedded fake Tallyfy; [`demo`] runs it behind the proxy
//! - [`telemetry`]: log setup

pub mod access_log;
pub mod admin;
pub mod app;
pub mod client_cert;
pub mod config;
pub mod dates;
pub mod demo;
pub mod error;
pub mod headers;
pub mod identity;
pub mod links;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod rewrite;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod target;
pub mod telemetry;
pub mod tokens;
pub mod upload;
pub mod upstream;
