//! What Tallyfy said with its 429s, remembered per credential: until its
//! `Retry-After` has passed, requests that would meet the same limit are
//! answered by the proxy instead of piling onto Tallyfy.
//!
//! Two kinds of 429 (see TALLYFY_API.md): burst throttling per user, which
//! holds back every request of the credential, and the hourly caps (a body
//! with `"code":"RATE_LIMIT_EXCEEDED"`), which hold back only requests for the
//! same organisation and limit (the `[[limits]]` rule the request matched, or
//! else its method and path).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderMap;
use http::header::RETRY_AFTER;

use super::clock::Nanos;

/// The wait after a 429 without `Retry-After`: from 1 s, doubling, at most 60 s.
pub fn backoff(streak: u32) -> Duration {
    Duration::from_secs(1u64 << streak.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// How long a request held back by a remembered 429 sleeps: the `wait`, and up
/// to a tenth more (`jitter` in `[0, 1)`), so the requests one 429 held back
/// do not all reach Tallyfy in the instant it lifts.
pub fn spread(wait: Duration, jitter: f64) -> Duration {
    wait + wait.mul_f64(0.1 * jitter.clamp(0.0, 1.0))
}

/// The longest wait a 429 is remembered for, whatever its `Retry-After` says
/// (or another replica reports): Tallyfy's limits are per hour, so an hour
/// covers any of them, and a broken or hostile `Retry-After: 99999999999` does
/// not lock a credential out until the proxy restarts.
const MAX_REMEMBERED: Duration = Duration::from_secs(3600);

/// `Retry-After` as a wait from `now`: delay-seconds, or an HTTP date (given
/// `now_unix`, seconds since the epoch). `None` when absent or unreadable.
pub fn retry_after(headers: &HeaderMap, now_unix: u64) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp().as_second();
    Some(Duration::from_secs(u64::try_from(at).ok()?.saturating_sub(now_unix)))
}

/// Whether a 429 body is one of Tallyfy's hourly caps.
pub fn is_hourly_cap(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|json| {
        json["code"] == "RATE_LIMIT_EXCEEDED" || json["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    })
}

/// What a Tallyfy 429 said: its `Retry-After`, and whether it is an hourly cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Said {
    pub retry_after: Option<Duration>,
    pub hourly: bool,
}

/// One credential's remembered throttling.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Burst throttling: no request until then ([`Nanos`]; 0 = none).
    until: AtomicU64,
    /// 429s in a row without `Retry-After`, for [`backoff`].
    streak: AtomicU32,
    /// Hourly caps: (organisation, limit) -> until.
    capped: Mutex<HashMap<(String, String), Nanos>>,
    /// Entries in `capped`, so requests skip the lock while there are none.
    capped_len: AtomicUsize,
    /// The latest `until` in `capped`: past it, every cap has run out and the
    /// map is emptied, so the requests after a cap go back to skipping the lock.
    capped_until: AtomicU64,
}

/// Hourly caps a credential remembers at most (organisations come from paths).
const MAX_CAPPED: usize = 1_000;

impl Throttle {
    /// How long a request must still wait, if at all. `key` gives the
    /// request's (organisation, limit); it is asked only while an hourly cap is
    /// remembered, so requests pay for it only then.
    pub fn wait(&self, now: Nanos, key: impl FnOnce() -> (String, String)) -> Option<Duration> {
        let until = self.until.load(Ordering::Relaxed);
        let mut wait = (until > now).then(|| Duration::from_nanos(until - now));
        if self.capped_len.load(Ordering::Relaxed) > 0 {
            let mut capped = self.capped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if now >= self.capped_until.load(Ordering::Relaxed) {
                capped.clear();
                self.capped_len.store(0, Ordering::Relaxed);
                return wait;
            }
            let (org, limit) = key();
            if let Some(&until) = capped.get(&(org.to_ascii_lowercase(), limit))
                && until > now
            {
                wait = wait.max(Some(Duration::from_nanos(until - now)));
            }
        }
        wait
    }

    /// Tallyfy answered 429: remember it. `retry_after` as Tallyfy gave it;
    /// `hourly` for a `RATE_LIMIT_EXCEEDED` body, which holds back only `org`
    /// and `limit`. Returns the wait remembered.
    ///
    /// Without `Retry-After`, a 429 that comes while the wait it would join
    /// still runs answers a request sent before that wait began (the requests
    /// after it are held back or refused): one episode with the 429 that began
    /// it, not one more in a row. Counted in a row, seven requests in flight
    /// when Tallyfy began throttling held the credential back for a minute.
    pub fn remember(
        &self,
        retry_after: Option<Duration>,
        hourly: bool,
        org: &str,
        limit: &str,
        now: Nanos,
    ) -> Duration {
        let wait_from = |running: Option<Nanos>| {
            match (retry_after, running.filter(|&until| until > now)) {
                (Some(wait), _) => wait,
                (None, Some(until)) => Duration::from_nanos(until - now),
                (None, None) => backoff(self.streak.fetch_add(1, Ordering::Relaxed) + 1),
            }
            .min(MAX_REMEMBERED)
        };
        let until_after =
            |wait: Duration| now.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        if hourly {
            let mut capped = self.capped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (org.to_ascii_lowercase(), limit.to_owned());
            let wait = wait_from(capped.get(&key).copied());
            let until = until_after(wait);
            if capped.len() >= MAX_CAPPED {
                capped.retain(|_, &mut until| until > now);
            }
            if capped.len() < MAX_CAPPED {
                let kept = capped.entry(key).or_insert(until);
                *kept = (*kept).max(until);
                self.capped_until.fetch_max(until, Ordering::Relaxed);
            }
            self.capped_len.store(capped.len(), Ordering::Relaxed);
            wait
        } else {
            let wait = wait_from(Some(self.until.load(Ordering::Relaxed)));
            self.until.fetch_max(until_after(wait), Ordering::Relaxed);
            wait
        }
    }

    /// Tallyfy answered something else: a run of 429s without `Retry-After` is over.
    pub fn answered(&self) {
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn held_back_requests_wake_over_a_tenth_of_the_wait() {
        let wait = Duration::from_secs(2);
        assert_eq!(spread(wait, 0.0), wait, "never sooner than the 429 lifts");
        assert_eq!(spread(wait, 0.5), Duration::from_millis(2100));
        assert!(spread(wait, 0.999_999) < Duration::from_millis(2200));
        assert_eq!(spread(wait, 7.0), Duration::from_millis(2200), "jitter is clamped");
    }

    #[test]
    fn without_retry_after_the_wait_doubles_from_one_second_to_a_minute() {
        let waits: Vec<u64> = (1..=8).map(|streak| backoff(streak).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        let throttle = Throttle::default();
        assert_eq!(throttle.remember(None, false, "", "", 0), Duration::from_secs(1));
        assert_eq!(
            throttle.remember(None, false, "", "", SECOND),
            Duration::from_secs(2),
            "the next in a row"
        );
        throttle.answered();
        assert_eq!(
            throttle.remember(None, false, "", "", 3 * SECOND),
            Duration::from_secs(1),
            "a success resets it"
        );
    }

    /// 429s to requests that were in flight when the first came (they come
    /// while its wait runs) are that one episode: the wait is not doubled for
    /// each, for the burst throttle and for an hourly cap alike.
    #[test]
    fn the_429s_of_requests_sent_before_a_wait_began_are_one_episode() {
        let throttle = Throttle::default();
        assert_eq!(throttle.remember(None, false, "", "", 0), Duration::from_secs(1));
        for at in [1, 2, 6] {
            let wait = throttle.remember(None, false, "", "", at * SECOND / 10);
            assert_eq!(wait, Duration::from_secs(1) - Duration::from_millis(at * 100), "what is left of it");
        }
        assert_eq!(throttle.wait(SECOND, || (String::new(), String::new())), None, "lifted at 1 s");
        assert_eq!(
            throttle.remember(None, false, "", "", SECOND),
            Duration::from_secs(2),
            "then one more in a row"
        );

        let capped = Throttle::default();
        assert_eq!(capped.remember(None, true, "Org", "invites", 0), Duration::from_secs(1));
        assert_eq!(capped.remember(None, true, "org", "invites", SECOND / 2), Duration::from_millis(500));
        assert_eq!(
            capped.remember(None, true, "org", "comments", SECOND / 2),
            Duration::from_secs(2),
            "another cap"
        );
    }

    #[test]
    fn a_burst_throttle_holds_back_the_whole_credential_until_retry_after() {
        let throttle = Throttle::default();
        throttle.remember(Some(Duration::from_secs(3)), false, "org", "GET /x", 10 * SECOND);
        let key = || ("other".to_owned(), "POST /y".to_owned());
        assert_eq!(throttle.wait(11 * SECOND, key), Some(Duration::from_secs(2)));
        assert_eq!(throttle.wait(13 * SECOND, key), None, "lifted at Retry-After");
    }

    #[test]
    fn an_hourly_cap_holds_back_only_its_org_and_limit() {
        let throttle = Throttle::default();
        throttle.remember(Some(Duration::from_secs(600)), true, "ORG", "guest-invites", 0);
        let key = |org: &str, limit: &str| (org.to_owned(), limit.to_owned());
        assert_eq!(throttle.wait(SECOND, || key("org", "guest-invites")), Some(Duration::from_secs(599)));
        assert_eq!(throttle.wait(SECOND, || key("org", "comments")), None);
        assert_eq!(throttle.wait(SECOND, || key("other", "guest-invites")), None);
    }

    #[test]
    fn once_every_hourly_cap_has_run_out_requests_skip_them_again() {
        let throttle = Throttle::default();
        throttle.remember(Some(Duration::from_secs(600)), true, "org", "guest-invites", 0);
        throttle.remember(Some(Duration::from_secs(60)), true, "org", "comments", 0);
        let asked = std::cell::Cell::new(0);
        let key = || {
            asked.set(asked.get() + 1);
            ("org".to_owned(), "comments".to_owned())
        };
        assert_eq!(throttle.wait(30 * SECOND, key), Some(Duration::from_secs(30)));
        assert_eq!(throttle.wait(300 * SECOND, key), None, "this cap ran out, the other still stands");
        assert_eq!(asked.get(), 2);
        assert_eq!(throttle.wait(600 * SECOND, key), None);
        assert_eq!(throttle.wait(601 * SECOND, key), None);
        assert_eq!(asked.get(), 2, "no key built (nor lock taken) once every cap ran out");
        assert_eq!(throttle.capped_len.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_an_http_date() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, 0), None);
        headers.insert(RETRY_AFTER, "7".parse().expect("value"));
        assert_eq!(retry_after(&headers, 0), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("value"));
        assert_eq!(retry_after(&headers, 1_445_412_470), Some(Duration::from_secs(10)));
        headers.insert(RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(retry_after(&headers, 0), None);
    }

    #[test]
    fn no_429_is_remembered_for_more_than_an_hour() {
        let mut headers = HeaderMap::new();
        let throttle = Throttle::default();
        for far in ["18446744073709551615", "Fri, 01 Jan 9999 00:00:00 GMT"] {
            headers.insert(RETRY_AFTER, far.parse().expect("value"));
            assert_eq!(throttle.remember(retry_after(&headers, 0), true, "org", "x", 0), MAX_REMEMBERED);
        }
        // Another replica's report is held to the same bound.
        assert_eq!(throttle.remember(Some(Duration::MAX), false, "", "", 0), MAX_REMEMBERED);
        assert_eq!(throttle.wait(0, || (String::new(), String::new())), Some(MAX_REMEMBERED));
        assert_eq!(throttle.wait(3600 * SECOND, || (String::new(), String::new())), None, "lifted");
    }

    #[test]
    fn hourly_caps_are_told_by_their_code() {
        assert!(is_hourly_cap(br#"{"error":true,"message":"...","code":"RATE_LIMIT_EXCEEDED"}"#));
        assert!(is_hourly_cap(br#"{"error":{"code":"RATE_LIMIT_EXCEEDED"}}"#));
        assert!(!is_hourly_cap(br#"{"message":"Too Many Attempts."}"#));
        assert!(!is_hourly_cap(b"<html>"));
    }
}
