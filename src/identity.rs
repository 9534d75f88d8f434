//! Who is calling: the `[[identities]]` rules, tried in order, first match wins.
//!
//! A rule looks at what the caller presented: an API key (`Authorization: Bearer`
//! or `X-Api-Key`), HTTP Basic, the mTLS client certificate, or the peer address.
//! Only SHA-256 digests of keys and passwords are configured; comparisons of
//! digests are constant-time. A caller that matches no rule is refused with 401
//! before anything leaves the proxy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::dates::DateRules;
use crate::headers::X_API_KEY;
use crate::policy::Policy;
use crate::tokens::CredentialId;
use crate::traffic::IdentityLimits;

pub type Sha256Digest = [u8; 32];

/// What a rule may look at.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub headers: &'a HeaderMap,
    pub peer: SocketAddr,
    /// Names from the verified client certificate (URI SANs such as SPIFFE IDs,
    /// DNS SANs, the subject CN); empty without mTLS.
    pub cert_names: &'a [String],
}

/// A `match = { ... }` rule.
#[derive(Clone, PartialEq, Eq)]
pub enum Matcher {
    /// `{ any = true }`: every caller.
    Any,
    /// `{ api_key_sha256 = "<hex>" }`.
    ApiKey { sha256: Sha256Digest },
    /// `{ basic = { user = "...", password_sha256 = "<hex>" } }`.
    Basic { user: String, password_sha256: Sha256Digest },
    /// `{ client_cert = "spiffe://..." }`: a URI SAN, DNS SAN or CN of the
    /// verified client certificate.
    ClientCert { name: String },
    /// `{ source = ["10.0.0.0/8", ...] }`: the peer address.
    Source { networks: Vec<IpNet> },
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::ApiKey { .. } => f.write_str("api_key_sha256"),
            Self::Basic { user, .. } => write!(f, "basic user {user:?}"),
            Self::ClientCert { name } => write!(f, "client_cert {name:?}"),
            Self::Source { networks } => write!(f, "source {networks:?}"),
        }
    }
}

/// The credentials a request carries, digested once.
#[derive(Default)]
struct Presented {
    api_key: Option<Sha256Digest>,
    basic: Option<(String, Sha256Digest)>,
}

impl Presented {
    fn from_headers(headers: &HeaderMap) -> Presented {
        let mut presented = Presented::default();
        if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
            let rest = rest.trim();
            if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
                presented.api_key = Some(sha256(rest.as_bytes()));
            } else if scheme.eq_ignore_ascii_case("basic")
                && let Ok(decoded) = STANDARD.decode(rest)
                && let Ok(text) = String::from_utf8(decoded)
                && let Some((user, password)) = text.split_once(':')
            {
                presented.basic = Some((user.to_owned(), sha256(password.as_bytes())));
            }
        }
        if presented.api_key.is_none()
            && let Some(key) = headers.get(X_API_KEY).filter(|v| !v.is_empty())
        {
            presented.api_key = Some(sha256(key.as_bytes()));
        }
        presented
    }
}

pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

impl Matcher {
    fn matches(&self, caller: &Caller<'_>, presented: &Presented) -> bool {
        match self {
            Self::Any => true,
            Self::ApiKey { sha256 } => presented.api_key.is_some_and(|key| bool::from(key.ct_eq(sha256))),
            Self::Basic { user, password_sha256 } => presented.basic.as_ref().is_some_and(|(u, p)| {
                // Evaluate both halves so timing does not tell which one failed.
                let user_ok = u.as_bytes().ct_eq(user.as_bytes());
                let password_ok = p.ct_eq(password_sha256);
                bool::from(user_ok & password_ok)
            }),
            Self::ClientCert { name } => caller.cert_names.iter().any(|n| n == name),
            Self::Source { networks } => {
                // An IPv4 caller on a dual-stack listener appears as ::ffff:a.b.c.d.
                let ip = caller.peer.ip().to_canonical();
                networks.iter().any(|net| net.contains(&ip))
            }
        }
    }
}

/// One `[[identities]]` table: how to recognise a calling app, which credential
/// its requests use, and what it may reach.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub credential: CredentialId,
    pub matcher: Matcher,
    pub policy: Policy,
    /// The date rules for this identity's requests (its own `date_input_order`
    /// applied); `None` when date rewriting is off.
    pub dates: Option<Arc<DateRules>>,
    /// `rate_limit` and `max_in_flight`.
    pub limits: IdentityLimits,
}

/// The configured identities, in match order, with API-key rules indexed by
/// digest so thousands of keys cost one hash lookup, not a scan.
#[derive(Debug, Clone)]
pub struct Identities {
    rules: Vec<Identity>,
    /// Digest -> the first rule with that key.
    by_api_key: HashMap<Sha256Digest, usize>,
    /// Indices of the rules that are not API-key rules, ascending.
    scanned: Vec<usize>,
}

impl Identities {
    pub fn new(rules: Vec<Identity>) -> Self {
        let mut by_api_key = HashMap::new();
        let mut scanned = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            match &rule.matcher {
                Matcher::ApiKey { sha256 } => {
                    by_api_key.entry(*sha256).or_insert(index);
                }
                _ => scanned.push(index),
            }
        }
        Identities { rules, by_api_key, scanned }
    }

    /// The first identity whose rule matches `caller`.
    pub fn identify(&self, caller: &Caller<'_>) -> Option<&Identity> {
        self.identify_index(caller).map(|i| &self.rules[i])
    }

    /// The identity at `index` (as [`Identities::identify_index`] gave it).
    pub fn get(&self, index: usize) -> &Identity {
        &self.rules[index]
    }

    /// How many identities there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The index of the first identity whose rule matches `caller`.
    pub fn identify_index(&self, caller: &Caller<'_>) -> Option<usize> {
        let presented = Presented::from_headers(caller.headers);
        // The digest of the caller's key picks a candidate; the constant-time
        // comparison in `matches` then confirms it. (Lookup timing can only tell
        // an attacker about the digest of a key they chose, not about ours.)
        let keyed = presented
            .api_key
            .and_then(|digest| self.by_api_key.get(&digest).copied())
            .filter(|&i| self.rules[i].matcher.matches(caller, &presented));
        let bound = keyed.unwrap_or(usize::MAX);
        self.scanned
            .iter()
            .copied()
            .take_while(|&i| i < bound)
            .find(|&i| self.rules[i].matcher.matches(caller, &presented))
            .or(keyed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::tokens::CredentialId;
    use http::HeaderValue;

    fn rule(name: &str, matcher: Matcher) -> Identity {
        Identity {
            name: name.into(),
            credential: CredentialId::new(0),
            matcher,
            policy: Policy::default(),
            dates: None,
            limits: IdentityLimits::default(),
        }
    }

    fn who<'a>(
        identities: &'a Identities,
        headers: &[(&str, &str)],
        peer: &str,
        certs: &[String],
    ) -> Option<&'a str> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let caller = Caller { headers: &map, peer: peer.parse().expect("addr"), cert_names: certs };
        identities.identify(&caller).map(|i| i.name.as_str())
    }

    fn identities() -> Identities {
        Identities::new(vec![
            rule("billing", Matcher::ApiKey { sha256: sha256(b"billing-key") }),
            rule("reports", Matcher::Basic { user: "reports".into(), password_sha256: sha256(b"s3cret") }),
            rule("mesh", Matcher::ClientCert { name: "spiffe://cluster.local/ns/billing/sa/app".into() }),
            rule("office", Matcher::Source { networks: vec!["10.1.0.0/16".parse().expect("cidr")] }),
            rule("shadowed", Matcher::ApiKey { sha256: sha256(b"office-key") }),
        ])
    }

    #[test]
    fn api_keys_match_as_bearer_or_x_api_key() {
        let ids = identities();
        assert_eq!(
            who(&ids, &[("authorization", "Bearer billing-key")], "127.0.0.1:1", &[]),
            Some("billing")
        );
        assert_eq!(who(&ids, &[("x-api-key", "billing-key")], "127.0.0.1:1", &[]), Some("billing"));
        assert_eq!(
            who(&ids, &[("authorization", "bearer billing-key")], "127.0.0.1:1", &[]),
            Some("billing")
        );
        assert_eq!(who(&ids, &[("authorization", "Bearer wrong")], "127.0.0.1:1", &[]), None);
    }

    #[test]
    fn basic_needs_user_and_password() {
        let ids = identities();
        let good = format!("Basic {}", STANDARD.encode("reports:s3cret"));
        let bad = format!("Basic {}", STANDARD.encode("reports:guess"));
        let other_user = format!("Basic {}", STANDARD.encode("billing:s3cret"));
        assert_eq!(who(&ids, &[("authorization", &good)], "127.0.0.1:1", &[]), Some("reports"));
        assert_eq!(who(&ids, &[("authorization", &bad)], "127.0.0.1:1", &[]), None);
        assert_eq!(who(&ids, &[("authorization", &other_user)], "127.0.0.1:1", &[]), None);
        assert_eq!(who(&ids, &[("authorization", "Basic !!!")], "127.0.0.1:1", &[]), None);
    }

    #[test]
    fn certificates_and_source_addresses_match() {
        let ids = identities();
        let spiffe = vec!["spiffe://cluster.local/ns/billing/sa/app".to_owned()];
        assert_eq!(who(&ids, &[], "127.0.0.1:1", &spiffe), Some("mesh"));
        assert_eq!(who(&ids, &[], "10.1.2.3:5000", &[]), Some("office"));
        assert_eq!(who(&ids, &[], "10.2.0.1:5000", &[]), None);
        assert_eq!(who(&ids, &[], "[::ffff:10.1.2.3]:5000", &[]), Some("office"), "IPv4-mapped IPv6 peers");
    }

    #[test]
    fn order_decides_between_an_address_rule_and_a_later_key() {
        let ids = identities();
        assert_eq!(who(&ids, &[("x-api-key", "office-key")], "10.1.0.9:1", &[]), Some("office"));
        assert_eq!(who(&ids, &[("x-api-key", "office-key")], "192.168.0.9:1", &[]), Some("shadowed"));
        assert_eq!(
            who(&ids, &[("x-api-key", "billing-key")], "10.1.0.9:1", &[]),
            Some("billing"),
            "an earlier key rule wins"
        );
    }

    #[test]
    fn any_matches_everyone_and_no_rules_match_no_one() {
        let ids = Identities::new(vec![rule("all", Matcher::Any)]);
        assert_eq!(who(&ids, &[], "127.0.0.1:1", &[]), Some("all"));
        assert_eq!(who(&Identities::new(vec![]), &[], "127.0.0.1:1", &[]), None);
    }

    #[test]
    fn debug_shows_no_digest() {
        let printed = format!("{:?}", Matcher::ApiKey { sha256: sha256(b"k") });
        assert_eq!(printed, "api_key_sha256");
    }
}
