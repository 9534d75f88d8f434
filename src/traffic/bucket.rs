//! `rate_limit = { per_second, burst }`: a token bucket per identity, kept as
//! the generic cell rate algorithm's one number (the theoretical arrival time
//! of the next request) in an `AtomicU64`, so admitting a request is one
//! compare-and-swap and never a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::clock::Nanos;

/// The bucket's shape: one request every `interval` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    /// Time between two requests at the sustained rate.
    fn interval(self) -> u64 {
        1_000_000_000 / u64::from(self.per_second.max(1))
    }

    /// How far ahead of now the arrival time may run: `burst - 1` intervals.
    fn tolerance(self) -> u64 {
        self.interval() * u64::from(self.burst.max(1) - 1)
    }
}

/// GCRA's decision. `tat` is the theoretical arrival time held so far: the
/// request is admitted (giving the new `tat`) or must wait the returned time.
/// Pure: every edge is a unit test.
pub fn admit(tat: Nanos, now: Nanos, rate: Rate) -> Result<Nanos, Duration> {
    let tat = tat.max(now);
    let ahead = tat - now;
    if ahead > rate.tolerance() {
        return Err(Duration::from_nanos(ahead - rate.tolerance()));
    }
    Ok(tat + rate.interval())
}

/// One identity's bucket, shared by every thread.
#[derive(Debug)]
pub struct Bucket {
    pub rate: Rate,
    tat: AtomicU64,
}

impl Bucket {
    pub fn new(rate: Rate) -> Bucket {
        Bucket { rate, tat: AtomicU64::new(0) }
    }

    /// Takes one request's place, or says how long until there is one.
    pub fn take(&self, now: Nanos) -> Result<(), Duration> {
        let mut current = self.tat.load(Ordering::Relaxed);
        loop {
            let next = admit(current, now, self.rate)?;
            match self.tat.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Gives one taken place back (a request refused, by the fleet or on its
    /// way, before it was sent): the arrival time moves back one interval.
    pub fn give_back(&self) {
        let interval = self.rate.interval();
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| Some(tat.saturating_sub(interval)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_place_given_back_can_be_taken_again() {
        let bucket = Bucket::new(Rate { per_second: 1, burst: 2 });
        let now = 100 * SECOND;
        assert!(bucket.take(now).is_ok() && bucket.take(now).is_ok());
        assert!(bucket.take(now).is_err(), "the burst is spent");
        bucket.give_back();
        assert!(bucket.take(now).is_ok(), "the place given back");
        assert!(bucket.take(now).is_err());
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate_holds() {
        let bucket = Bucket::new(Rate { per_second: 20, burst: 40 });
        let now = 100 * SECOND;
        let admitted = (0..100).filter(|_| bucket.take(now).is_ok()).count();
        assert_eq!(admitted, 40, "the burst, and not one more");
        assert_eq!(bucket.take(now), Err(Duration::from_millis(50)), "the next place frees in 1/20 s");
        // One second later, twenty more places.
        let later = now + SECOND;
        assert_eq!((0..100).filter(|_| bucket.take(later).is_ok()).count(), 20);
    }

    #[test]
    fn an_idle_bucket_refills_only_up_to_the_burst() {
        let rate = Rate { per_second: 5, burst: 2 };
        let bucket = Bucket::new(rate);
        assert!(bucket.take(10 * SECOND).is_ok());
        let much_later = 3600 * SECOND;
        assert_eq!((0..10).filter(|_| bucket.take(much_later).is_ok()).count(), 2);
    }

    #[test]
    fn a_burst_of_one_is_a_plain_rate() {
        let rate = Rate { per_second: 2, burst: 1 };
        assert_eq!(admit(0, SECOND, rate), Ok(SECOND + SECOND / 2));
        assert_eq!(admit(SECOND + SECOND / 2, SECOND, rate), Err(Duration::from_millis(500)));
    }

    #[test]
    fn threads_never_admit_more_than_the_burst() {
        let bucket = std::sync::Arc::new(Bucket::new(Rate { per_second: 1, burst: 1000 }));
        let admitted: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let bucket = bucket.clone();
                    scope.spawn(move || (0..1000).filter(|_| bucket.take(SECOND).is_ok()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(admitted, 1000);
    }
}
