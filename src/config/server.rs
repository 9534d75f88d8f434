//! `[server]`: connection limits and timers.

use toml::Spanned;

use super::ctx::{Ctx, millis};
use super::raw::RawServer;
use super::{ConfigError, Server};

pub(super) fn validate(ctx: &Ctx<'_>, raw: &RawServer) -> Result<Server, ConfigError> {
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
        send_timeout: millis(ctx, raw.send_timeout_ms.as_ref(), "server.send_timeout_ms", 60_000)?,
        max_connections: positive(raw.max_connections.as_ref(), "server.max_connections", 10_000)?,
        max_buffered_bytes: match &raw.max_buffered_bytes {
            None => 64 * 1024 * 1024,
            Some(v) if *v.get_ref() == 0 => {
                return Err(ctx.at(v, "server.max_buffered_bytes", "must be greater than 0"));
            }
            Some(v) => *v.get_ref(),
        },
    })
}
