//! A token as requests use it: the ready-made `Authorization` value and its expiry.

use std::fmt;

use http::HeaderValue;
use tokio::time::Instant;

use crate::secret::Secret;

/// A usable Tallyfy token: the ready-made `Authorization` value, marked sensitive
/// so that `Debug` of a header map prints `Sensitive`, and when it stops working.
#[derive(Clone)]
pub struct Token {
    pub(super) authorization: HeaderValue,
    /// `None` for tokens with no known expiry (personal access tokens).
    pub(super) expires_at: Option<Instant>,
    /// Counts the tokens published for this slot; set by the store.
    pub(super) generation: u64,
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
    /// Nothing obtained yet, and the first attempt is still under way: worth
    /// waiting for.
    FirstPending,
    /// Nothing was ever obtained for this credential, and an attempt ended.
    NeverObtained,
    /// The last token has expired and no new one arrived yet.
    Expired,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_with_spaces_or_newlines_are_refused() {
        assert!(Token::bearer(&Secret::new("a\nb"), None).is_err());
    }
}
