//! Logging: `tracing` with an `EnvFilter` (`RUST_LOG` wins over `[log] level`),
//! as text or one JSON object per line, on standard output. Access lines are
//! written by [`crate::access_log`] in the same format, through the same filter.

use tracing_subscriber::EnvFilter;

/// The log line format (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing to standard output. Safe to call
/// twice (the second call is ignored), which keeps tests that start several
/// proxies simple.
pub fn init(format: LogFormat, level: &str) {
    init_with(format, level, std::io::stdout);
}

/// [`init`] with another writer (benches measure the production set-up
/// writing to a sink).
pub fn init_with<W>(format: LogFormat, level: &str, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    crate::access_log::set_format(format == LogFormat::Json);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(colours)
        .with_writer(writer);
    let _already_installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
