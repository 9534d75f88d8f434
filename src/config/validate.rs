//! Raw file types -> validated [`Config`], with a line number for every complaint.

use std::collections::HashSet;
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
use super::raw::{RawConfig, RawCredential, RawIdentity, RawServer, RawUpstream};
use super::{
    Config, ConfigError, Credential, CredentialKind, Identity, Listen, Log, LogFormat, Server, Upstream,
};
use crate::identity::Matcher;
use crate::tokens::CredentialId;

pub const DEFAULT_TOKEN_PATH: &str = "/api/oauth/token";
pub const DEFAULT_CLIENT_HEADER: &str = "APIClient";

/// Parsing context: turns spans into lines and builds errors.
struct Ctx<'a> {
    file: &'a Path,
    source: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    fn err(&self, span: Option<Range<usize>>, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: span.map(|s| line_of(self.source, s.start)),
            key: key.into(),
            message: msg.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        self.err(Some(value.span()), key, msg)
    }

    fn base_dir(&self) -> PathBuf {
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
    };
    if listen.proxy == listen.admin && listen.proxy.port() != 0 {
        return Err(ctx.at(&raw.listen.admin, "listen.admin", "must differ from listen.proxy"));
    }
    let upstream = upstream(&ctx, &raw.upstream)?;
    let server = server(&ctx, &raw.server)?;
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

    let mut credentials = Vec::with_capacity(raw.credentials.len());
    let mut names = HashSet::new();
    for (i, spanned) in raw.credentials.iter().enumerate() {
        let raw_credential = spanned.get_ref();
        let key = format!("credentials[{i}]");
        let credential = credential(&ctx, raw_credential, &key, &mut warnings)?;
        if !names.insert(credential.name.clone()) {
            return Err(ctx.at(
                &raw_credential.name,
                format!("{key}.name"),
                format!("duplicate credential name {:?}", credential.name),
            ));
        }
        credentials.push(credential);
    }
    if credentials.is_empty() {
        return Err(ctx.err(None, "credentials", "at least one [[credentials]] table is required"));
    }

    let mut identities = Vec::with_capacity(raw.identities.len());
    let mut names = HashSet::new();
    for (i, spanned) in raw.identities.iter().enumerate() {
        let raw_identity = spanned.get_ref();
        let key = format!("identities[{i}]");
        let identity = identity(&ctx, raw_identity, &key, &credentials)?;
        if !names.insert(identity.name.clone()) {
            return Err(ctx.at(
                &raw_identity.name,
                format!("{key}.name"),
                format!("duplicate identity name {:?}", identity.name),
            ));
        }
        identities.push(identity);
    }
    if identities.is_empty() {
        return Err(ctx.err(
            None,
            "identities",
            "at least one [[identities]] table is required: without one every caller is refused",
        ));
    }

    Ok(Config { file: file.to_owned(), listen, upstream, server, log, credentials, identities, warnings })
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

fn http_url(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<Uri, ConfigError> {
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
    })
}

fn credential(
    ctx: &Ctx<'_>,
    raw: &RawCredential,
    key: &str,
    warnings: &mut Vec<String>,
) -> Result<Credential, ConfigError> {
    let name = nonempty_name(ctx, &raw.name, &format!("{key}.name"))?;
    match raw.kind.get_ref().as_str() {
        "personal_token" => {
            let token_key = format!("{key}.token");
            let Some(source) = &raw.token else {
                return Err(ctx.at(
                    &raw.kind,
                    token_key,
                    "kind personal_token needs token = { env = \"NAME\" } or { file = \"PATH\" }",
                ));
            };
            let token = source
                .get_ref()
                .resolve(&ctx.base_dir(), ctx.env)
                .map_err(|msg| ctx.at(source, &token_key, msg))?;
            if token.expose().bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                return Err(ctx.at(
                    source,
                    &token_key,
                    "the token holds characters a bearer token cannot (spaces or non-ASCII)",
                ));
            }
            if source.get_ref().is_inline() {
                warnings.push(format!(
                    "{}:{}: {token_key} is written in the file; prefer {{ env = \"NAME\" }} or {{ file = \"PATH\" }}",
                    ctx.file.display(),
                    line_of(ctx.source, source.span().start)
                ));
            }
            Ok(Credential {
                name,
                kind: CredentialKind::PersonalToken { token },
                sources: vec![("token", source.get_ref().clone())],
            })
        }
        other => Err(ctx.at(
            &raw.kind,
            format!("{key}.kind"),
            format!("unknown credential kind {other:?} (expected \"personal_token\")"),
        )),
    }
}

fn identity(
    ctx: &Ctx<'_>,
    raw: &RawIdentity,
    key: &str,
    credentials: &[Credential],
) -> Result<Identity, ConfigError> {
    let name = nonempty_name(ctx, &raw.name, &format!("{key}.name"))?;
    let wanted = raw.credential.get_ref();
    let credential =
        credentials.iter().position(|c| &c.name == wanted).map(CredentialId::new).ok_or_else(|| {
            ctx.at(
                &raw.credential,
                format!("{key}.credential"),
                format!("no [[credentials]] is named {wanted:?}"),
            )
        })?;
    let matcher = match raw.matcher.get_ref().any {
        Some(true) => Matcher::Any,
        Some(false) | None => {
            return Err(ctx.at(
                &raw.matcher,
                format!("{key}.match"),
                "give a match rule, e.g. { any = true }",
            ));
        }
    };
    Ok(Identity { name, credential, matcher })
}

fn nonempty_name(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let name = value.get_ref();
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        return Err(ctx.at(value, key, "names use letters, digits, '-', '_' and '.' only"));
    }
    Ok(name.clone())
}
