//! Connections per peer address, for a listener that caps them (the admin
//! port): one peer holding keep-alive connections open must not take every
//! place and keep the kubelet's probes out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The open connections of each peer address, under a cap.
#[derive(Debug)]
pub(super) struct PeerPlaces {
    most: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerPlaces {
    pub fn new(most: usize) -> PeerPlaces {
        PeerPlaces { most, open: Arc::default() }
    }

    /// A place for one more connection of `peer`, or `None` when it holds
    /// `most` already.
    pub fn take(&self, peer: IpAddr) -> Option<PeerPlace> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(peer).or_default();
        if *count >= self.most {
            return None;
        }
        *count += 1;
        Some(PeerPlace { peer, open: self.open.clone() })
    }
}

/// One connection's place; given back when dropped (the entry goes with the
/// peer's last connection, so the map holds only peers with one open).
#[derive(Debug)]
pub(super) struct PeerPlace {
    peer: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_is_capped_apart_and_places_come_back() {
        let places = PeerPlaces::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let first = places.take(a).expect("one");
        let _second = places.take(a).expect("two");
        assert!(places.take(a).is_none(), "a third of the same peer");
        assert!(places.take(b).is_some(), "another peer has its own");
        drop(first);
        assert!(places.take(a).is_some(), "a place came back");
        drop(_second);
        assert!(places.open.lock().expect("lock").get(&b).is_none(), "b's place was dropped at once");
    }
}
