//! Who is calling: the `[[identities]]` rules, tried in order, first match wins.
//!
//! An identity names the Tallyfy credential its requests are sent with. A caller
//! that matches no rule is refused with 401 before anything leaves the proxy.

use std::net::SocketAddr;

use http::HeaderMap;

use crate::config::Identity;

/// What a rule may look at.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub headers: &'a HeaderMap,
    pub peer: SocketAddr,
}

/// A `match = { ... }` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// `{ any = true }`: every caller (the sidecar default, where only the app next
    /// to the proxy can reach it).
    Any,
}

impl Matcher {
    pub fn matches(&self, _caller: &Caller<'_>) -> bool {
        match self {
            Self::Any => true,
        }
    }
}

/// The configured identities, in match order.
#[derive(Debug, Clone)]
pub struct Identities {
    rules: Vec<Identity>,
}

impl Identities {
    pub fn new(rules: Vec<Identity>) -> Self {
        Self { rules }
    }

    /// The first identity whose rule matches `caller`.
    pub fn identify(&self, caller: &Caller<'_>) -> Option<&Identity> {
        self.rules.iter().find(|rule| rule.matcher.matches(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::CredentialId;

    #[test]
    fn first_matching_rule_wins() {
        let rule = |name: &str, credential| Identity {
            name: name.into(),
            credential: CredentialId::new(credential),
            matcher: Matcher::Any,
        };
        let identities = Identities::new(vec![rule("first", 0), rule("second", 1)]);
        let headers = HeaderMap::new();
        let caller = Caller { headers: &headers, peer: "127.0.0.1:5000".parse().expect("literal") };
        assert_eq!(identities.identify(&caller).map(|i| i.name.as_str()), Some("first"));
        assert!(Identities::new(vec![]).identify(&caller).is_none());
    }
}
