//! `proxy.toml`, parsed once into validated types.
//!
//! Loading is two steps: serde reads the file into `raw` types (unknown keys are
//! errors, with their line), then `validate` checks every value, resolves secrets
//! and produces a [`Config`] the rest of the proxy can trust without re-checking.
//! Any problem is a [`ConfigError`]: one line naming the file, the line and the key.

mod credentials;
mod ctx;
mod dates;
mod error;
mod fleet;
mod identities;
mod listen_tls;
mod raw;
mod secret_source;
mod server;
mod sources;
mod tokens;
mod traffic;
mod upstream;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::ConfigError;
pub use fleet::unverified_tls;
pub use secret_source::SecretSource;
pub use sources::{Fingerprint, files, fingerprint};

/// The most a config file may hold.
const CONFIG_FILE_MAX: u64 = 16 * 1024 * 1024;

// The domain types the file is translated into, under the names the file uses.
pub use crate::identity::Identity;
pub use crate::telemetry::LogFormat;
pub use crate::tokens::{Credential, CredentialId, CredentialKind, OAuthClient, Provision};
pub type Upstream = crate::upstream::Settings;
pub type Tokens = crate::tokens::Settings;
pub type Dates = crate::dates::Settings;
pub type Links = crate::links::Settings;
pub type Traffic = crate::traffic::Settings;
pub type Fleet = crate::fleet::Settings;

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
    /// Where each credential's secrets came from (for `check` and the file
    /// watcher), never the secrets themselves; indexed like `credentials`.
    pub credential_sources: Vec<Vec<(&'static str, SecretSource)>>,
    /// In match order: the first identity whose rule matches the caller wins.
    pub identities: Vec<Identity>,
    /// `[[limits]]`, `[upstream.retry]` and `upstream.retry_429_max_wait_ms`.
    pub traffic: Traffic,
    /// `[fleet]`: replicas sharing tokens through Redis; `None` runs alone.
    pub fleet: Option<Fleet>,
    /// Things that work but deserve attention (plain-text secrets, for one).
    pub warnings: Vec<String>,
    /// What the files it was read from held just after it was read ([`Config::load`]
    /// only): the reloader starts from this, so a file changed while the proxy
    /// was starting (or a reload was being applied) is still a change.
    pub loaded_from: Option<Fingerprint>,
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
    /// Paths outside `/api` are read as under it (`/me` as `/api/me`), for
    /// apps configured with Tallyfy's unprefixed host, `https://api.tallyfy.com`.
    pub unprefixed: bool,
}

#[derive(Debug, Clone)]
pub struct ListenTls {
    /// Certificate, key, ALPN (h2, http/1.1) and the client-certificate verifier.
    pub server_config: Arc<rustls::ServerConfig>,
    /// Whether callers must present a client certificate (`client_auth = "required"`).
    pub client_cert_required: bool,
    /// Whether client certificates are verified at all (`client_ca` given).
    pub verifies_client_certs: bool,
    /// Which of the client CAs constrain the names they vouch for.
    pub anchors: crate::client_cert::Anchors,
    /// SHA-256 over the certificate, key and client CA files, to notice changes.
    pub fingerprint: [u8; 32],
    /// Those files (as written: relative to the config file's directory),
    /// watched so a renewed certificate is noticed (and logged as taking
    /// effect after a restart).
    pub files: Vec<std::path::PathBuf>,
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
    /// A connection whose responses being sent make no progress (the caller
    /// takes nothing, or Tallyfy sends nothing) for this long is cut.
    pub send_timeout: Duration,
    /// Connections open at once on the proxy listener; more are closed at once.
    pub max_connections: usize,
    /// Bytes of request and response bodies held whole at once, all threads
    /// together (handed to each runtime thread in slabs).
    pub max_buffered_bytes: u64,
}

/// What hyper's parser is given at start ([`Server::header_ceilings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderCeilings {
    pub bytes: usize,
    pub fields: usize,
}

impl Server {
    /// Twice the header limits (16 KiB of head at least), so a reload may raise
    /// them that far and the proxy's own check (a JSON 431) speaks first.
    pub fn header_ceilings(&self) -> HeaderCeilings {
        HeaderCeilings { bytes: (self.max_header_bytes * 2).max(16 * 1024), fields: self.max_headers * 2 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

impl Config {
    /// Reads and validates the file at `path`, resolving secrets from the process
    /// environment and from files.
    ///
    /// Read twice: once to learn which files it reads, then, after their
    /// fingerprint is taken, the config that runs. A file changed in between is
    /// seen as a change by the reloader (one reload more at worst), never
    /// folded unread into the fingerprint.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = || {
            let cannot = |message: String| ConfigError {
                file: path.to_owned(),
                line: None,
                key: String::new(),
                message,
            };
            let bytes = sources::read_regular(path, CONFIG_FILE_MAX)
                .map_err(|e| cannot(format!("cannot read: {e}")))?;
            if bytes.len() as u64 > CONFIG_FILE_MAX {
                return Err(cannot("cannot read: larger than 16 MiB".into()));
            }
            let source =
                String::from_utf8(bytes).map_err(|_| cannot("cannot read: not UTF-8 text".into()))?;
            Self::parse(&source, path, &|name| std::env::var(name).ok())
        };
        let loaded_from = files(&read()?).map(|files| fingerprint(&files));
        let mut config = read()?;
        config.loaded_from = loaded_from;
        Ok(config)
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
