//! Issued tokens: JWT-shaped access tokens with a real `exp`, rotating refresh
//! tokens, the static personal token, and revocation.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::encoding::random_hex;
use super::fixtures::{ORG_ID, PERSONAL_TOKEN, USERNAME};

/// Who a bearer token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Principal {
    /// An application (`client_credentials`) token: application routes only.
    App { org: String, client_id: String },
    /// A user (password grant, minted user token, personal token): resource routes.
    User { email: String, org: String },
}

impl Principal {
    pub fn user(email: &str) -> Principal {
        Principal::User { email: email.to_owned(), org: ORG_ID.to_owned() }
    }
}

/// What the token endpoint hands out.
pub(super) struct Issued {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in: u64,
}

/// Why a refresh token was refused (all are `invalid_grant`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RefreshError {
    Unknown,
    AlreadyRedeemed,
    OtherClient,
}

struct AccessToken {
    principal: Principal,
    expires_at: SystemTime,
}

struct RefreshToken {
    principal: Principal,
    client_id: String,
    /// The access token issued with it; it dies when this is redeemed.
    access_token: String,
    redeemed: bool,
}

#[derive(Default)]
pub(super) struct TokenStore {
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, RefreshToken>,
    personal_revoked: bool,
    double_redemptions: usize,
}

impl TokenStore {
    /// Issues an access token for `principal` (and a refresh token if `refreshable`).
    pub fn issue(
        &mut self,
        principal: Principal,
        client_id: &str,
        lifetime: Duration,
        refreshable: bool,
    ) -> Issued {
        let now = SystemTime::now();
        // A lifetime past what the clock holds (a test of clients' arithmetic)
        // still expires, a century on, here; `expires_in` says what was asked.
        let century = Duration::from_secs(100 * 365 * 24 * 3600);
        let expires_at = now.checked_add(lifetime).unwrap_or(now + century);
        let subject = match &principal {
            Principal::App { .. } => String::new(), // Passport leaves `sub` empty for client tokens
            Principal::User { email, .. } => email.clone(),
        };
        let access_token = jwt(&subject, client_id, unix(now), unix(expires_at));
        let refresh_token = refreshable.then(|| {
            let token = format!("def50200{}", random_hex(64));
            self.refresh.insert(
                token.clone(),
                RefreshToken {
                    principal: principal.clone(),
                    client_id: client_id.to_owned(),
                    access_token: access_token.clone(),
                    redeemed: false,
                },
            );
            token
        });
        self.access.insert(access_token.clone(), AccessToken { principal, expires_at });
        Issued { access_token, refresh_token, expires_in: lifetime.as_secs() }
    }

    /// The principal of a live token: known, not revoked, not expired.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        if token == PERSONAL_TOKEN {
            return (!self.personal_revoked).then(|| Principal::user(USERNAME));
        }
        let access = self.access.get(token)?;
        (SystemTime::now() < access.expires_at).then(|| access.principal.clone())
    }

    /// Redeems a refresh token once: it and the access token issued with it die.
    pub fn redeem(&mut self, refresh_token: &str, client_id: &str) -> Result<Principal, RefreshError> {
        let entry = self.refresh.get_mut(refresh_token).ok_or(RefreshError::Unknown)?;
        if entry.client_id != client_id {
            return Err(RefreshError::OtherClient);
        }
        if entry.redeemed {
            self.double_redemptions += 1;
            return Err(RefreshError::AlreadyRedeemed);
        }
        entry.redeemed = true;
        let principal = entry.principal.clone();
        let access_token = std::mem::take(&mut entry.access_token);
        self.access.remove(&access_token);
        Ok(principal)
    }

    /// Every issued access token stops working; refresh tokens stay redeemable.
    pub fn revoke_all(&mut self) {
        self.access.clear();
    }

    /// Forgets every refresh token (as when they expire): redeeming one is then
    /// `invalid_grant`, but not a double redemption.
    pub fn revoke_refresh_tokens(&mut self) {
        self.refresh.clear();
    }

    pub fn set_personal_revoked(&mut self, revoked: bool) {
        self.personal_revoked = revoked;
    }

    pub fn double_redemptions(&self) -> usize {
        self.double_redemptions
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `base64url(header).base64url(claims).base64url(random signature)`, shaped like
/// a Passport RS256 token so a client can read `exp`.
fn jwt(subject: &str, client_id: &str, iat: u64, exp: u64) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256"});
    let claims = serde_json::json!({
        "aud": client_id,
        "jti": random_hex(40),
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "sub": subject,
        "scopes": ["*"],
    });
    let mut signature = [0u8; 256];
    rand::fill(&mut signature[..]);
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(token: &str) -> serde_json::Value {
        let payload = token.split('.').nth(1).expect("three parts");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON claims")
    }

    #[test]
    fn access_tokens_are_unique_jwts_with_exp() {
        let mut store = TokenStore::default();
        let a = store.issue(Principal::user(USERNAME), "1002", Duration::from_secs(60), false);
        let b = store.issue(Principal::user(USERNAME), "1002", Duration::from_secs(60), false);
        assert_ne!(a.access_token, b.access_token);
        let claims = claims(&a.access_token);
        assert_eq!(claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"), 60);
        assert_eq!(claims["sub"], USERNAME);
        assert_eq!(store.authenticate(&a.access_token), Some(Principal::user(USERNAME)));
    }

    #[test]
    fn expired_tokens_fail_and_refresh_tokens_rotate_once() {
        let mut store = TokenStore::default();
        let expired = store.issue(Principal::user(USERNAME), "1002", Duration::ZERO, true);
        assert_eq!(store.authenticate(&expired.access_token), None);
        let refresh = expired.refresh_token.expect("refreshable");
        assert_eq!(store.redeem(&refresh, "1001"), Err(RefreshError::OtherClient));
        assert_eq!(store.redeem(&refresh, "1002"), Ok(Principal::user(USERNAME)));
        assert_eq!(store.redeem(&refresh, "1002"), Err(RefreshError::AlreadyRedeemed));
        assert_eq!(store.redeem("nope", "1002"), Err(RefreshError::Unknown));
        assert_eq!(store.double_redemptions(), 1);
    }
}
