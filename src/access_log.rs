//! Access lines: one per request, formatted by hand ([`mod@line`]: text in
//! `tracing`'s layout or one JSON object, every value escaped) and written in
//! batches ([`sink`]). Whether they are written at all follows the tracing
//! filter (`[log] level`, `RUST_LOG`) for the target `tallyfy_proxy::access`.
//!
//! What a line holds is the pipeline's business: see [`crate::proxy`]'s request
//! record.

pub mod line;
pub mod sink;

use std::sync::atomic::{AtomicU8, Ordering};

pub use line::Value;
pub use sink::{capture, discard, flush_thread, on_park};

/// The line format, set once by [`crate::telemetry::init`] (text until then).
static FORMAT: AtomicU8 = AtomicU8::new(0);

/// Chooses text or JSON lines.
pub fn set_format(json: bool) {
    FORMAT.store(u8::from(json), Ordering::Relaxed);
}

/// A line's level, as `tracing` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Writes one access line with `fields` (those set to `None` are left out), if
/// the filter lets lines of `level` through.
pub fn write(level: Level, fields: &[(&str, Option<Value<'_>>)]) {
    let (enabled, name) = match level {
        Level::Info => (tracing::enabled!(target: "tallyfy_proxy::access", tracing::Level::INFO), "INFO"),
        Level::Warn => (tracing::enabled!(target: "tallyfy_proxy::access", tracing::Level::WARN), "WARN"),
        Level::Error => (tracing::enabled!(target: "tallyfy_proxy::access", tracing::Level::ERROR), "ERROR"),
    };
    if !enabled {
        return;
    }
    let format = if FORMAT.load(Ordering::Relaxed) == 1 { line::Format::Json } else { line::Format::Text };
    sink::emit(|out| line::write(out, format, name, fields));
}
