//! `[server]` (connection limits and timers) and `[tokens]` (refresh schedule,
//! replay and dead-token statuses).

use std::time::Duration;

use toml::Spanned;

use super::ctx::{Ctx, millis};
use super::raw::{RawServer, RawTokens};
use super::{ConfigError, Server, Tokens};
use crate::tokens::schedule::Schedule;

pub(super) fn server(ctx: &Ctx<'_>, raw: &RawServer) -> Result<Server, ConfigError> {
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

pub(super) fn tokens(ctx: &Ctx<'_>, raw: &RawTokens) -> Result<Tokens, ConfigError> {
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
