//! `[fleet]`: the Redis replicas share, their fleet's name, the key tokens are
//! sealed with, and the refresh lease.

use std::time::Duration;

use toml::Spanned;

use super::ConfigError;
use super::ctx::Ctx;
use super::raw::RawFleet;
use super::secret_source::SecretSource;
use crate::fleet::{EncryptionKey, Settings};
use crate::secret::Secret;

/// `lease_ms` when the file gives none.
pub const DEFAULT_LEASE_MS: u64 = 40_000;

pub(super) fn validate(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawFleet>,
    fetch_timeout: Duration,
    warnings: &mut Vec<String>,
) -> Result<Settings, ConfigError> {
    let fleet = raw.get_ref();
    let missing = |field: &str| ctx.at(raw, format!("fleet.{field}"), "is required in [fleet]");
    let (redis_url, url_source) = secret(ctx, raw, "redis_url", &fleet.redis_url, warnings)?;
    let scheme_ok = ["redis://", "rediss://"].iter().any(|s| redis_url.expose().starts_with(s));
    if !scheme_ok || redis::Client::open(redis_url.expose()).is_err() {
        // The value may hold a password: the message never quotes it.
        return Err(ctx.at(url_source, "fleet.redis_url", "must be a redis:// or rediss:// URL"));
    }
    if unverified_tls(redis_url.expose()) {
        warnings.push(
            "fleet.redis_url: '#insecure' turns off the check of Redis's certificate: anyone on the path \
             can read Redis's password and tamper with leases and budgets (tokens stay sealed)"
                .to_owned(),
        );
    }
    let key_prefix = fleet.key_prefix.as_ref().ok_or_else(|| missing("key_prefix"))?;
    let prefix = key_prefix.get_ref().trim();
    if prefix.is_empty() || prefix.len() > 200 || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ctx.at(key_prefix, "fleet.key_prefix", "must be 1 to 200 characters without spaces"));
    }
    let (key_text, key_source) = secret(ctx, raw, "encryption_key", &fleet.encryption_key, warnings)?;
    let encryption_key = EncryptionKey::from_base64(key_text.expose())
        .map_err(|m| ctx.at(key_source, "fleet.encryption_key", m))?;
    let lease = Duration::from_millis(fleet.lease_ms.as_ref().map_or(DEFAULT_LEASE_MS, |l| *l.get_ref()));
    if lease <= fetch_timeout * 3 {
        let at = fleet.lease_ms.as_ref().map_or(raw.span(), Spanned::span);
        return Err(ctx.err(
            Some(at),
            "fleet.lease_ms",
            format!(
                "must be more than 3 × tokens.fetch_timeout_ms ({} ms): one refresh may take three calls, \
                 and a lease that lapses mid-refresh lets another replica present the same refresh token",
                fetch_timeout.as_millis() * 3
            ),
        ));
    }
    Ok(Settings { redis_url, key_prefix: prefix.to_owned(), encryption_key, lease })
}

/// A required secret of `[fleet]`, resolved, and where it was written.
fn secret<'v>(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawFleet>,
    field: &str,
    value: &'v Option<Spanned<SecretSource>>,
    warnings: &mut Vec<String>,
) -> Result<(Secret, &'v Spanned<SecretSource>), ConfigError> {
    let key = format!("fleet.{field}");
    let source = value.as_ref().ok_or_else(|| ctx.at(raw, &key, "is required in [fleet]"))?;
    Ok((ctx.secret(source, &key, warnings)?, source))
}

/// Whether a Redis URL asks for TLS without checking the server's certificate
/// (redis-rs reads a `rediss://` URL's `#insecure` fragment so).
pub fn unverified_tls(url: &str) -> bool {
    url.starts_with("rediss://") && url.rsplit_once('#').is_some_and(|(_, fragment)| fragment == "insecure")
}
