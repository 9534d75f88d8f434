//! `proxy.toml`, parsed once into validated types.
//!
//! Loading is two steps: serde reads the file into `raw` types (unknown keys are
//! errors, with their line), then `validate` checks every value, resolves secrets
//! and produces a [`Config`] the rest of the proxy can trust without re-checking.
//! Any problem is a [`ConfigError`]: one line naming the file, the line and the key.

mod credentials;
mod dates;
mod error;
mod identities;
mod listen_tls;
mod raw;
mod secret_source;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, StatusCode};
use rustls_pki_types::CertificateDer;

pub use error::ConfigError;
pub use secret_source::SecretSource;

use crate::dates::DateRules;
use crate::identity::Matcher;
use crate::policy::Policy;
use crate::secret::Secret;
use crate::tokens::CredentialId;
use crate::tokens::schedule::Schedule;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub file: PathBuf,
    pub listen: Listen,
    pub upstream: Upstream,
    pub server: Server,
    pub tokens: Tokens,
    pub dates: Dates,
    pub links: Links,
    pub log: Log,
    /// Indexed by [`CredentialId`].
    pub credentials: Vec<Credential>,
    /// In match order: the first identity whose rule matches the caller wins.
    pub identities: Vec<Identity>,
    /// Things that work but deserve attention (plain-text secrets, for one).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Listen {
    /// Legacy apps send `/api/*` here.
    pub proxy: SocketAddr,
    /// `/livez`, `/readyz`.
    pub admin: SocketAddr,
    /// TLS (and optionally mTLS) on the proxy listener; plain HTTP without it.
    pub tls: Option<ListenTls>,
    /// The proxy's URL as callers know it (`http://billing-proxy:8080`), for
    /// rewriting Tallyfy's absolute links; derived from each request's `Host`
    /// when absent.
    pub public_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListenTls {
    /// Certificate, key, ALPN (h2, http/1.1) and the client-certificate verifier.
    pub server_config: Arc<rustls::ServerConfig>,
    /// Whether callers must present a client certificate (`client_auth = "required"`).
    pub client_cert_required: bool,
    /// Whether client certificates are verified at all (`client_ca` given).
    pub verifies_client_certs: bool,
    /// SHA-256 over the certificate, key and client CA files, to notice changes.
    pub fingerprint: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path of `base_url` without its trailing slash (usually empty); the caller's
    /// path and query are appended to it byte for byte.
    pub path_prefix: String,
    /// `base_url` as configured, for messages and `check`.
    pub base_url: String,
    /// The OAuth token endpoint; the only other host the proxy ever talks to.
    pub token_url: http::Uri,
    /// Extra trusted roots from `ca_file`, on top of the webpki roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub ca_file: Option<PathBuf>,
    /// Value of `X-Tallyfy-Client` on every upstream request.
    pub client_header: HeaderValue,
    pub connect_timeout: Duration,
    /// From sending the request until the response head has arrived.
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

/// Limits and timeouts of the proxy listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// A client must send its whole request head within this time.
    pub header_read_timeout: Duration,
    /// Sum of header name and value lengths; above it: 431.
    pub max_header_bytes: usize,
    /// Number of header fields; above it: 431.
    pub max_headers: usize,
    /// Request bodies above it: 413 (checked on `Content-Length` and while streaming).
    pub max_request_body_bytes: u64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Connections open at once on the proxy listener; more are closed at once.
    pub max_connections: usize,
}

/// How tokens are obtained and kept fresh (`[tokens]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub schedule: Schedule,
    /// Timeout of one call to the token endpoint or the user-token route.
    pub fetch_timeout: Duration,
    /// Lifetime assumed when Tallyfy gives neither `expires_in` nor a JWT `exp`.
    pub default_lifetime: Duration,
    /// Upstream statuses that mean "this token is dead": refresh and replay once.
    pub dead_token_statuses: Vec<StatusCode>,
    /// Bodies up to this size are kept so a request can be replayed after a refresh.
    pub replay_max_body_bytes: u64,
    /// A rejection forces at most one refresh per credential in this interval.
    pub min_forced_refresh_interval: Duration,
}

/// Request date normalisation (`[dates]`).
#[derive(Debug, Clone)]
pub struct Dates {
    pub enabled: bool,
    /// The rules for identities without their own `date_input_order`.
    pub rules: Arc<DateRules>,
    /// Bodies that may hold dates are buffered up to this size; a larger one that
    /// needs rewriting is refused with 413.
    pub max_body_bytes: u64,
}

/// Response link rewriting (`[links]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Links {
    pub enabled: bool,
    /// JSON responses are buffered up to this size to rewrite their links; larger
    /// ones stream through untouched.
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub kind: CredentialKind,
    /// Where each secret came from (for `check`), never the secret itself.
    pub sources: Vec<(&'static str, SecretSource)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// A personal access token from Tallyfy's Settings > Integrations > REST API.
    PersonalToken { token: Secret },
    /// An application token from the `client_credentials` grant.
    ClientCredentials { client: OAuthClient, scope: Option<String> },
    /// A user token from the `password` grant, kept fresh with its refresh token.
    Password { client: OAuthClient, username: String, password: Secret, scope: Option<String> },
    /// A user token minted by an application for one of its org's users.
    ApplicationUser { application: CredentialId, org: String, email: String, provision: Option<Provision> },
}

impl CredentialKind {
    /// The `kind = "..."` value that selects this variant.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PersonalToken { .. } => "personal_token",
            Self::ClientCredentials { .. } => "client_credentials",
            Self::Password { .. } => "password",
            Self::ApplicationUser { .. } => "application_user",
        }
    }
}

/// An OAuth client of Tallyfy's (Laravel Passport) token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    pub id: String,
    pub secret: Secret,
}

/// How to create the user of an `application_user` credential when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provision {
    pub first_name: String,
    pub last_name: String,
    pub role: Option<String>,
    pub timezone: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub credential: CredentialId,
    pub matcher: Matcher,
    pub policy: Policy,
    /// The date rules for this identity's requests (its own `date_input_order`
    /// applied); `None` when date rewriting is off.
    pub dates: Option<Arc<DateRules>>,
}

impl Config {
    /// Reads and validates the file at `path`, resolving secrets from the process
    /// environment and from files.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&source, path, &|name| std::env::var(name).ok())
    }

    /// Validates TOML text. `file` names it in errors and anchors relative paths;
    /// `env` looks up `{ env = "NAME" }` secrets.
    pub fn parse(
        source: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        validate::parse(source, file, env)
    }

    pub fn credential(&self, id: CredentialId) -> &Credential {
        &self.credentials[id.index()]
    }
}

#[cfg(test)]
mod tests;
