//! Raw file types -> validated [`Config`], with a line number for every complaint.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Scheme, Uri};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use toml::Spanned;

use super::error::line_of;
use super::raw::{RawConfig, RawServer, RawTokens, RawUpstream};
use super::{Config, ConfigError, Listen, Log, LogFormat, Server, Tokens, Upstream};
use super::{credentials, dates, identities, listen_tls};
use crate::identity::Matcher;
use crate::tokens::schedule::Schedule;

pub const DEFAULT_TOKEN_PATH: &str = "/api/oauth/token";
pub const DEFAULT_CLIENT_HEADER: &str = "APIClient";

/// Parsing context: turns spans into lines and builds errors.
pub(super) struct Ctx<'a> {
    pub file: &'a Path,
    pub source: &'a str,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    pub fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: span.map(|s| line_of(self.source, s.start)),
            key: key.into(),
            message: msg.into(),
        }
    }

    pub fn at<T>(&self, value: &Spanned<T>, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        self.err(Some(value.span()), key, msg)
    }

    pub fn base_dir(&self) -> PathBuf {
        self.file.parent().map(Path::to_owned).unwrap_or_default()
    }
}

pub fn parse(source: &str, file: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, source, env };
    let raw = read_raw(&ctx)?;
    let mut warnings = Vec::new();

    let listen = Listen {
        proxy: socket_addr(&ctx, &raw.listen.proxy, "listen.proxy")?,
        admin: socket_addr(&ctx, &raw.listen.admin, "listen.admin")?,
        tls: raw.listen.tls.as_ref().map(|tls| listen_tls::validate(&ctx, tls)).transpose()?,
        public_url: match &raw.listen.public_url {
            None => None,
            Some(url) => {
                let parsed = http_url(&ctx, url, "listen.public_url")?;
                if parsed.path() != "/" || parsed.query().is_some() {
                    return Err(ctx.at(
                        url,
                        "listen.public_url",
                        "give scheme and host only, e.g. \"http://tallyfy-proxy:8080\"",
                    ));
                }
                Some(url.get_ref().trim_end_matches('/').to_owned())
            }
        },
    };
    if listen.proxy == listen.admin && listen.proxy.port() != 0 {
        return Err(ctx.at(&raw.listen.admin, "listen.admin", "must differ from listen.proxy"));
    }
    let upstream = upstream(&ctx, &raw.upstream)?;
    let server = server(&ctx, &raw.server)?;
    let tokens = tokens(&ctx, &raw.tokens)?;
    let dates = dates::dates(&ctx, &raw.dates)?;
    let links = dates::links(&ctx, &raw.links)?;
    let log = Log {
        format: match raw.log.format.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "text")) => LogFormat::Text,
            Some((_, "json")) => LogFormat::Json,
            Some((f, other)) => {
                return Err(ctx.at(f, "log.format", format!("must be \"text\" or \"json\", not {other:?}")));
            }
        },
        level: match &raw.log.level {
            None => "info".to_owned(),
            Some(level) => {
                tracing_subscriber::EnvFilter::builder()
                    .parse(level.get_ref())
                    .map_err(|e| ctx.at(level, "log.level", format!("not a valid filter: {e}")))?;
                level.get_ref().clone()
            }
        },
    };

    let (credentials, credential_sources) = credentials::validate(&ctx, &raw.credentials, &mut warnings)?;
    let identities = identities::validate(&ctx, &raw.identities, &credentials, &dates)?;
    let verifies_certs = listen.tls.as_ref().is_some_and(|tls| tls.verifies_client_certs);
    let first_cert_rule =
        identities.iter().position(|identity| matches!(identity.matcher, Matcher::ClientCert { .. }));
    if let Some(i) = first_cert_rule
        && !verifies_certs
    {
        return Err(ctx.at(
            &raw.identities[i].get_ref().matcher,
            format!("identities[{i}].match.client_cert"),
            "needs [listen] tls = { ..., client_ca = \"PEM\" } so client certificates are verified",
        ));
    }

    Ok(Config {
        file: file.to_owned(),
        listen,
        upstream,
        server,
        tokens,
        dates,
        links,
        log,
        credentials,
        credential_sources,
        identities,
        warnings,
    })
}

fn read_raw(ctx: &Ctx<'_>) -> Result<RawConfig, ConfigError> {
    let deserializer =
        toml::Deserializer::parse(ctx.source).map_err(|e| ctx.err(e.span(), "", first_line(e.message())))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ctx.err(inner.span(), if key == "." { String::new() } else { key }, first_line(inner.message()))
    })
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().trim().to_owned()
}

fn socket_addr(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
    value.get_ref().parse().map_err(|_| {
        ctx.at(
            value,
            key,
            format!("{:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")", value.get_ref()),
        )
    })
}

fn millis(
    ctx: &Ctx<'_>,
    value: Option<&Spanned<u64>>,
    key: &str,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_millis(default_ms)),
        Some(v) if *v.get_ref() == 0 => Err(ctx.at(v, key, "must be greater than 0")),
        Some(v) => Ok(Duration::from_millis(*v.get_ref())),
    }
}

pub(super) fn http_url(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<Uri, ConfigError> {
    let text = value.get_ref();
    let uri: Uri = text.parse().map_err(|e| ctx.at(value, key, format!("{text:?} is not a URL: {e}")))?;
    let scheme_ok = uri.scheme() == Some(&Scheme::HTTP) || uri.scheme() == Some(&Scheme::HTTPS);
    if !scheme_ok || uri.authority().is_none() {
        return Err(ctx.at(
            value,
            key,
            format!("{text:?} must start with http:// or https:// and name a host"),
        ));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ctx.at(value, key, "must not carry credentials in the URL"));
    }
    Ok(uri)
}

fn upstream(ctx: &Ctx<'_>, raw: &RawUpstream) -> Result<Upstream, ConfigError> {
    let base = http_url(ctx, &raw.base_url, "upstream.base_url")?;
    if base.query().is_some() {
        return Err(ctx.at(&raw.base_url, "upstream.base_url", "must not have a query string"));
    }
    let path_prefix = base.path().trim_end_matches('/').to_owned();
    if path_prefix.ends_with("/api") {
        return Err(ctx.at(&raw.base_url, "upstream.base_url", "give the host only (\"https://go.tallyfy.com\"): the caller's /api/... path is appended as received"));
    }
    let token_url = match &raw.token_url {
        Some(url) => http_url(ctx, url, "upstream.token_url")?,
        None => format!(
            "{}://{}{}{DEFAULT_TOKEN_PATH}",
            base.scheme_str().unwrap_or("https"),
            base.authority().map(|a| a.as_str()).unwrap_or_default(),
            path_prefix
        )
        .parse()
        .map_err(|e| {
            ctx.at(&raw.base_url, "upstream.token_url", format!("cannot derive from base_url: {e}"))
        })?,
    };
    let (ca_file, extra_roots) = match &raw.ca_file {
        None => (None, Vec::new()),
        Some(path) => {
            let full = ctx.base_dir().join(path.get_ref());
            let certs = CertificateDer::pem_file_iter(&full)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    ctx.at(
                        path,
                        "upstream.ca_file",
                        format!("cannot read PEM certificates from {}: {e}", full.display()),
                    )
                })?;
            if certs.is_empty() {
                return Err(ctx.at(
                    path,
                    "upstream.ca_file",
                    format!("{} holds no PEM certificate", full.display()),
                ));
            }
            (Some(full), certs)
        }
    };
    let client_header = match &raw.client_header {
        None => HeaderValue::from_static(DEFAULT_CLIENT_HEADER),
        Some(v) => HeaderValue::from_str(v.get_ref()).ok().filter(|h| !h.is_empty()).ok_or_else(|| {
            ctx.at(v, "upstream.client_header", "must be a non-empty, visible-ASCII header value")
        })?,
    };
    Ok(Upstream {
        scheme: base.scheme().cloned().expect("http_url checked the scheme"),
        authority: base.authority().cloned().expect("http_url checked the authority"),
        path_prefix,
        base_url: raw.base_url.get_ref().clone(),
        token_url,
        extra_roots,
        ca_file,
        client_header,
        connect_timeout: millis(ctx, raw.connect_timeout_ms.as_ref(), "upstream.connect_timeout_ms", 2_000)?,
        request_timeout: millis(ctx, raw.request_timeout_ms.as_ref(), "upstream.request_timeout_ms", 30_000)?,
        pool_idle_timeout: millis(
            ctx,
            raw.pool_idle_timeout_ms.as_ref(),
            "upstream.pool_idle_timeout_ms",
            90_000,
        )?,
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(64),
    })
}

fn server(ctx: &Ctx<'_>, raw: &RawServer) -> Result<Server, ConfigError> {
    let positive = |v: Option<&Spanned<usize>>, key: &str, default: usize| match v {
        None => Ok(default),
        Some(v) if *v.get_ref() == 0 => Err(ctx.at(v, key, "must be greater than 0")),
        Some(v) => Ok(*v.get_ref()),
    };
    Ok(Server {
        header_read_timeout: millis(
            ctx,
            raw.header_read_timeout_ms.as_ref(),
            "server.header_read_timeout_ms",
            10_000,
        )?,
        max_header_bytes: positive(raw.max_header_bytes.as_ref(), "server.max_header_bytes", 32 * 1024)?,
        max_headers: positive(raw.max_headers.as_ref(), "server.max_headers", 100)?,
        max_request_body_bytes: match &raw.max_request_body_bytes {
            None => 100 * 1024 * 1024,
            Some(v) if *v.get_ref() == 0 => {
                return Err(ctx.at(v, "server.max_request_body_bytes", "must be greater than 0"));
            }
            Some(v) => *v.get_ref(),
        },
        shutdown_grace: millis(ctx, raw.shutdown_grace_ms.as_ref(), "server.shutdown_grace_ms", 25_000)?,
        idle_timeout: millis(ctx, raw.idle_timeout_ms.as_ref(), "server.idle_timeout_ms", 60_000)?,
        max_connections: positive(raw.max_connections.as_ref(), "server.max_connections", 10_000)?,
    })
}

fn tokens(ctx: &Ctx<'_>, raw: &RawTokens) -> Result<Tokens, ConfigError> {
    let defaults = Schedule::default();
    let schedule = Schedule {
        min_leeway: millis(
            ctx,
            raw.refresh_leeway_ms.as_ref(),
            "tokens.refresh_leeway_ms",
            defaults.min_leeway.as_millis() as u64,
        )?,
        backoff_min: millis(
            ctx,
            raw.retry_min_ms.as_ref(),
            "tokens.retry_min_ms",
            defaults.backoff_min.as_millis() as u64,
        )?,
        backoff_max: millis(
            ctx,
            raw.retry_max_ms.as_ref(),
            "tokens.retry_max_ms",
            defaults.backoff_max.as_millis() as u64,
        )?,
    };
    if schedule.backoff_max < schedule.backoff_min {
        let at = raw.retry_max_ms.as_ref().or(raw.retry_min_ms.as_ref()).map(Spanned::span);
        return Err(ctx.err(at, "tokens.retry_max_ms", "must not be below tokens.retry_min_ms"));
    }
    let dead_token_statuses = match &raw.dead_token_statuses {
        None => vec![http::StatusCode::UNAUTHORIZED],
        Some(list) => list
            .get_ref()
            .iter()
            .map(|&code| {
                http::StatusCode::from_u16(code)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .ok_or_else(|| {
                        ctx.at(
                            list,
                            "tokens.dead_token_statuses",
                            format!("{code} is not a 4xx or 5xx status"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Tokens {
        schedule,
        fetch_timeout: millis(ctx, raw.fetch_timeout_ms.as_ref(), "tokens.fetch_timeout_ms", 10_000)?,
        default_lifetime: millis(
            ctx,
            raw.default_lifetime_ms.as_ref(),
            "tokens.default_lifetime_ms",
            3_600_000,
        )?,
        dead_token_statuses,
        replay_max_body_bytes: raw.replay_max_body_bytes.unwrap_or(1024 * 1024),
        min_forced_refresh_interval: Duration::from_millis(
            raw.min_forced_refresh_interval_ms.unwrap_or(5_000),
        ),
    })
}

/// A name for credentials and identities: also a metric label later, so tame.
pub(super) fn name(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let name = value.get_ref();
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        return Err(ctx.at(value, key, "names use letters, digits, '-', '_' and '.' only"));
    }
    Ok(name.clone())
}

/// A 32-hex organization ID, lowercased.
pub(super) fn org_id(
    ctx: &Ctx<'_>,
    value: &str,
    span: Range<usize>,
    key: &str,
) -> Result<String, ConfigError> {
    if value.len() == 32 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(ctx.err(Some(span), key, format!("{value:?} is not a 32-hex Tallyfy organization ID")))
    }
}

/// A SHA-256 digest written as 64 hex digits (what `tallyfy-proxy hash-key` prints).
pub(super) fn sha256_hex(
    ctx: &Ctx<'_>,
    value: &str,
    span: Range<usize>,
    key: &str,
) -> Result<[u8; 32], ConfigError> {
    let bad =
        || ctx.err(Some(span.clone()), key, "must be 64 hex digits, as printed by `tallyfy-proxy hash-key`");
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(digest)
}
