//! How tokens are obtained and kept fresh (`[tokens]`).

use std::time::Duration;

use http::StatusCode;

use super::schedule::Schedule;

/// How tokens are obtained and kept fresh (`[tokens]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub schedule: Schedule,
    /// Timeout of one call to the token endpoint or the user-token route.
    pub fetch_timeout: Duration,
    /// Lifetime assumed when Tallyfy gives neither `expires_in` nor a JWT `exp`.
    pub default_lifetime: Duration,
    /// Upstream statuses that mean "this token is dead": refresh and replay once.
    pub dead_token_statuses: Vec<StatusCode>,
    /// Bodies up to this size are kept so a request can be replayed after a refresh.
    pub replay_max_body_bytes: u64,
    /// A rejection forces at most one refresh per credential in this interval.
    pub min_forced_refresh_interval: Duration,
}

impl Settings {
    /// The longest one fetch for a slot may take: up to three calls (refresh,
    /// then password; or mint, provision, mint), and a second to spare. How
    /// long a request waits for a token being fetched for it.
    pub fn refresh_wait(&self) -> Duration {
        self.fetch_timeout * 3 + Duration::from_secs(1)
    }
}
