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
//! One total for the process, handed to the runtime threads in slabs of
//! [`SLAB`] bytes: a thread counts its bodies on a counter of its own (a cache
//! line no other core writes, as a request stays on its thread) against the
//! slabs it holds, and goes to the shared total only for another slab. When
//! bytes are given back (on whichever thread) the counting thread keeps one
//! spare slab and the rest returns to the total; before a refusal, the spare
//! slabs every thread keeps (and any an ended thread left) are taken back.
//! Any one thread may use the whole total (one busy HTTP/2 connection lives on
//! one thread). Bytes counted past the total ([`Reservation::force`]: a
//! rewritten copy that exists already) take no slab: the total can be passed
//! by such copies, and the next body on that thread feels them.
//!
//! When the total is spent, a body that must be read whole to be judged (a
//! `_method`, dates) is refused with 503 `buffers_full`; one that only would
//! have been kept for a replay, or read for its links, streams instead, as one
//! too large for those limits does.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Counters, one cache line each; threads beyond this many share them.
const SLOTS: usize = 256;

/// What a thread takes from the total at a time.
pub const SLAB: usize = 64 * 1024;

/// One thread's count, and the slabs it holds.
#[repr(align(128))]
struct Counter {
    used: AtomicUsize,
    granted: AtomicUsize,
}

/// The counters of the threads, and the slabs handed out of the total.
pub struct Counters {
    threads: [Counter; SLOTS],
    granted: AtomicUsize,
}

impl Counters {
    const fn new() -> Counters {
        Counters {
            threads: [const { Counter { used: AtomicUsize::new(0), granted: AtomicUsize::new(0) } }; SLOTS],
            granted: AtomicUsize::new(0),
        }
    }
}

/// The process's counters.
static COUNTERS: Counters = Counters::new();
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

/// `server.max_buffered_bytes`, and the counters it is spent on.
#[derive(Clone, Copy)]
pub struct Budget {
    total: usize,
    counters: &'static Counters,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("total", &self.total).finish()
    }
}

impl PartialEq for Budget {
    fn eq(&self, other: &Budget) -> bool {
        self.total == other.total && std::ptr::eq(self.counters, other.counters)
    }
}

impl Eq for Budget {}

impl Budget {
    /// `total`, never below `largest` (the largest single body the proxy reads
    /// whole) and a slab for it, so any one body fits an otherwise idle proxy.
    pub fn new(total: u64, largest: u64) -> Budget {
        let floor = largest.saturating_add(SLAB as u64);
        Budget { total: usize::try_from(total.max(floor)).unwrap_or(usize::MAX), counters: &COUNTERS }
    }

    /// No bound (tests and benches of other things).
    pub fn unlimited() -> Budget {
        Budget { total: usize::MAX, counters: &COUNTERS }
    }

    /// `total` on counters of its own (unit tests run side by side on threads
    /// that may share a slot of the process's counters).
    #[cfg(test)]
    pub(crate) fn alone(total: u64) -> Budget {
        Budget {
            total: usize::try_from(total).unwrap_or(usize::MAX),
            counters: Box::leak(Box::new(Counters::new())),
        }
    }

    /// An empty reservation on this thread's counter.
    pub fn reserve(self) -> Reservation {
        let slot = slot();
        Reservation { budget: self, slot, bytes: 0 }
    }

    /// Bytes this thread has counted and not yet given back.
    pub fn used_here(self) -> usize {
        self.counters.threads[slot()].used.load(Ordering::Relaxed)
    }

    /// Slabs handed out of the total, all threads together.
    pub fn granted(self) -> usize {
        self.counters.granted.load(Ordering::Relaxed)
    }

    /// Takes `wanted` bytes of slabs from the total, if it has them.
    fn take(self, wanted: usize) -> bool {
        let total = self.total;
        self.counters
            .granted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |out| {
                out.checked_add(wanted).filter(|&after| after <= total)
            })
            .is_ok()
    }

    /// Takes back every slab any thread holds past its count (the rare path
    /// of a refusal: it reads every thread's line). Whether any came back.
    fn reclaim(self) -> bool {
        let mut any = false;
        for counter in &self.counters.threads {
            any |= give_back(counter, 0, &self.counters.granted);
        }
        any
    }
}

/// Bytes counted on one thread's counter, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Budget,
    slot: usize,
    bytes: usize,
}

impl Reservation {
    fn counter(&self) -> &'static Counter {
        &self.budget.counters.threads[self.slot]
    }

    /// Counts `n` more bytes, or says the total is spent (nothing counted).
    pub fn grow(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let counter = self.counter();
        // A give-back racing this (another thread's, or one sharing the slot)
        // can leave the count a chunk past the slabs for a moment: the next
        // grow takes what is missing.
        let used = counter.used.load(Ordering::Relaxed);
        let granted = counter.granted.load(Ordering::Relaxed);
        let short = used.saturating_add(n).saturating_sub(granted);
        if short > 0 {
            let Some(wanted) = short.div_ceil(SLAB).checked_mul(SLAB) else { return false };
            // Slabs idle threads keep (one each, or more left by bodies dropped
            // elsewhere, or by a thread that ended) are taken back before a refusal.
            let taken = self.budget.take(wanted) || (self.budget.reclaim() && self.budget.take(wanted));
            if !taken {
                return false;
            }
            counter.granted.fetch_add(wanted, Ordering::Relaxed);
        }
        counter.used.fetch_add(n, Ordering::Relaxed);
        self.bytes += n;
        true
    }

    /// Counts `n` more bytes whatever the total (a rewritten copy that exists
    /// already: counted, so the next body sees the pressure).
    pub fn force(&mut self, n: usize) {
        self.counter().used.fetch_add(n, Ordering::Relaxed);
        self.bytes += n;
    }

    /// Moves `n` of its bytes (at most what it holds) into a reservation of their own.
    pub fn split(&mut self, n: usize) -> Reservation {
        debug_assert!(n <= self.bytes, "split {n} of {}", self.bytes);
        let n = n.min(self.bytes);
        self.bytes -= n;
        Reservation { budget: self.budget, slot: self.slot, bytes: n }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let counter = self.counter();
        counter.used.fetch_sub(self.bytes, Ordering::Relaxed);
        // Whichever thread drops the bytes: the counting thread keeps one spare
        // slab (so a small body after it touches no shared line), the rest
        // goes back to the total.
        give_back(counter, SLAB, &self.budget.counters.granted);
    }
}

/// Gives back to `pool` the whole slabs `counter` holds past its count and
/// `kept` bytes, in one atomic step on the slot (two threads sharing a slot, or
/// a drop racing the counting thread's, never give the same slab twice).
fn give_back(counter: &Counter, kept: usize, pool: &AtomicUsize) -> bool {
    let mut back = 0;
    let updated = counter.granted.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |granted| {
        let used = counter.used.load(Ordering::Relaxed);
        back = granted.saturating_sub(used.saturating_add(kept)) / SLAB * SLAB;
        (back > 0).then(|| granted - back)
    });
    if updated.is_ok() {
        pool.fetch_sub(back, Ordering::Relaxed);
    }
    updated.is_ok()
}

/// `bytes` carrying `reservation`: given back when the last handle to the
/// bytes (clones and slices included) is dropped.
pub fn held(bytes: Bytes, reservation: Reservation) -> Bytes {
    if reservation.bytes == 0 {
        return bytes;
    }
    Bytes::from_owner(Held { bytes, _reservation: reservation })
}

/// `bytes`, counted whatever the total ([`Reservation::force`]).
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
    fn the_total_is_spent_and_given_back_when_the_last_handle_is_dropped() {
        let budget = Budget::alone(4 * SLAB as u64);
        let mut first = budget.reserve();
        assert!(first.grow(3 * SLAB));
        let mut second = budget.reserve();
        assert!(!second.grow(SLAB + 1), "past the total: nothing counted");
        assert_eq!(second.bytes(), 0);
        assert!(second.grow(SLAB));
        let bytes = held(Bytes::from(vec![7; 3 * SLAB]), first);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(budget.used_here(), 4 * SLAB, "a slice still holds them");
        drop(slice);
        assert_eq!(budget.used_here(), SLAB, "given back with the last handle");
        assert!(budget.granted() <= 3 * SLAB, "spare slabs went back to the total");
        let piece = second.split(150);
        drop(second);
        assert_eq!(budget.used_here(), 150);
        drop(piece);
        let forced = held_forced(budget, Bytes::from(vec![0; 5 * SLAB]));
        assert_eq!(budget.used_here(), 5 * SLAB, "counted past the total");
        assert!(!budget.reserve().grow(1), "and felt by the next");
        drop(forced);
        assert_eq!(budget.used_here(), 0);
        assert!(budget.granted() <= SLAB, "one spare slab kept at most");
    }

    #[test]
    fn one_thread_may_spend_the_whole_total_and_others_then_wait_for_it() {
        let budget = Budget::alone(8 * SLAB as u64);
        let mut busy = budget.reserve();
        assert!(busy.grow(8 * SLAB), "no per-thread share: one HTTP/2 connection's thread may take it all");
        let refused = std::thread::spawn(move || budget.reserve().grow(1)).join().expect("joined");
        assert!(!refused, "another thread finds it spent");
        drop(busy);
        let granted = std::thread::spawn(move || {
            let mut other = budget.reserve();
            other.grow(SLAB)
        })
        .join()
        .expect("joined");
        assert!(granted, "given back, it serves another thread");
    }

    #[test]
    fn the_total_is_never_below_the_largest_single_body_and_a_slab() {
        assert_eq!(Budget::new(64 << 20, 2 << 20).total, 64 << 20);
        assert_eq!(Budget::new(1, 2 << 20).total, (2 << 20) + SLAB);
    }

    #[test]
    fn spare_slabs_of_idle_or_ended_threads_are_taken_back_before_a_refusal() {
        let budget = Budget::alone(4 * SLAB as u64);
        // A thread that counted a body, let it go and ended: it kept a spare slab.
        std::thread::spawn(move || {
            let mut reservation = budget.reserve();
            assert!(reservation.grow(3 * SLAB));
        })
        .join()
        .expect("joined");
        assert_eq!(budget.granted(), SLAB, "one spare slab kept");
        // Another thread needs the whole total: the spare comes back first.
        let mut whole = budget.reserve();
        assert!(whole.grow(4 * SLAB), "the ended thread's slab was taken back");
        drop(whole);
        assert_eq!(budget.granted(), SLAB);
    }

    #[test]
    fn bytes_counted_here_and_dropped_elsewhere_give_their_slabs_back() {
        let budget = Budget::alone(4 * SLAB as u64);
        let mut reservation = budget.reserve();
        assert!(reservation.grow(3 * SLAB));
        let bytes = held(Bytes::from(vec![1; 3 * SLAB]), reservation);
        std::thread::spawn(move || drop(bytes)).join().expect("joined");
        assert_eq!(budget.used_here(), 0);
        assert_eq!(budget.granted(), SLAB, "all but one spare went back to the total");
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
