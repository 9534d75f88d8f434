//! `max_in_flight`: how many requests of one identity may be open at once. A
//! request holds its place until its response body ends (or is dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One identity's open requests. One count for the identity whatever its
/// `max` (a reload may change it): the requests still open under the old
/// maximum hold their places against the new one.
#[derive(Debug)]
pub struct InFlight {
    max: AtomicUsize,
    open: AtomicUsize,
}

impl InFlight {
    pub fn new(max: usize) -> InFlight {
        InFlight { max: AtomicUsize::new(max), open: AtomicUsize::new(0) }
    }

    /// The most requests that may be open.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A reload's new maximum (the places already taken stay taken).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A place, or `None` when `max` requests are open.
    pub fn enter(self: &Arc<Self>) -> Option<Place> {
        let max = self.max();
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1))
            .ok()
            .map(|_| Place(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A request's place; given back when dropped.
#[derive(Debug)]
pub struct Place(Arc<InFlight>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_and_given_back() {
        let limit = Arc::new(InFlight::new(2));
        let a = limit.enter().expect("first");
        let _b = limit.enter().expect("second");
        assert!(limit.enter().is_none(), "a third waits");
        drop(a);
        assert!(limit.enter().is_some(), "a place came back");
        assert_eq!(limit.open(), 1, "the temporary place was given back too");
    }

    #[test]
    fn a_lower_maximum_counts_the_places_already_taken() {
        let limit = Arc::new(InFlight::new(4));
        let _held: Vec<Place> = (0..3).map(|_| limit.enter().expect("a place")).collect();
        limit.set_max(2);
        assert!(limit.enter().is_none(), "three open under the old maximum fill the new one");
        limit.set_max(5);
        assert!(limit.enter().is_some());
    }
}
