//! `[[limits]]`: at most `max` requests per `per` window, counted per
//! organisation and credential. A window opens with its first request and
//! closes `per` later (as Tallyfy's hourly caps are described: so many actions
//! in an hour), after which the count starts again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use smallvec::SmallVec;

use super::clock::Nanos;

/// One key's window: when it opened and how many requests it has counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub opened: Nanos,
    pub count: u32,
}

/// Counts one request into `window`, or says how long until the window closes.
/// Pure: time is passed in.
pub fn count(window: Option<Window>, now: Nanos, max: u32, per: Duration) -> Result<Window, Duration> {
    let per = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX);
    let open = window.filter(|w| now < w.opened.saturating_add(per));
    match open {
        None => Ok(Window { opened: now, count: 1 }),
        Some(w) if w.count < max => Ok(Window { count: w.count + 1, ..w }),
        Some(w) => Err(Duration::from_nanos(w.opened.saturating_add(per) - now)),
    }
}

/// Keys a rule has windows for at most; beyond it, closed windows are dropped
/// first, then the open ones that counted least ([`EVICTED`] of them at once).
/// Organisation IDs come from callers' paths, so the map must not grow without
/// bound.
pub const MAX_KEYS: usize = 10_000;

/// Open windows let go at once when the map is full of them: the scan is paid
/// once per this many new keys, not for each.
const EVICTED: usize = MAX_KEYS / 16;

/// The windows of one rule, by organisation and credential (one key,
/// `org\ncredential`, with the organisation lowercased).
#[derive(Debug, Default)]
pub struct Windows {
    open: Mutex<HashMap<Box<str>, Window>>,
}

/// The key of `org` and `credential`, built on the stack: a lookup allocates
/// nothing, only a new window does.
fn key<'b>(buffer: &'b mut SmallVec<[u8; 128]>, org: &str, credential: &str) -> &'b str {
    buffer.extend(org.bytes().map(|b| b.to_ascii_lowercase()));
    buffer.push(b'\n');
    buffer.extend_from_slice(credential.as_bytes());
    // Lowercasing ASCII bytes keeps UTF-8 valid. An org may hold a '\n' (`%0A`),
    // but the credential (a config name, no '\n') comes last: keys cannot meet.
    std::str::from_utf8(buffer).unwrap_or_default()
}

impl Windows {
    /// Whether a request of `credential` for `org` would be counted now,
    /// without counting it.
    pub fn peek(
        &self,
        org: &str,
        credential: &str,
        now: Nanos,
        max: u32,
        per: Duration,
    ) -> Result<(), Duration> {
        let mut buffer = SmallVec::new();
        let key = key(&mut buffer, org, credential);
        let open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        count(open.get(key).copied(), now, max, per).map(|_| ())
    }

    /// Counts a request of `credential` for `org`, or refuses it with the time
    /// until the window closes. With no `max` (the fleet decides), it counts
    /// past any.
    pub fn count(
        &self,
        org: &str,
        credential: &str,
        now: Nanos,
        max: Option<u32>,
        per: Duration,
    ) -> Result<(), Duration> {
        let mut buffer = SmallVec::new();
        let key = key(&mut buffer, org, credential);
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = open.get_mut(key);
        let window = count(known.as_deref().copied(), now, max.unwrap_or(u32::MAX), per)?;
        match known {
            Some(known) => *known = window,
            None => {
                if open.len() >= MAX_KEYS {
                    make_room(&mut open, now, per);
                }
                open.insert(key.into(), window);
            }
        }
        Ok(())
    }
}

impl Windows {
    /// Takes back one request of `credential` for `org` counted at `counted`
    /// (one refused, by the fleet or on its way, before it was sent): from the
    /// window it was counted in, if that
    /// one is still kept; a window it leaves empty is dropped, as if never opened.
    pub fn give_back(&self, org: &str, credential: &str, counted: Nanos) {
        let mut buffer = SmallVec::new();
        let key = key(&mut buffer, org, credential);
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(window) = open.get_mut(key) else { return };
        if window.opened > counted {
            return; // a later window, opened by another request
        }
        window.count = window.count.saturating_sub(1);
        if window.count == 0 {
            open.remove(key);
        }
    }
}

/// Drops the closed windows, then, while open ones still hold more than
/// `MAX_KEYS - EVICTED` places, the ones that counted least (the oldest among
/// equals) down to that: the scan under the rule's lock is paid once per
/// [`EVICTED`] new keys at most. Dropping the oldest instead let a caller empty
/// its own full window by opening fresh ones elsewhere; now a full window goes
/// only once about [`MAX_KEYS`] others are full too.
fn make_room(open: &mut HashMap<Box<str>, Window>, now: Nanos, per: Duration) {
    const { assert!(EVICTED >= 1 && EVICTED < MAX_KEYS) };
    let per = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX);
    open.retain(|_, w| now < w.opened.saturating_add(per));
    let Some(excess) = open.len().checked_sub(MAX_KEYS - EVICTED).filter(|&n| n > 0) else { return };
    let mut ranks: Vec<(u32, Nanos)> = open.values().map(|w| (w.count, w.opened)).collect();
    let (_, &mut last, _) = ranks.select_nth_unstable(excess - 1);
    // Exactly `excess`: all below the cut, and as many at it as are needed.
    let mut at_cut = excess - ranks.iter().filter(|&&rank| rank < last).count();
    open.retain(|_, w| match (w.count, w.opened).cmp(&last) {
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal if at_cut > 0 => {
            at_cut -= 1;
            false
        }
        _ => true,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_request_given_back_leaves_no_trace_and_a_later_window_is_left_alone() {
        let windows = Windows::default();
        let per = Duration::from_secs(2);
        assert_eq!(windows.count("Org", "app", 10 * SECOND, Some(1), per), Ok(()));
        assert!(windows.count("org", "app", 11 * SECOND, Some(1), per).is_err(), "full");
        windows.give_back("ORG", "app", 10 * SECOND);
        assert_eq!(windows.open.lock().expect("lock").len(), 0, "the emptied window is dropped");
        assert_eq!(windows.count("org", "app", 11 * SECOND, Some(1), per), Ok(()), "counted afresh");
        windows.give_back("org", "app", 10 * SECOND);
        assert!(
            windows.count("org", "app", 12 * SECOND, Some(1), per).is_err(),
            "the later window kept its count"
        );
    }

    #[test]
    fn thirty_an_hour_then_refused_until_the_window_closes() {
        let windows = Windows::default();
        let start = 5 * SECOND;
        for i in 0..30 {
            assert_eq!(
                windows.count("org", "app", start + i * SECOND, Some(30), HOUR),
                Ok(()),
                "request {i}"
            );
        }
        let refused = windows.count("org", "app", start + 600 * SECOND, Some(30), HOUR);
        assert_eq!(refused, Err(Duration::from_secs(3000)), "the window closes an hour after it opened");
        assert_eq!(
            windows.count("org", "app", start + 3600 * SECOND, Some(30), HOUR),
            Ok(()),
            "a new window"
        );
    }

    #[test]
    fn organisations_and_credentials_count_apart() {
        let windows = Windows::default();
        assert_eq!(windows.count("a", "app", 0, Some(1), HOUR), Ok(()));
        assert!(windows.count("a", "app", 1, Some(1), HOUR).is_err());
        assert_eq!(windows.count("b", "app", 1, Some(1), HOUR), Ok(()), "another org");
        assert_eq!(windows.count("a", "user", 1, Some(1), HOUR), Ok(()), "another credential");
        assert!(windows.count("A", "app", 2, Some(1), HOUR).is_err(), "org IDs are case-insensitive");
    }

    #[test]
    fn callers_naming_endless_orgs_cannot_grow_the_map_without_bound() {
        let windows = Windows::default();
        for i in 0..(MAX_KEYS as u64 + 500) {
            assert_eq!(windows.count(&format!("org-{i}"), "app", i, Some(1), HOUR), Ok(()));
        }
        assert!(windows.open.lock().expect("lock").len() <= MAX_KEYS);
    }

    #[test]
    fn a_full_map_is_emptied_a_sixteenth_at_a_time_even_when_few_windows_closed() {
        let mut open = HashMap::new();
        for i in 0..MAX_KEYS as u64 {
            // The first ten close at 1 h; the rest stay open.
            let opened = if i < 10 { 0 } else { 1_000 * SECOND };
            open.insert(format!("org-{i}").into_boxed_str(), Window { opened, count: 1 + (i % 7) as u32 });
        }
        // Open windows that counted more than one.
        let counted_more =
            |open: &HashMap<Box<str>, Window>| open.values().filter(|w| w.opened > 0 && w.count > 1).count();
        let before = counted_more(&open);
        make_room(&mut open, 3_600 * SECOND, HOUR);
        assert_eq!(open.len(), MAX_KEYS - EVICTED, "down to the mark, not one place below the cap");
        assert_eq!(counted_more(&open), before, "only windows that counted one went");
    }

    #[test]
    fn fresh_windows_elsewhere_do_not_empty_a_full_one() {
        let windows = Windows::default();
        for i in 0..30 {
            assert_eq!(windows.count("target", "app", i, Some(30), HOUR), Ok(()));
        }
        assert!(windows.count("target", "app", 30, Some(30), HOUR).is_err());
        // Fresh windows, one request each, past the map's size, all within the hour.
        for i in 0..(2 * MAX_KEYS as u64) {
            assert_eq!(windows.count(&format!("org-{i}"), "app", 100 + i, Some(30), HOUR), Ok(()));
        }
        assert!(windows.open.lock().expect("lock").len() <= MAX_KEYS);
        assert!(windows.count("target", "app", 200_000, Some(30), HOUR).is_err(), "still full");
    }
}
