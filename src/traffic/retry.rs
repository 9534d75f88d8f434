//! `[upstream.retry]`: sending a request to Tallyfy again after a failure,
//! within a budget.
//!
//! Only requests whose whole body the proxy holds, only before any response
//! byte went to the caller. GET, HEAD and OPTIONS (which do nothing twice) on a
//! refused connection, a connection lost before the response head, or
//! 502/503/504; PUT and DELETE, with `retry_unsafe`, only on the failures that
//! say Tallyfy did nothing: a refused connection or a 503 (a lost connection,
//! a 502 or a 504 may come after Tallyfy acted: a DELETE sent again would get
//! 404 for a delete that succeeded).
//! The budget (as Envoy's and Finagle's) lets retries add at most
//! `budget_percent` of the requests of the last ten seconds (and always a few,
//! so a quiet app can retry too): when Tallyfy is down, the proxy does not
//! multiply the load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};

use super::clock::Nanos;

/// `[upstream.retry]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    /// Sends in all, the first included (1 = no retry).
    pub attempts: u32,
    /// PUT and DELETE may be retried too, after a refused connection or a 503 only.
    pub retry_unsafe: bool,
    /// The first retry's delay; each next one doubles it (with jitter).
    pub backoff: Duration,
    pub budget_percent: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            attempts: 1,
            retry_unsafe: false,
            backoff: Duration::from_millis(50),
            budget_percent: 20,
        }
    }
}

/// Why a send failed in a way a retry may mend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection to Tallyfy could not be made.
    Connect,
    /// The connection was lost before the response head.
    Reset,
    /// Tallyfy (or its load balancer) answered 502, 503 or 504.
    Status(StatusCode),
}

impl Failure {
    /// A bounded label for the metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Reset => "reset",
            Failure::Status(StatusCode::BAD_GATEWAY) => "502",
            Failure::Status(StatusCode::SERVICE_UNAVAILABLE) => "503",
            Failure::Status(_) => "504",
        }
    }

    /// The status a retry is worth trying for.
    pub fn of_status(status: StatusCode) -> Option<Failure> {
        matches!(status.as_u16(), 502..=504).then_some(Failure::Status(status))
    }
}

impl RetrySettings {
    /// Whether a request of `method` may be sent again after `failure`.
    pub fn covers(&self, method: &Method, failure: Failure) -> bool {
        let did_nothing =
            matches!(failure, Failure::Connect | Failure::Status(StatusCode::SERVICE_UNAVAILABLE));
        self.attempts > 1
            && (crate::target::is_safe(method)
                || (self.retry_unsafe && matches!(*method, Method::PUT | Method::DELETE) && did_nothing))
    }

    /// The delay before retry number `retry` (1 = the first), with "equal
    /// jitter" (`jitter` in `[0, 1)`).
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let step = self.backoff.saturating_mul(1u32 << retry.saturating_sub(1).min(10));
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// The budget's window, in one-second slots.
const SLOTS: usize = 10;
/// Retries the budget always allows per window, however few the requests.
pub const MIN_RETRIES_PER_WINDOW: u64 = 10;

/// Requests and retries of the last ten seconds, in one-second slots of
/// atomics: `(second << 40) | (requests << 20) | retries` per slot, where
/// `second` is the clock's second modulo 2^24 (its 24 bits wrap after 194
/// days, and are compared as wrapping).
#[derive(Debug, Default)]
pub struct Budget {
    slots: [AtomicU64; SLOTS],
}

const FIELD: u64 = (1 << 20) - 1;
/// The seconds a slot's 24 bits hold.
const SECONDS: u64 = (1 << 24) - 1;

/// The slot's second, of the clock's second modulo 2^24.
fn second_of(now: Nanos) -> u64 {
    (now / 1_000_000_000) & SECONDS
}

impl Budget {
    /// Counts a request (first sends only).
    pub fn request(&self, now: Nanos) {
        self.add(now, 1, 0);
    }

    /// Takes a retry from the budget, or says there is none left.
    pub fn try_retry(&self, now: Nanos, percent: u32) -> bool {
        let second = second_of(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for slot in &self.slots {
            let value = slot.load(Ordering::Relaxed);
            if second.wrapping_sub(value >> 40) & SECONDS < SLOTS as u64 {
                requests += (value >> 20) & FIELD;
                retries += value & FIELD;
            }
        }
        let allowed = (requests * u64::from(percent) / 100).max(MIN_RETRIES_PER_WINDOW);
        if retries >= allowed {
            return false;
        }
        self.add(now, 0, 1);
        true
    }

    fn add(&self, now: Nanos, requests: u64, retries: u64) {
        let slot = &self.slots[(now / 1_000_000_000 % SLOTS as u64) as usize];
        let second = second_of(now);
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
            // A slot last written in another second starts again.
            let fresh = if value >> 40 == second { value } else { second << 40 };
            // Each count saturates in its field rather than spill into the next.
            let requests = (((fresh >> 20) & FIELD) + requests).min(FIELD);
            let retries = ((fresh & FIELD) + retries).min(FIELD);
            Some((second << 40) | (requests << 20) | retries)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn only_idempotent_methods_are_covered_unless_unsafe_ones_are_allowed() {
        let every = [
            Failure::Connect,
            Failure::Reset,
            Failure::Status(StatusCode::BAD_GATEWAY),
            Failure::Status(StatusCode::SERVICE_UNAVAILABLE),
            Failure::Status(StatusCode::GATEWAY_TIMEOUT),
        ];
        let settings = RetrySettings { attempts: 3, ..RetrySettings::default() };
        for failure in every {
            assert!(settings.covers(&Method::GET, failure) && settings.covers(&Method::HEAD, failure));
            assert!(!settings.covers(&Method::POST, failure) && !settings.covers(&Method::PUT, failure));
            assert!(!RetrySettings::default().covers(&Method::GET, failure), "one attempt is no retry");
        }
        let unsafe_too = RetrySettings { retry_unsafe: true, ..settings.clone() };
        // Only what says Tallyfy did nothing (a refused connection, a 503): a
        // DELETE it acted on, sent again, would be a 404 for a delete that succeeded.
        for (failure, did_nothing) in every.into_iter().zip([true, false, false, true, false]) {
            assert_eq!(unsafe_too.covers(&Method::PUT, failure), did_nothing, "{failure:?}");
            assert_eq!(unsafe_too.covers(&Method::DELETE, failure), did_nothing, "{failure:?}");
            assert!(!unsafe_too.covers(&Method::POST, failure), "POST never");
        }
    }

    #[test]
    fn retries_may_add_a_fifth_of_the_requests_of_the_last_ten_seconds() {
        let budget = Budget::default();
        let now = 100 * SECOND;
        for _ in 0..1000 {
            budget.request(now);
        }
        let granted = (0..1000).filter(|_| budget.try_retry(now, 20)).count();
        assert_eq!(granted, 200);
        // Eleven seconds on, the window holds none of them.
        let later = now + 11 * SECOND;
        let granted = (0..1000).filter(|_| budget.try_retry(later, 20)).count();
        assert_eq!(granted as u64, MIN_RETRIES_PER_WINDOW, "a quiet window still allows a few");
    }

    /// The slots keep 24 bits of the second: after 2^24 s (194 days) of uptime
    /// the budget limits as on the first day, where a shifted-out second made
    /// every slot look stale and every retry granted.
    #[test]
    fn the_budget_still_limits_after_194_days() {
        for start in [(1 << 24) - 3, 1 << 24, 3 << 24, (1 << 30) + 7] {
            let budget = Budget::default();
            let now = start * SECOND;
            for _ in 0..1000 {
                budget.request(now);
            }
            let granted = (0..1000).filter(|_| budget.try_retry(now + 4 * SECOND, 20)).count();
            assert_eq!(granted, 200, "at second {start}");
            let later = now + 15 * SECOND;
            let granted = (0..1000).filter(|_| budget.try_retry(later, 20)).count();
            assert_eq!(granted as u64, MIN_RETRIES_PER_WINDOW, "at second {start}, eleven seconds on");
        }
    }

    #[test]
    fn delays_double_with_jitter() {
        let settings = RetrySettings { backoff: Duration::from_millis(100), ..RetrySettings::default() };
        assert_eq!(settings.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(settings.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(settings.delay(3, 1.0), Duration::from_millis(400));
    }
}
