//! The token store, read side: every current Tallyfy token in one `ArcSwap` snapshot.
//!
//! A request takes its token with one atomic load and one `HeaderValue` clone (a
//! reference-count bump): no lock, no `.await`, never a call to the token endpoint.
//! Whoever obtains tokens (at start-up, and the background refresher) is the single
//! writer: it builds a whole new snapshot and swaps it in, so readers always see a
//! consistent set.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::watch;

use crate::secret::Secret;

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
}

impl Token {
    /// Builds `Bearer <access_token>`. Fails if the token holds bytes a header cannot.
    pub fn bearer(access_token: &Secret, expires_at: Option<Instant>) -> Result<Token, InvalidToken> {
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", access_token.expose())).map_err(|_| InvalidToken)?;
        authorization.set_sensitive(true);
        Ok(Token { authorization, expires_at })
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
    /// Bumped on every publish, so start-up and tests can wait for readiness
    /// instead of polling.
    published: watch::Sender<u64>,
}

impl TokenStore {
    pub fn new(names: Vec<String>) -> Arc<TokenStore> {
        let empty = Snapshot { tokens: vec![None; names.len()].into_boxed_slice() };
        Arc::new(TokenStore {
            current: ArcSwap::from_pointee(empty),
            names: names.into_boxed_slice(),
            published: watch::channel(0).0,
        })
    }

    /// The hot path: the `Authorization` value for `id`, if a token valid at `now` is held.
    pub fn authorization(&self, id: CredentialId, now: Instant) -> Result<HeaderValue, Unavailable> {
        let snapshot = self.current.load();
        match &snapshot.tokens[id.0] {
            Some(token) if token.is_valid_at(now) => Ok(token.authorization.clone()),
            Some(_) => Err(Unavailable::Expired),
            None => Err(Unavailable::NeverObtained),
        }
    }

    /// The writer side: replaces the token of `id` in a new snapshot.
    pub fn publish(&self, id: CredentialId, token: Token) {
        self.current.rcu(|old| {
            let mut next = Snapshot::clone(old);
            next.tokens[id.0] = Some(token.clone());
            next
        });
        self.published.send_modify(|version| *version += 1);
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
    use std::time::Duration;

    fn token(value: &str, expires_at: Option<Instant>) -> Token {
        Token::bearer(&Secret::new(value), expires_at).expect("ASCII token")
    }

    #[test]
    fn a_published_token_is_read_as_a_sensitive_bearer_header() {
        let store = TokenStore::new(vec!["ops".into()]);
        let id = CredentialId::new(0);
        let now = Instant::now();
        assert_eq!(store.authorization(id, now), Err(Unavailable::NeverObtained));
        store.publish(id, token("abc", None));
        let value = store.authorization(id, now).expect("published");
        assert_eq!(value, "Bearer abc");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("abc"));
    }

    #[test]
    fn an_expired_token_is_never_handed_out() {
        let store = TokenStore::new(vec!["a".into(), "b".into()]);
        let now = Instant::now();
        store.publish(CredentialId::new(0), token("t", Some(now + Duration::from_secs(5))));
        assert!(store.authorization(CredentialId::new(0), now).is_ok());
        assert_eq!(
            store.authorization(CredentialId::new(0), now + Duration::from_secs(5)),
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
}
