//! The token store, read side: every current Tallyfy token in one `ArcSwap` snapshot.
//!
//! A request takes its token with one atomic load and one `HeaderValue` clone (a
//! reference-count bump): no lock, no `.await`, never a call to the token endpoint.
//! Whoever obtains tokens (at start-up, and the background refresher) is the single
//! writer: it builds a whole new snapshot and swaps it in, so readers always see a
//! consistent set.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::watch;

use crate::secret::Secret;

pub mod issuer;
pub mod jwt;
pub mod refresh;
pub mod schedule;

/// Index of a `[[credentials]]` table, fixed when the config is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialId(usize);

impl CredentialId {
    pub fn new(index: usize) -> Self {
        Self(index)
    }

    pub fn index(self) -> usize {
        self.0
    }
}

/// A usable Tallyfy token: the ready-made `Authorization` value, marked sensitive
/// so that `Debug` of a header map prints `Sensitive`, and when it stops working.
#[derive(Clone)]
pub struct Token {
    authorization: HeaderValue,
    /// `None` for tokens with no known expiry (personal access tokens).
    expires_at: Option<Instant>,
    /// Counts the tokens published for this credential; set by the store.
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

/// One consistent view of all tokens, indexed by [`CredentialId`].
#[derive(Debug, Clone)]
struct Snapshot {
    tokens: Box<[Option<Token>]>,
}

pub struct TokenStore {
    current: ArcSwap<Snapshot>,
    /// Credential names, for readiness messages.
    names: Box<[String]>,
    /// Per credential: fetch attempts finished (published or failed) and
    /// rejections the refresher declined. Requests waiting after a rejection stop
    /// waiting when it moves.
    settled: Box<[AtomicU64]>,
    /// Bumped on every publish and settle, so waiters wake instead of polling.
    published: watch::Sender<u64>,
}

impl TokenStore {
    pub fn new(names: Vec<String>) -> Arc<TokenStore> {
        let empty = Snapshot { tokens: vec![None; names.len()].into_boxed_slice() };
        Arc::new(TokenStore {
            current: ArcSwap::from_pointee(empty),
            settled: names.iter().map(|_| AtomicU64::new(0)).collect(),
            names: names.into_boxed_slice(),
            published: watch::channel(0).0,
        })
    }

    /// The hot path: the token for `id`, if one valid at `now` is held. One atomic
    /// load and a reference-count bump; no lock, no allocation, no `.await`.
    pub fn lease(&self, id: CredentialId, now: Instant) -> Result<Lease, Unavailable> {
        let snapshot = self.current.load();
        match &snapshot.tokens[id.0] {
            Some(token) if token.is_valid_at(now) => {
                Ok(Lease { authorization: token.authorization.clone(), generation: token.generation })
            }
            Some(_) => Err(Unavailable::Expired),
            None => Err(Unavailable::NeverObtained),
        }
    }

    /// The generation of the token held for `id` (0 when none was ever published).
    pub fn generation(&self, id: CredentialId) -> u64 {
        self.current.load().tokens[id.0].as_ref().map_or(0, |t| t.generation)
    }

    /// When the token held for `id` expires, if one is held and its expiry is known.
    pub fn expires_at(&self, id: CredentialId) -> Option<Instant> {
        self.current.load().tokens[id.0].as_ref().and_then(|t| t.expires_at)
    }

    /// The writer side: replaces the token of `id` in a new snapshot, one
    /// generation above the last. Only the refresher calls it.
    pub fn publish(&self, id: CredentialId, mut token: Token) {
        self.current.rcu(|old| {
            let mut next = Snapshot::clone(old);
            token.generation = old.tokens[id.0].as_ref().map_or(0, |t| t.generation) + 1;
            next.tokens[id.0] = Some(token.clone());
            next
        });
        self.settle(id);
    }

    /// Marks the end of a fetch attempt for `id` (or a declined rejection) and
    /// wakes waiters.
    pub fn settle(&self, id: CredentialId) {
        self.settled[id.0].fetch_add(1, Ordering::Release);
        self.published.send_modify(|version| *version += 1);
    }

    /// How many attempts for `id` have settled so far.
    pub fn settled(&self, id: CredentialId) -> u64 {
        self.settled[id.0].load(Ordering::Acquire)
    }

    /// The token currently held for `id`, expired or not (for handing over state).
    pub fn token(&self, id: CredentialId) -> Option<Token> {
        self.current.load().tokens[id.0].clone()
    }

    /// After reporting generation `generation` of `id` as rejected (having read
    /// `settled` = [`TokenStore::settled`] before reporting): waits until a newer,
    /// valid token is published (`Some`), or an attempt settles without one, or
    /// `timeout` passes (`None`). How requests that saw a rejected token share the
    /// one refresh it triggered, and learn quickly when there will be none.
    pub async fn newer_than(
        &self,
        id: CredentialId,
        generation: u64,
        settled: u64,
        timeout: Duration,
    ) -> Option<Lease> {
        let mut published = self.published.subscribe();
        let wait = async {
            loop {
                if let Ok(lease) = self.lease(id, Instant::now())
                    && lease.generation > generation
                {
                    return Some(lease);
                }
                if self.settled(id) > settled {
                    return None;
                }
                if published.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Number of credentials.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, id: CredentialId) -> &str {
        &self.names[id.0]
    }

    /// Names of the credentials without a token valid at `now`; empty when ready.
    pub fn not_ready(&self, now: Instant) -> Vec<&str> {
        let snapshot = self.current.load();
        snapshot
            .tokens
            .iter()
            .zip(self.names.iter())
            .filter(|(token, _)| !token.as_ref().is_some_and(|t| t.is_valid_at(now)))
            .map(|(_, name)| name.as_str())
            .collect()
    }

    /// Resolves once every credential holds a token valid at that moment.
    pub async fn ready(&self) {
        let mut published = self.published.subscribe();
        while !self.not_ready(Instant::now()).is_empty() {
            if published.changed().await.is_err() {
                return;
            }
        }
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
        let store = TokenStore::new(vec!["ops".into()]);
        let id = CredentialId::new(0);
        let now = Instant::now();
        assert_eq!(store.lease(id, now), Err(Unavailable::NeverObtained));
        store.publish(id, token("abc", None));
        let lease = store.lease(id, now).expect("published");
        assert_eq!(lease.generation, 1);
        let value = lease.authorization;
        assert_eq!(value, "Bearer abc");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("abc"));
    }

    #[test]
    fn an_expired_token_is_never_handed_out() {
        let store = TokenStore::new(vec!["a".into(), "b".into()]);
        let now = Instant::now();
        store.publish(CredentialId::new(0), token("t", Some(now + Duration::from_secs(5))));
        assert!(store.lease(CredentialId::new(0), now).is_ok());
        assert_eq!(
            store.lease(CredentialId::new(0), now + Duration::from_secs(5)),
            Err(Unavailable::Expired)
        );
        assert_eq!(store.not_ready(now), vec!["b"]);
        assert_eq!(store.not_ready(now + Duration::from_secs(6)), vec!["a", "b"]);
    }

    #[test]
    fn tokens_with_spaces_or_newlines_are_refused() {
        assert!(Token::bearer(&Secret::new("a\nb"), None).is_err());
    }

    #[tokio::test]
    async fn ready_resolves_after_the_last_publish() {
        let store = TokenStore::new(vec!["a".into()]);
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.ready().await }
        });
        store.publish(CredentialId::new(0), token("t", None));
        waiter.await.expect("ready() resolves once published");
        assert!(store.not_ready(Instant::now()).is_empty());
    }

    #[tokio::test]
    async fn waiters_get_the_next_generation() {
        let store = TokenStore::new(vec!["a".into()]);
        let id = CredentialId::new(0);
        store.publish(id, token("old", None));
        let settled = store.settled(id);
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.newer_than(id, 1, settled, Duration::from_secs(5)).await }
        });
        store.publish(id, token("new", None));
        let lease = waiter.await.expect("task").expect("a newer token arrived");
        assert_eq!((lease.authorization.to_str().ok(), lease.generation), (Some("Bearer new"), 2));
        let settled = store.settled(id);
        assert_eq!(
            store.newer_than(id, 2, settled, Duration::from_millis(20)).await,
            None,
            "times out without a newer one"
        );
    }

    #[tokio::test]
    async fn a_failed_attempt_releases_waiters_at_once() {
        let store = TokenStore::new(vec!["a".into()]);
        let id = CredentialId::new(0);
        store.publish(id, token("old", None));
        let settled = store.settled(id);
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.newer_than(id, 1, settled, Duration::from_secs(60)).await }
        });
        store.settle(id); // the refresh failed
        let result =
            tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released well before 60 s");
        assert_eq!(result.expect("task"), None);
    }
}
