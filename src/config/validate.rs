//! Raw file types -> validated [`Config`]: each section's validator in turn,
//! then the checks that span sections.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::ctx::{Ctx, http_url, socket_addr};
use super::raw::RawConfig;
use super::{Config, ConfigError, Listen, Log, LogFormat};
use super::{credentials, dates, fleet, identities, listen_tls, server, tokens, traffic, upstream};
use crate::identity::Matcher;

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
        unprefixed: raw.listen.unprefixed.unwrap_or(false),
    };
    if overlap(listen.proxy, listen.admin) {
        return Err(ctx.at(&raw.listen.admin, "listen.admin", "must not take listen.proxy's address"));
    }
    let upstream = upstream::validate(&ctx, &raw.upstream)?;
    let server = server::validate(&ctx, &raw.server)?;
    let tokens = tokens::validate(&ctx, &raw.tokens)?;
    let traffic = traffic::validate(&ctx, &raw.limits, &raw.upstream)?;
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
                // A bare word is read as a target name (`tallyfy_proxy`: all of
                // it), so a misspelt level (`inof`, `warning`) would log nothing.
                if let Some(word) =
                    level.get_ref().split(',').map(str::trim).find(|directive| misspelt_level(directive))
                {
                    return Err(ctx.at(
                        level,
                        "log.level",
                        format!(
                            "{word:?} is not a level (error, warn, info, debug, trace, off); \
                             a bare word is read as a target name"
                        ),
                    ));
                }
                level.get_ref().clone()
            }
        },
    };

    let (credentials, credential_sources) = credentials::validate(&ctx, &raw.credentials, &mut warnings)?;
    let fleet = raw
        .fleet
        .as_ref()
        .map(|f| fleet::validate(&ctx, f, tokens.fetch_timeout, &mut warnings))
        .transpose()?;
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
        traffic,
        fleet,
        warnings,
        loaded_from: None,
    })
}

/// Whether a bare `log.level` directive is a level spelt wrong: not a level,
/// but within two edits of one or starting with one (`inof`, `warning`,
/// `debugging`). Other bare words are target names, as `EnvFilter` reads them.
fn misspelt_level(directive: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let word = directive.to_ascii_lowercase();
    if word.is_empty() || word.contains(['=', ':', '[']) || LEVELS.contains(&word.as_str()) {
        return false;
    }
    LEVELS.iter().any(|level| word.starts_with(level) || edits(&word, level) <= 2)
}

/// Levenshtein distance (short words only).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn read_raw(ctx: &Ctx<'_>) -> Result<RawConfig, ConfigError> {
    let deserializer =
        toml::Deserializer::parse(ctx.source).map_err(|e| ctx.err(e.span(), "", first_line(e.message())))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = readable_key(&e.path().to_string(), ctx.source);
        let inner = e.into_inner();
        ctx.err(inner.span(), key, first_line(inner.message()))
    })
}

/// The key path as the user wrote it: without the `Spanned` wrapper serde
/// reports (`identities[0].$__serde_spanned_private_value.rate_limt`), and
/// naming an array table by its `name` when it has one
/// (`[[identities]] "billing".rate_limt`).
fn readable_key(path: &str, source: &str) -> String {
    const WRAPPER: &str = "$__serde_spanned_private_value";
    let path: Vec<&str> = path.split('.').filter(|part| *part != WRAPPER && !part.is_empty()).collect();
    let Some((first, rest)) = path.split_first() else { return String::new() };
    let named = first.split_once('[').and_then(|(table, index)| {
        let index: usize = index.strip_suffix(']')?.parse().ok()?;
        let doc: toml::Table = source.parse().ok()?;
        let name = doc.get(table)?.as_array()?.get(index)?.get("name")?.as_str()?.to_owned();
        Some(format!("[[{table}]] {name:?}"))
    });
    std::iter::once(named.unwrap_or_else(|| (*first).to_owned()))
        .chain(rest.iter().map(|part| (*part).to_owned()))
        .collect::<Vec<_>>()
        .join(".")
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().trim().to_owned()
}

/// Whether two listen addresses would take the same socket: the same port (not
/// 0: each gets its own) and the same address, an IPv4-mapped one as the IPv4
/// address it maps, or a wildcard that covers the other (`0.0.0.0` every IPv4
/// address; `[::]` every address, as Linux binds it dual-stack).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: IpAddr, other: IpAddr| match wide {
        IpAddr::V6(v6) if v6.is_unspecified() => true,
        IpAddr::V4(v4) if v4.is_unspecified() => other.is_ipv4(),
        _ => false,
    };
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port() && a.port() != 0 && (x == y || covers(x, y) || covers(y, x))
}
