//! `[server]`: connection limits and timers.

use toml::Spanned;

use super::ctx::{Ctx, millis};
use super::raw::RawServer;
use super::{ConfigError, Server};

/// The most `max_connections` may be: far past any file-descriptor limit.
pub const MOST_CONNECTIONS: usize = 1_000_000;
/// The most `max_headers` may be.
pub const MOST_HEADERS: usize = 1_000;
/// The most `max_header_bytes` may be.
pub const MOST_HEADER_BYTES: usize = 1024 * 1024;

pub(super) fn validate(ctx: &Ctx<'_>, raw: &RawServer) -> Result<Server, ConfigError> {
    // Bounded above too: hyper sets room aside for twice `max_headers` on
    // every head it parses, and tokio's semaphore panics past 2^61 permits.
    let within = |v: Option<&Spanned<usize>>, key: &str, default: usize, most: usize| match v {
        None => Ok(default),
        Some(v) if *v.get_ref() == 0 => Err(ctx.at(v, key, "must be greater than 0")),
        Some(v) if *v.get_ref() > most => Err(ctx.at(v, key, format!("must be at most {most}"))),
        Some(v) => Ok(*v.get_ref()),
    };
    Ok(Server {
        header_read_timeout: millis(
            ctx,
            raw.header_read_timeout_ms.as_ref(),
            "server.header_read_timeout_ms",
            10_000,
        )?,
        max_header_bytes: within(
            raw.max_header_bytes.as_ref(),
            "server.max_header_bytes",
            32 * 1024,
            MOST_HEADER_BYTES,
        )?,
        max_headers: within(raw.max_headers.as_ref(), "server.max_headers", 100, MOST_HEADERS)?,
        max_request_body_bytes: match &raw.max_request_body_bytes {
            None => 100 * 1024 * 1024,
            Some(v) if *v.get_ref() == 0 => {
                return Err(ctx.at(v, "server.max_request_body_bytes", "must be greater than 0"));
            }
            Some(v) => *v.get_ref(),
        },
        shutdown_grace: millis(ctx, raw.shutdown_grace_ms.as_ref(), "server.shutdown_grace_ms", 25_000)?,
        idle_timeout: millis(ctx, raw.idle_timeout_ms.as_ref(), "server.idle_timeout_ms", 60_000)?,
        send_timeout: millis(ctx, raw.send_timeout_ms.as_ref(), "server.send_timeout_ms", 60_000)?,
        max_connections: within(
            raw.max_connections.as_ref(),
            "server.max_connections",
            10_000,
            MOST_CONNECTIONS,
        )?,
        max_buffered_bytes: match &raw.max_buffered_bytes {
            None => 64 * 1024 * 1024,
            Some(v) if *v.get_ref() == 0 => {
                return Err(ctx.at(v, "server.max_buffered_bytes", "must be greater than 0"));
            }
            Some(v) => *v.get_ref(),
        },
    })
}
