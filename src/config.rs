//! `proxy.toml`, parsed once into validated types.
//!
//! Loading is two steps: serde reads the file into [`raw`] types (unknown keys are
//! errors, with their line), then [`validate`] checks every value, resolves secrets
//! and produces a [`Config`] the rest of the proxy can trust without re-checking.
//! Any problem is a [`ConfigError`]: one line naming the file, the line and the key.

mod error;
mod raw;
mod secret_source;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};
use rustls_pki_types::CertificateDer;

pub use error::ConfigError;
pub use secret_source::SecretSource;

use crate::identity::Matcher;
use crate::secret::Secret;
use crate::tokens::CredentialId;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub file: PathBuf,
    pub listen: Listen,
    pub upstream: Upstream,
    pub server: Server,
    pub log: Log,
    /// Indexed by [`CredentialId`].
    pub credentials: Vec<Credential>,
    /// In match order: the first identity whose rule matches the caller wins.
    pub identities: Vec<Identity>,
    /// Things that work but deserve attention (plain-text secrets, for one).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Legacy apps send `/api/*` here.
    pub proxy: SocketAddr,
    /// `/livez`, `/readyz`.
    pub admin: SocketAddr,
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

#[derive(Debug, Clone)]
pub enum CredentialKind {
    /// A personal access token from Tallyfy's Settings > Integrations > REST API.
    PersonalToken { token: Secret },
}

impl CredentialKind {
    /// The `kind = "..."` value that selects this variant.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PersonalToken { .. } => "personal_token",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub credential: CredentialId,
    pub matcher: Matcher,
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
