//! When to refresh a token, and how long to wait after a failure. Pure functions:
//! time and randomness are parameters, so every edge is a plain unit test.

use std::time::Duration;

use tokio::time::Instant;

/// Refresh settings from `[tokens]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Never plan a refresh later than this before expiry (scaled down for very
    /// short-lived tokens, see [`Schedule::refresh_at`]).
    pub min_leeway: Duration,
    /// First retry delay after a failed fetch.
    pub backoff_min: Duration,
    /// Retry delays never exceed this.
    pub backoff_max: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            min_leeway: Duration::from_secs(60),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl Schedule {
    /// When a token obtained at `obtained` and valid for `lifetime` should be
    /// refreshed: at 75–85 % of its life (`jitter` in `[0, 1)` picks the point, so
    /// replicas spread out), and never later than the leeway before expiry. The
    /// leeway is at most a fifth of the lifetime, so a 2-second token is still
    /// refreshed around 1.5 s rather than at once, over and over.
    pub fn refresh_at(&self, obtained: Instant, lifetime: Duration, jitter: f64) -> Instant {
        let fraction = 0.75 + 0.10 * jitter.clamp(0.0, 1.0);
        let planned = obtained + lifetime.mul_f64(fraction);
        let leeway = self.min_leeway.min(lifetime / 5);
        let latest = obtained + lifetime.saturating_sub(leeway);
        planned.min(latest)
    }

    /// Delay before retry number `failures` (1 = after the first failure):
    /// exponential from `backoff_min`, capped at `backoff_max`, with "equal jitter"
    /// (half fixed, half random) so retries from many replicas do not align.
    pub fn backoff(&self, failures: u32, jitter: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let raw = self.backoff_min.saturating_mul(1u32 << exponent);
        let capped = raw.min(self.backoff_max);
        capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// The longest lifetime a token is given, whatever Tallyfy says: ten years.
/// Far beyond any token Tallyfy issues, and far inside what `Instant`
/// arithmetic can hold (an `expires_in` of 2^64 seconds would overflow it).
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long a freshly issued token lives: `expires_in` when given and above 0
/// (it is relative, so clock skew between the proxy and Tallyfy cannot distort
/// it), else the JWT `exp` claim measured against `now_unix` (Tallyfy's clock,
/// from its answer's `Date`, when it gave one), else `expires_in` (0: already
/// expired) or `fallback`; at most [`MAX_LIFETIME`].
pub fn lifetime(
    expires_in: Option<u64>,
    jwt_exp: Option<u64>,
    now_unix: u64,
    fallback: Duration,
) -> Duration {
    let lifetime = match (expires_in, jwt_exp) {
        (Some(seconds), _) if seconds > 0 => Duration::from_secs(seconds),
        (_, Some(exp)) => Duration::from_secs(exp.saturating_sub(now_unix)),
        (Some(seconds), None) => Duration::from_secs(seconds),
        (None, None) => fallback,
    };
    lifetime.min(MAX_LIFETIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn long_tokens_refresh_between_75_and_85_percent() {
        let s = Schedule::default();
        let t0 = Instant::now();
        assert_eq!(s.refresh_at(t0, HOUR, 0.0), t0 + HOUR.mul_f64(0.75));
        assert_eq!(s.refresh_at(t0, HOUR, 0.999_999), t0 + HOUR.mul_f64(0.85 - 0.000_000_1));
        assert_eq!(s.refresh_at(t0, HOUR, 7.0), t0 + HOUR.mul_f64(0.85), "jitter is clamped");
    }

    #[test]
    fn the_leeway_wins_when_the_percentage_is_too_late() {
        let s = Schedule { min_leeway: Duration::from_secs(900), ..Schedule::default() };
        let t0 = Instant::now();
        // 85 % of an hour is 9 minutes before expiry; the 15-minute leeway pulls it earlier.
        assert_eq!(s.refresh_at(t0, HOUR, 0.99), t0 + HOUR - Duration::from_secs(720));
    }

    #[test]
    fn short_tokens_are_not_refreshed_in_a_tight_loop() {
        let s = Schedule::default();
        let t0 = Instant::now();
        let two = Duration::from_secs(2);
        let at = s.refresh_at(t0, two, 0.5);
        assert!(
            at >= t0 + Duration::from_millis(1500) && at <= t0 + Duration::from_millis(1600),
            "{:?}",
            at - t0
        );
        assert_eq!(s.refresh_at(t0, Duration::ZERO, 0.5), t0);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let s = Schedule {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..Schedule::default()
        };
        assert_eq!(s.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(s.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(s.backoff(4, 1.0), Duration::from_millis(800));
        assert_eq!(s.backoff(10, 1.0), Duration::from_secs(2));
        assert_eq!(s.backoff(u32::MAX, 1.0), Duration::from_secs(2), "never overflows");
        assert_eq!(s.backoff(1, 0.0), Duration::from_millis(50), "at least half the delay");
    }

    #[test]
    fn lifetime_prefers_expires_in_then_exp() {
        let fallback = HOUR;
        assert_eq!(lifetime(Some(600), Some(1_000_300), 1_000_000, fallback), Duration::from_secs(600));
        assert_eq!(lifetime(Some(600), None, 0, fallback), Duration::from_secs(600));
        assert_eq!(lifetime(None, Some(1_000_060), 1_000_000, fallback), Duration::from_secs(60));
        assert_eq!(lifetime(None, Some(5), 1_000_000, fallback), Duration::ZERO, "already expired");
        assert_eq!(lifetime(None, None, 0, fallback), fallback);
        assert_eq!(lifetime(Some(u64::MAX), None, 0, fallback), MAX_LIFETIME, "capped");
        assert_eq!(lifetime(None, Some(u64::MAX), 0, fallback), MAX_LIFETIME, "capped");
        // An `expires_in` of 0 beside a JWT that says more is not "expired at once".
        assert_eq!(lifetime(Some(0), Some(1_000_060), 1_000_000, fallback), Duration::from_secs(60));
        assert_eq!(lifetime(Some(0), None, 0, fallback), Duration::ZERO);
        let far = tokio::time::Instant::now() + MAX_LIFETIME;
        assert!(Schedule::default().refresh_at(far, MAX_LIFETIME, 1.0) > far, "and held in an Instant");
    }
}
