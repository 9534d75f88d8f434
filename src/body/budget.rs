//! The memory bodies held whole may take (`server.max_buffered_bytes`).
//!
//! Each buffered body is bounded on its own (`dates.max_body_bytes`,
//! `links.max_body_bytes`, `tokens.replay_max_body_bytes`), but the number of
//! such bodies is bounded only by the connections and their HTTP/2 streams: a
//! few hundred callers sending 2 MiB of JSON at once would take gigabytes.
//! The budget bounds the sum. Bytes are counted as they are read, and given
//! back when the last handle to them is dropped ([`held`]): a body sent on is
//! counted until it is out, however slowly the other side reads.
//!
//! Counted per runtime thread, each thread with its share of the budget: the
//! counters sit on cache lines of their own, so a request never touches a line
//! another core writes (a request stays on its thread; a body dropped on
//! another thread gives its bytes back to the thread that counted them).
//!
//! When a thread's share is spent, a body that must be read whole to be judged
//! (a `_method`, dates) is refused with 503 `buffers_full`; one that only
//! would have been kept for a replay, or read for its links, streams instead,
//! as one too large for those limits does.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Counters, one cache line each; threads beyond this many share them.
const SLOTS: usize = 256;

#[repr(align(128))]
struct Counter(AtomicUsize);

/// One counter per thread (threads past [`SLOTS`] share).
pub struct Counters([Counter; SLOTS]);

impl Counters {
    const fn new() -> Counters {
        Counters([const { Counter(AtomicUsize::new(0)) }; SLOTS])
    }

    fn here(&'static self) -> &'static AtomicUsize {
        &self.0[slot()].0
    }
}

/// The process's counters.
static USED: Counters = Counters::new();
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's counter, taken on its first reservation.
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

fn slot() -> usize {
    SLOT.with(|slot| {
        *slot.get().get_or_insert_with(|| {
            let taken = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            slot.set(Some(taken));
            taken
        })
    })
}

/// One thread's share of `server.max_buffered_bytes`.
#[derive(Clone, Copy)]
pub struct Budget {
    per_thread: usize,
    counters: &'static Counters,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("per_thread", &self.per_thread).finish()
    }
}

impl PartialEq for Budget {
    fn eq(&self, other: &Budget) -> bool {
        self.per_thread == other.per_thread && std::ptr::eq(self.counters, other.counters)
    }
}

impl Eq for Budget {}

impl Budget {
    /// `total` shared by `threads`; each share at least `largest` (the largest
    /// single body the proxy reads whole), so any one body can be read on an
    /// idle thread however many threads share the total.
    pub fn new(total: u64, threads: usize, largest: u64) -> Budget {
        let share = total / threads.max(1) as u64;
        Budget { per_thread: usize::try_from(share.max(largest)).unwrap_or(usize::MAX), counters: &USED }
    }

    /// No bound (tests and benches of other things).
    pub fn unlimited() -> Budget {
        Budget { per_thread: usize::MAX, counters: &USED }
    }

    /// `total` on counters of its own (unit tests run side by side on threads
    /// that may share a slot of the process's counters).
    #[cfg(test)]
    pub(crate) fn alone(total: u64) -> Budget {
        Budget { counters: Box::leak(Box::new(Counters::new())), ..Budget::new(total, 1, 0) }
    }

    /// An empty reservation on this thread's counter.
    pub fn reserve(self) -> Reservation {
        Reservation { per_thread: self.per_thread, counter: self.counters.here(), bytes: 0 }
    }

    /// Bytes this thread has counted and not yet given back.
    pub fn used_here(self) -> usize {
        self.counters.here().load(Ordering::Relaxed)
    }
}

/// Bytes counted against one thread's share, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    per_thread: usize,
    counter: &'static AtomicUsize,
    bytes: usize,
}

impl Reservation {
    /// Counts `n` more bytes, or says the share is spent (nothing counted).
    pub fn grow(&mut self, n: usize) -> bool {
        // Only this thread adds to its counter, so a load then an add cannot
        // overshoot; a give-back from elsewhere in between only errs low.
        if self.counter.load(Ordering::Relaxed).saturating_add(n) > self.per_thread {
            return false;
        }
        self.counter.fetch_add(n, Ordering::Relaxed);
        self.bytes += n;
        true
    }

    /// Counts `n` more bytes whatever the share (a rewritten copy that exists
    /// already: counted, so the next body sees the pressure).
    pub fn force(&mut self, n: usize) {
        self.counter.fetch_add(n, Ordering::Relaxed);
        self.bytes += n;
    }

    /// Moves `n` of its bytes (at most what it holds) into a reservation of their own.
    pub fn split(&mut self, n: usize) -> Reservation {
        debug_assert!(n <= self.bytes, "split {n} of {}", self.bytes);
        let n = n.min(self.bytes);
        self.bytes -= n;
        Reservation { per_thread: self.per_thread, counter: self.counter, bytes: n }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// `bytes` carrying `reservation`: given back when the last handle to the
/// bytes (clones and slices included) is dropped.
pub fn held(bytes: Bytes, reservation: Reservation) -> Bytes {
    if reservation.bytes == 0 {
        return bytes;
    }
    Bytes::from_owner(Held { bytes, _reservation: reservation })
}

/// `bytes`, counted whatever the share ([`Reservation::force`]).
pub fn held_forced(budget: Budget, bytes: Bytes) -> Bytes {
    let mut reservation = budget.reserve();
    reservation.force(bytes.len());
    held(bytes, reservation)
}

struct Held {
    bytes: Bytes,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_spent_and_given_back_when_the_last_handle_is_dropped() {
        let budget = Budget::alone(1000);
        let mut first = budget.reserve();
        assert!(first.grow(600));
        let mut second = budget.reserve();
        assert!(!second.grow(401), "over the share: nothing counted");
        assert_eq!(second.bytes(), 0);
        assert!(second.grow(400));
        let bytes = held(Bytes::from(vec![7; 600]), first);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(budget.used_here(), 1000, "a slice still holds them");
        drop(slice);
        assert_eq!(budget.used_here(), 400, "given back with the last handle");
        let piece = second.split(150);
        drop(second);
        assert_eq!(budget.used_here(), 150);
        drop(piece);
        let forced = held_forced(budget, Bytes::from(vec![0; 5000]));
        assert_eq!(budget.used_here(), 5000, "counted past the share");
        assert!(!budget.reserve().grow(1), "and felt by the next");
        drop(forced);
        assert_eq!(budget.used_here(), 0);
    }

    #[test]
    fn a_share_is_never_below_the_largest_single_body() {
        assert_eq!(Budget::new(64 << 20, 2, 2 << 20).per_thread, 32 << 20);
        assert_eq!(Budget::new(64 << 20, 64, 2 << 20).per_thread, 2 << 20);
    }

    #[test]
    fn bytes_dropped_on_another_thread_go_back_to_the_counting_one() {
        let budget = Budget::alone(1 << 20);
        let mut reservation = budget.reserve();
        assert!(reservation.grow(100));
        let bytes = held(Bytes::from(vec![1; 100]), reservation);
        std::thread::spawn(move || drop(bytes)).join().expect("joined");
        assert_eq!(budget.used_here(), 0);
    }
}
