//! `[[limits]]`, `upstream.retry_429_max_wait_ms` and `[upstream.retry]`.

use std::collections::HashSet;
use std::time::Duration;

use toml::Spanned;

use super::ConfigError;
use super::ctx::{Ctx, methods, name};
use super::raw::{RawLimit, RawUpstream};
use crate::policy::PathPattern;
use crate::traffic::{RetrySettings, RuleSettings, Settings};

/// The longest hourly-style window: a day.
const MAX_WINDOW_SECONDS: u64 = 86_400;

pub(super) fn validate(
    ctx: &Ctx<'_>,
    limits: &[Spanned<RawLimit>],
    upstream: &RawUpstream,
) -> Result<Settings, ConfigError> {
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(limits.len());
    for (i, spanned) in limits.iter().enumerate() {
        let raw = spanned.get_ref();
        let key = format!("limits[{i}]");
        let name = name(ctx, &raw.name, &format!("{key}.name"))?;
        if !names.insert(name.clone()) {
            return Err(ctx.at(&raw.name, format!("{key}.name"), format!("duplicate limit name {name:?}")));
        }
        let path = PathPattern::parse(raw.path.get_ref())
            .map_err(|m| ctx.at(&raw.path, format!("{key}.path"), m))?;
        if *raw.max.get_ref() == 0 {
            return Err(ctx.at(&raw.max, format!("{key}.max"), "must be at least 1"));
        }
        let per = *raw.per_seconds.get_ref();
        if per == 0 || per > MAX_WINDOW_SECONDS {
            return Err(ctx.at(
                &raw.per_seconds,
                format!("{key}.per_seconds"),
                "must be between 1 and 86400",
            ));
        }
        rules.push(RuleSettings {
            name,
            methods: raw
                .methods
                .as_ref()
                .map(|list| methods(ctx, list, &format!("{key}.methods")))
                .transpose()?,
            path,
            max: *raw.max.get_ref(),
            per: Duration::from_secs(per),
        });
    }
    let retry_429_max_wait =
        Duration::from_millis(upstream.retry_429_max_wait_ms.as_ref().map_or(0, |v| *v.get_ref()));
    if retry_429_max_wait > Duration::from_secs(60) {
        let at = upstream.retry_429_max_wait_ms.as_ref().map(Spanned::span);
        return Err(ctx.err(
            at,
            "upstream.retry_429_max_wait_ms",
            "must be at most 60000: a caller waits that long",
        ));
    }
    Ok(Settings { rules, retry: retry(ctx, upstream)?, retry_429_max_wait })
}

fn retry(ctx: &Ctx<'_>, upstream: &RawUpstream) -> Result<RetrySettings, ConfigError> {
    let defaults = RetrySettings::default();
    let Some(spanned) = &upstream.retry else { return Ok(defaults) };
    let raw = spanned.get_ref();
    let attempts = raw.attempts.as_ref().map_or(Ok(defaults.attempts), |v| match *v.get_ref() {
        1..=5 => Ok(*v.get_ref()),
        _ => Err(ctx.at(v, "upstream.retry.attempts", "must be between 1 (no retry) and 5")),
    })?;
    let backoff = match &raw.backoff_ms {
        None => defaults.backoff,
        Some(v) if *v.get_ref() == 0 || *v.get_ref() > 10_000 => {
            return Err(ctx.at(v, "upstream.retry.backoff_ms", "must be between 1 and 10000"));
        }
        Some(v) => Duration::from_millis(*v.get_ref()),
    };
    let budget_percent =
        raw.budget_percent.as_ref().map_or(Ok(defaults.budget_percent), |v| match *v.get_ref() {
            0..=100 => Ok(*v.get_ref()),
            _ => Err(ctx.at(v, "upstream.retry.budget_percent", "must be between 0 and 100")),
        })?;
    Ok(RetrySettings { attempts, retry_unsafe: raw.retry_unsafe.unwrap_or(false), backoff, budget_percent })
}
