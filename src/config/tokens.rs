//! `[tokens]`: refresh schedule, replay and dead-token statuses.

use toml::Spanned;

use super::ctx::{Ctx, millis};
use super::raw::RawTokens;
use super::{ConfigError, Tokens};
use crate::tokens::schedule::Schedule;

pub(super) fn validate(ctx: &Ctx<'_>, raw: &RawTokens) -> Result<Tokens, ConfigError> {
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
                    // Not a 5xx: Tallyfy may have acted before failing, and
                    // the replay that follows a dead token would do it twice.
                    .filter(http::StatusCode::is_client_error)
                    .ok_or_else(|| {
                        ctx.at(
                            list,
                            "tokens.dead_token_statuses",
                            format!("{code} is not a 4xx status (a 5xx may mean Tallyfy acted, and would be replayed)"),
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
        // Not 0: the interval is what keeps callers drawing 401s for other
        // reasons from hammering the token endpoint.
        min_forced_refresh_interval: millis(
            ctx,
            raw.min_forced_refresh_interval_ms.as_ref(),
            "tokens.min_forced_refresh_interval_ms",
            5_000,
        )?,
    })
}
