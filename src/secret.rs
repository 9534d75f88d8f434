//! Secret material that cannot print.
//!
//! Tokens, client secrets, passwords and API keys live in [`Secret`]. Its `Debug`
//! prints `Secret([redacted])` and it has no `Display`, so a secret cannot reach a
//! log line, an error message or a response by accident: the only way to the bytes
//! is [`Secret::expose`], which is easy to grep for.

use std::fmt;

/// A secret string. Cloning is cheap enough for configuration; the hot path never
/// touches a `Secret` (it reads ready-made, sensitive `HeaderValue`s from the token store).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into().into_boxed_str())
    }

    /// The secret value. Call sites are where secrets leave their box: keep them few.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("tok_live_123");
        let printed = format!("{secret:?} {:#?}", Some(&secret));
        assert!(!printed.contains("tok_live_123"), "{printed}");
        assert_eq!(secret.expose(), "tok_live_123");
    }
}
