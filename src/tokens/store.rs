//! [`TokenStore`]: every slot's token in one `ArcSwap` snapshot, written only by
//! the refresher and read with one atomic load per request.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::token::{Lease, Token, Unavailable};

/// Where the store keeps one credential's token; stable across reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(u32);

impl SlotId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One slot in a snapshot.
#[derive(Debug, Clone)]
struct Entry {
    /// The credential's name, for readiness messages and metrics.
    name: Arc<str>,
    token: Option<Token>,
    /// Fetch attempts finished (published or failed) and rejections the
    /// refresher declined. Requests waiting after a rejection stop waiting when
    /// it moves.
    settled: u64,
}

impl Entry {
    /// No token yet, and no attempt for one has ended.
    fn first_pending(&self) -> bool {
        self.token.is_none() && self.settled == 0
    }
}

/// One consistent view of all tokens, indexed by [`SlotId`].
#[derive(Debug, Clone, Default)]
struct Snapshot {
    entries: Vec<Entry>,
}

pub struct TokenStore {
    current: ArcSwap<Snapshot>,
    /// Bumped on every publish and settle, so waiters wake instead of polling.
    published: watch::Sender<u64>,
}

impl TokenStore {
    pub fn new() -> Arc<TokenStore> {
        Arc::new(TokenStore {
            current: ArcSwap::from_pointee(Snapshot::default()),
            published: watch::channel(0).0,
        })
    }

    /// The hot path: the token in `slot`, if one valid at `now` is held. One
    /// atomic load and a reference-count bump; no lock, no allocation, no `.await`.
    pub fn lease(&self, slot: SlotId, now: Instant) -> Result<Lease, Unavailable> {
        let snapshot = self.current.load();
        let entry = &snapshot.entries[slot.index()];
        match &entry.token {
            Some(token) if token.is_valid_at(now) => {
                Ok(Lease { authorization: token.authorization.clone(), generation: token.generation })
            }
            Some(_) => Err(Unavailable::Expired),
            None if entry.first_pending() => Err(Unavailable::FirstPending),
            None => Err(Unavailable::NeverObtained),
        }
    }

    /// The generation of the token in `slot` (0 when none was ever published).
    pub fn generation(&self, slot: SlotId) -> u64 {
        self.current.load().entries[slot.index()].token.as_ref().map_or(0, |t| t.generation)
    }

    /// When the token in `slot` expires, if one is held and its expiry is known.
    pub fn expires_at(&self, slot: SlotId) -> Option<Instant> {
        self.current.load().entries[slot.index()].token.as_ref().and_then(|t| t.expires_at)
    }

    /// The token in `slot`, expired or not.
    pub fn token(&self, slot: SlotId) -> Option<Token> {
        self.current.load().entries[slot.index()].token.clone()
    }

    pub fn name(&self, slot: SlotId) -> Arc<str> {
        self.current.load().entries[slot.index()].name.clone()
    }

    /// Whether `slot` has never held a token and no attempt for it has ended
    /// yet: its first fetch is still under way, worth waiting for.
    pub fn first_pending(&self, slot: SlotId) -> bool {
        self.current.load().entries[slot.index()].first_pending()
    }

    /// How many attempts for `slot` have settled so far.
    pub fn settled(&self, slot: SlotId) -> u64 {
        self.current.load().entries[slot.index()].settled
    }

    /// The writer side (in the proxy, only the refresher writes; benches and
    /// tests fill stores directly): a new, empty slot for the credential `name`.
    pub fn add_slot(&self, name: &str) -> SlotId {
        let mut added = SlotId(0);
        self.current.rcu(|old| {
            let mut next = Snapshot::clone(old);
            added = SlotId(u32::try_from(next.entries.len()).expect("fewer than 2^32 credentials"));
            next.entries.push(Entry { name: Arc::from(name), token: None, settled: 0 });
            next
        });
        added
    }

    /// The writer side: replaces the token of `slot` in a new snapshot, one
    /// generation above the last, and settles the attempt that obtained it.
    pub fn publish(&self, slot: SlotId, token: Token) {
        self.update(slot, |entry| {
            let generation = entry.token.as_ref().map_or(0, |t| t.generation) + 1;
            entry.token = Some(Token { generation, ..token.clone() });
            entry.settled += 1;
        });
    }

    /// Marks the end of a fetch attempt for `slot` (or a declined rejection) and
    /// wakes waiters.
    pub fn settle(&self, slot: SlotId) {
        self.update(slot, |entry| entry.settled += 1);
    }

    /// Forgets the token of a slot no config uses any more.
    pub fn clear(&self, slot: SlotId) {
        self.update(slot, |entry| entry.token = None);
    }

    fn update(&self, slot: SlotId, change: impl Fn(&mut Entry)) {
        self.current.rcu(|old| {
            let mut next = Snapshot::clone(old);
            change(&mut next.entries[slot.index()]);
            next
        });
        self.published.send_modify(|version| *version += 1);
    }

    /// After reporting generation `generation` of `slot` as rejected (having read
    /// `settled` = [`TokenStore::settled`] before reporting): waits until a newer,
    /// valid token is published (`Some`), or an attempt settles without one, or
    /// `timeout` passes (`None`). How requests that saw a rejected token share the
    /// one refresh it triggered, and learn quickly when there will be none.
    pub async fn newer_than(
        &self,
        slot: SlotId,
        generation: u64,
        settled: u64,
        timeout: Duration,
    ) -> Option<Lease> {
        let mut published = self.published.subscribe();
        let wait = async {
            loop {
                if let Ok(lease) = self.lease(slot, Instant::now())
                    && lease.generation > generation
                {
                    return Some(lease);
                }
                if self.settled(slot) > settled {
                    return None;
                }
                if published.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Names of the `slots` without a token valid at `now`; empty when ready.
    pub fn not_ready(&self, slots: &[SlotId], now: Instant) -> Vec<Arc<str>> {
        let snapshot = self.current.load();
        slots
            .iter()
            .map(|slot| &snapshot.entries[slot.index()])
            .filter(|entry| !entry.token.as_ref().is_some_and(|t| t.is_valid_at(now)))
            .map(|entry| entry.name.clone())
            .collect()
    }

    /// Resolves once every slot of `slots` holds a token valid at that moment.
    pub async fn ready(&self, slots: &[SlotId]) {
        let mut published = self.published.subscribe();
        while !self.not_ready(slots, Instant::now()).is_empty() {
            if published.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn token(value: &str, expires_at: Option<Instant>) -> Token {
        Token::bearer(&Secret::new(value), expires_at).expect("ASCII token")
    }

    #[test]
    fn a_published_token_is_read_as_a_sensitive_bearer_header() {
        let store = TokenStore::new();
        let slot = store.add_slot("ops");
        let now = Instant::now();
        assert_eq!(store.lease(slot, now), Err(Unavailable::FirstPending));
        store.settle(slot);
        assert_eq!(store.lease(slot, now), Err(Unavailable::NeverObtained), "an attempt ended");
        store.publish(slot, token("abc", None));
        let lease = store.lease(slot, now).expect("published");
        assert_eq!(lease.generation, 1);
        let value = lease.authorization;
        assert_eq!(value, "Bearer abc");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("abc"));
    }

    #[test]
    fn an_expired_token_is_never_handed_out() {
        let store = TokenStore::new();
        let (a, b) = (store.add_slot("a"), store.add_slot("b"));
        let now = Instant::now();
        store.publish(a, token("t", Some(now + Duration::from_secs(5))));
        assert!(store.lease(a, now).is_ok());
        assert_eq!(store.lease(a, now + Duration::from_secs(5)), Err(Unavailable::Expired));
        let names = |slots: &[SlotId], at| {
            store.not_ready(slots, at).iter().map(|n| n.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(names(&[a, b], now), ["b"]);
        assert_eq!(names(&[a, b], now + Duration::from_secs(6)), ["a", "b"]);
        assert!(names(&[a], now).is_empty(), "readiness is per set of slots");
    }

    #[tokio::test]
    async fn ready_resolves_after_the_last_publish() {
        let store = TokenStore::new();
        let slot = store.add_slot("a");
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.ready(&[slot]).await }
        });
        store.publish(slot, token("t", None));
        waiter.await.expect("ready() resolves once published");
        assert!(store.not_ready(&[slot], Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_the_next_generation() {
        let store = TokenStore::new();
        let slot = store.add_slot("a");
        store.publish(slot, token("old", None));
        let settled = store.settled(slot);
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.newer_than(slot, 1, settled, Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        store.publish(slot, token("new", None));
        let lease = waiter.await.expect("task").expect("a newer token arrived");
        assert_eq!((lease.authorization.to_str().ok(), lease.generation), (Some("Bearer new"), 2));
        let settled = store.settled(slot);
        let began = Instant::now();
        assert_eq!(store.newer_than(slot, 2, settled, Duration::from_secs(5)).await, None, "no newer one");
        assert_eq!(began.elapsed(), Duration::from_secs(5), "it waited the whole timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_releases_waiters_at_once() {
        let store = TokenStore::new();
        let slot = store.add_slot("a");
        store.publish(slot, token("old", None));
        let settled = store.settled(slot);
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.newer_than(slot, 1, settled, Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        let began = Instant::now();
        store.settle(slot); // the refresh failed
        assert_eq!(waiter.await.expect("task"), None);
        assert_eq!(began.elapsed(), Duration::ZERO, "released at once, not after 60 s");
    }
}
