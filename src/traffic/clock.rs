//! Time as the limits count it: nanoseconds since the process's first look at
//! the clock, so a whole state fits an atomic. Read from tokio's clock, which
//! tests can pause.

use std::sync::OnceLock;

use tokio::time::Instant;

/// Nanoseconds since [`origin`].
pub type Nanos = u64;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `at` as [`Nanos`]; instants before the origin count as 0.
pub fn nanos(at: Instant) -> Nanos {
    u64::try_from(at.saturating_duration_since(origin()).as_nanos()).unwrap_or(u64::MAX)
}
