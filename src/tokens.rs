//! The token store, read side: every current Tallyfy token in one `ArcSwap` snapshot.
//!
//! A request takes its token with one atomic load and one `HeaderValue` clone (a
//! reference-count bump): no lock, no `.await`, never a call to the token endpoint.
//! The refresher ([`refresh`]) is the single writer: it builds a whole new
//! snapshot and swaps it in, so readers always see a consistent set.
//!
//! There is one store and one refresher for the life of the process. Each token
//! lives in a *slot* ([`SlotId`]); a config generation maps its credentials onto
//! slots ([`CredentialTokens`]). A reload that leaves a credential unchanged maps
//! it onto the same slot, so its token, its schedule, a refresh already running
//! and the requests waiting for it all carry over; a changed credential gets a
//! new slot. Time is `tokio::time::Instant`, so tests can stop the clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::secret::Secret;

mod credential;
pub mod issuer;
pub mod jwt;
pub mod refresh;
pub mod schedule;
mod settings;

pub use credential::{Credential, CredentialId, CredentialKind, OAuthClient, Provision};
pub use refresh::CredentialSet;
pub use settings::Settings;

/// Where the store keeps one credential's token; stable across reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(u32);

impl SlotId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A usable Tallyfy token: the ready-made `Authorization` value, marked sensitive
/// so that `Debug` of a header map prints `Sensitive`, and when it stops working.
#[derive(Clone)]
pub struct Token {
    authorization: HeaderValue,
    /// `None` for tokens with no known expiry (personal access tokens).
    expires_at: Option<Instant>,
    /// Counts the tokens published for this slot; set by the store.
    generation: u64,
}

/// What a request takes from the store: the header value, and which token it
/// was, so a rejection can be reported without refreshing twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub authorization: HeaderValue,
    pub generation: u64,
}

impl Token {
    /// Builds `Bearer <access_token>`. Fails if the token holds bytes a header cannot.
    pub fn bearer(access_token: &Secret, expires_at: Option<Instant>) -> Result<Token, InvalidToken> {
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", access_token.expose())).map_err(|_| InvalidToken)?;
        authorization.set_sensitive(true);
        Ok(Token { authorization, expires_at, generation: 0 })
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|expiry| now < expiry)
    }

    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("authorization", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A token that cannot be put in a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the token holds bytes that cannot appear in an HTTP header")]
pub struct InvalidToken;

/// Why a request could not get a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Nothing was ever obtained for this credential.
    NeverObtained,
    /// The last token has expired and no new one arrived yet.
    Expired,
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
        match &snapshot.entries[slot.index()].token {
            Some(token) if token.is_valid_at(now) => {
                Ok(Lease { authorization: token.authorization.clone(), generation: token.generation })
            }
            Some(_) => Err(Unavailable::Expired),
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

/// The tokens of one config generation's credentials: which slot each
/// `[[credentials]]` table (by [`CredentialId`]) reads, and whether it can be
/// refreshed. Cheap to clone.
#[derive(Clone)]
pub struct CredentialTokens {
    store: Arc<TokenStore>,
    slots: Arc<[SlotId]>,
    refreshable: Arc<[bool]>,
}

impl CredentialTokens {
    pub fn new(store: Arc<TokenStore>, slots: Vec<SlotId>, refreshable: Vec<bool>) -> Self {
        CredentialTokens { store, slots: slots.into(), refreshable: refreshable.into() }
    }

    pub fn store(&self) -> &Arc<TokenStore> {
        &self.store
    }

    pub fn slot(&self, credential: CredentialId) -> SlotId {
        self.slots[credential.index()]
    }

    /// Whether a new token can be fetched at all (not for personal tokens).
    pub fn is_refreshable(&self, credential: CredentialId) -> bool {
        self.refreshable[credential.index()]
    }

    pub fn lease(&self, credential: CredentialId, now: Instant) -> Result<Lease, Unavailable> {
        self.store.lease(self.slot(credential), now)
    }

    pub fn name(&self, credential: CredentialId) -> Arc<str> {
        self.store.name(self.slot(credential))
    }

    pub fn expires_at(&self, credential: CredentialId) -> Option<Instant> {
        self.store.expires_at(self.slot(credential))
    }

    /// Every credential's name and token expiry (`None`: no token or none known).
    pub fn expiries(&self) -> Vec<(Arc<str>, Option<Instant>)> {
        self.slots.iter().map(|&slot| (self.store.name(slot), self.store.expires_at(slot))).collect()
    }

    /// Names of the credentials without a token valid at `now`; empty when ready.
    pub fn not_ready(&self, now: Instant) -> Vec<Arc<str>> {
        self.store.not_ready(&self.slots, now)
    }

    /// Resolves once every credential holds a valid token.
    pub async fn ready(&self) {
        self.store.ready(&self.slots).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: &str, expires_at: Option<Instant>) -> Token {
        Token::bearer(&Secret::new(value), expires_at).expect("ASCII token")
    }

    #[test]
    fn a_published_token_is_read_as_a_sensitive_bearer_header() {
        let store = TokenStore::new();
        let slot = store.add_slot("ops");
        let now = Instant::now();
        assert_eq!(store.lease(slot, now), Err(Unavailable::NeverObtained));
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

    #[test]
    fn tokens_with_spaces_or_newlines_are_refused() {
        assert!(Token::bearer(&Secret::new("a\nb"), None).is_err());
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
