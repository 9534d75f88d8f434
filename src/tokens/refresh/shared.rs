//! A fetch in fleet mode: take the fleet's newer token set if there is one;
//! otherwise refresh under the credential's lease and share the result; while
//! another replica holds the lease, wait for what it writes. Whenever the fleet
//! cannot answer (Redis away, a set this replica cannot decrypt), fetch alone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::super::issuer::{FetchError, Issued};
use super::super::{Credential, CredentialKind};
use crate::fleet::{Fence, Fleet, FleetError, News};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Where a fetched set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Fetched by this replica alone (no fleet, or the fleet could not answer).
    Alone,
    /// Fetched by this replica for the fleet, or taken from it: this generation.
    Fleet(u64),
    /// The fleet's set did not decrypt here: this replica stays out of the
    /// fleet for this credential (until a restart or a new config).
    Refused,
}

/// What a fetch yields: the token, when its life began, and where it came from.
pub(super) struct Obtained {
    pub(super) issued: Issued,
    pub(super) requested_at: Instant,
    pub(super) source: Source,
}

/// A token set as the fleet stores it (sealed: see [`crate::fleet`]).
struct Shared {
    generation: u64,
    issued: Issued,
    /// Unix milliseconds when its life began.
    issued_at_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    fn encode(&self) -> Vec<u8> {
        json!({
            "generation": self.generation,
            "access_token": self.issued.access_token.expose(),
            "refresh_token": self.issued.refresh_token.as_ref().map(Secret::expose),
            "issued_at_ms": self.issued_at_ms,
            "lifetime_ms": self.issued.lifetime.as_millis() as u64,
        })
        .to_string()
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Shared> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        let issued = Issued {
            access_token: Secret::new(value["access_token"].as_str()?),
            refresh_token: value["refresh_token"].as_str().map(Secret::new),
            lifetime: Duration::from_millis(value["lifetime_ms"].as_u64()?),
        };
        Some(Shared {
            generation: value["generation"].as_u64()?,
            issued,
            issued_at_ms: value["issued_at_ms"].as_u64()?,
        })
    }

    /// How long it has left at `now_ms`.
    fn remaining(&self, now_ms: u64) -> Duration {
        let age = Duration::from_millis(now_ms.saturating_sub(self.issued_at_ms));
        self.issued.lifetime.saturating_sub(age)
    }

    /// As the refresher takes it: its life began `age` ago.
    fn obtained(self, now_ms: u64) -> Obtained {
        let age = Duration::from_millis(now_ms.saturating_sub(self.issued_at_ms));
        let now = Instant::now();
        let requested_at = now.checked_sub(age).unwrap_or(now);
        Obtained { issued: self.issued, requested_at, source: Source::Fleet(self.generation) }
    }
}

/// The name a credential goes by in the fleet: its own name and a digest of
/// its non-secret settings and upstream, so a changed credential never takes
/// the set of the one it replaced. Secrets stay out of it: the digest of a
/// password would be guessable.
pub(super) fn fleet_name(credential: &Credential, upstream: &str) -> String {
    let mut digest = Sha256::new();
    let mut part = |text: &str| {
        digest.update((text.len() as u64).to_be_bytes());
        digest.update(text.as_bytes());
    };
    part(upstream);
    part(credential.kind.name());
    match &credential.kind {
        CredentialKind::PersonalToken { .. } => {}
        CredentialKind::ClientCredentials { client, scope } => {
            part(&client.id);
            part(scope.as_deref().unwrap_or(""));
        }
        CredentialKind::Password { client, username, scope, .. } => {
            part(&client.id);
            part(username);
            part(scope.as_deref().unwrap_or(""));
        }
        CredentialKind::ApplicationUser { org, email, .. } => {
            part(org);
            part(email);
        }
    }
    let digest = digest.finalize();
    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}.{short}", credential.name)
}

/// A fetch in fleet mode (see the module docs). `installed` is the fleet
/// generation this replica holds (0: none); `fetch` calls Tallyfy with the
/// refresh token to present, if any.
pub(super) async fn obtain<F, Fut>(
    fleet: &Fleet,
    metrics: &Metrics,
    credential: &str,
    name: &str,
    installed: u64,
    own_refresh_token: Option<Secret>,
    fetch: F,
) -> Result<Obtained, FetchError>
where
    F: Fn(Option<Secret>) -> Fut,
    Fut: Future<Output = Result<Issued, FetchError>>,
{
    let mut own_refresh_token = own_refresh_token;
    let mut news = fleet.news();
    // However the holder fares, this replica fetches alone after this long.
    let deadline = Instant::now() + fleet.lease() * 2 + Duration::from_secs(1);
    loop {
        let current = match read(fleet, name).await {
            Ok(current) => current,
            Err(error) => return alone(metrics, &error, own_refresh_token, &fetch).await,
        };
        if let Ok(shared) = newer(current, installed) {
            Metrics::credential(&metrics.fleet_adopted, credential);
            return Ok(shared.obtained(unix_ms()));
        }
        let fence = match fleet.acquire(name).await {
            Ok(fence) => fence,
            Err(error) => return alone(metrics, &error, own_refresh_token, &fetch).await,
        };
        if let Some(fence) = fence {
            // Another replica may have written between the read and the lease.
            let current = match read(fleet, name).await {
                Ok(current) => current,
                Err(error) => {
                    fleet.release(name, fence).await;
                    return alone(metrics, &error, own_refresh_token, &fetch).await;
                }
            };
            let current = match newer(current, installed) {
                Ok(shared) => {
                    fleet.release(name, fence).await;
                    Metrics::credential(&metrics.fleet_adopted, credential);
                    return Ok(shared.obtained(unix_ms()));
                }
                Err(current) => current,
            };
            // The fleet's refresh token is the newest: any other was redeemed already.
            let refresh_token = current.and_then(|s| s.issued.refresh_token).or(own_refresh_token.take());
            return refresh(fleet, name, fence, refresh_token, &fetch).await;
        }
        // Another replica is refreshing: wait for its news, polling meanwhile.
        if Instant::now() >= deadline {
            let error = FleetError::Unreachable("the lease holder wrote nothing in time".into());
            return alone(metrics, &error, own_refresh_token, &fetch).await;
        }
        let poll = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(poll);
        loop {
            tokio::select! {
                () = &mut poll => break,
                heard = news.recv() => match heard {
                    Ok(News::Tokens { credential, generation }) if &*credential == name && generation > installed => break,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => { poll.as_mut().await; break }
                },
            }
        }
    }
}

/// The fleet's set when it is newer than the `installed` generation and still
/// alive; otherwise what was read, given back.
fn newer(current: Option<Shared>, installed: u64) -> Result<Shared, Option<Shared>> {
    match current {
        Some(shared) if shared.generation > installed && !shared.remaining(unix_ms()).is_zero() => Ok(shared),
        other => Err(other),
    }
}

async fn read(fleet: &Fleet, name: &str) -> Result<Option<Shared>, FleetError> {
    Ok(fleet.read(name).await?.and_then(|bytes| Shared::decode(&bytes)))
}

/// Refreshes under the lease, keeping it extended while Tallyfy answers, and
/// shares the result.
async fn refresh<F, Fut>(
    fleet: &Fleet,
    name: &str,
    fence: Fence,
    refresh_token: Option<Secret>,
    fetch: &F,
) -> Result<Obtained, FetchError>
where
    F: Fn(Option<Secret>) -> Fut,
    Fut: Future<Output = Result<Issued, FetchError>>,
{
    tracing::info!(credential = name, generation = fence.0, "fleet: refreshing for the fleet");
    let requested_at = Instant::now();
    let issued_at_ms = unix_ms();
    let call = fetch(refresh_token);
    tokio::pin!(call);
    let mut extend = tokio::time::interval_at(requested_at + fleet.lease() / 3, fleet.lease() / 3);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            _ = extend.tick() => { let _ = fleet.extend(name, fence).await; }
        }
    };
    let issued = match result {
        Ok(issued) => issued,
        Err(error) => {
            fleet.release(name, fence).await;
            return Err(error);
        }
    };
    let shared = Shared { generation: fence.0, issued, issued_at_ms };
    let ttl = shared.remaining(unix_ms());
    match fleet.write(name, fence, &shared.encode(), ttl).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(credential = name, "fleet: the refresh lease lapsed before the token was shared")
        }
        Err(error) => tracing::warn!(credential = name, %error, "fleet: the new token could not be shared"),
    }
    fleet.release(name, fence).await;
    Ok(Obtained { issued: shared.issued, requested_at, source: Source::Fleet(fence.0) })
}

/// Fetches alone, counting why.
async fn alone<F, Fut>(
    metrics: &Metrics,
    error: &FleetError,
    refresh_token: Option<Secret>,
    fetch: &F,
) -> Result<Obtained, FetchError>
where
    F: Fn(Option<Secret>) -> Fut,
    Fut: Future<Output = Result<Issued, FetchError>>,
{
    Metrics::reason(&metrics.fleet_fallbacks, error.reason());
    if *error == FleetError::Undecryptable {
        tracing::error!(
            "fleet: the shared token set does not decrypt with this replica's encryption_key; \
             refreshing alone (check that every replica has the same key)"
        );
    }
    let requested_at = Instant::now();
    let issued = fetch(refresh_token).await?;
    let source = if *error == FleetError::Undecryptable { Source::Refused } else { Source::Alone };
    Ok(Obtained { issued, requested_at, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::OAuthClient;

    #[test]
    fn a_set_round_trips_and_its_age_counts_against_its_life() {
        let shared = Shared {
            generation: 7,
            issued: Issued {
                access_token: Secret::new("access"),
                refresh_token: Some(Secret::new("refresh")),
                lifetime: Duration::from_secs(60),
            },
            issued_at_ms: 1_000_000,
        };
        let decoded = Shared::decode(&shared.encode()).expect("decodes");
        assert_eq!(decoded.generation, 7);
        assert_eq!(decoded.issued.access_token.expose(), "access");
        assert_eq!(decoded.issued.refresh_token.as_ref().map(Secret::expose), Some("refresh"));
        assert_eq!(decoded.remaining(1_000_000 + 15_000), Duration::from_secs(45));
        assert_eq!(decoded.remaining(1_000_000 + 75_000), Duration::ZERO, "expired, never negative");
    }

    #[test]
    fn fleet_names_change_with_settings_and_upstream_but_hold_no_secret() {
        let credential = |secret: &str, username: &str| Credential {
            name: "user".into(),
            kind: CredentialKind::Password {
                client: OAuthClient { id: "9".into(), secret: Secret::new(secret) },
                username: username.into(),
                password: Secret::new("hunter2"),
                scope: None,
            },
        };
        let name = fleet_name(&credential("s1", "a@example.com"), "https://go.tallyfy.com");
        assert!(name.starts_with("user."), "{name}");
        assert_eq!(
            name,
            fleet_name(&credential("s2", "a@example.com"), "https://go.tallyfy.com"),
            "secrets do not count"
        );
        assert_ne!(name, fleet_name(&credential("s1", "b@example.com"), "https://go.tallyfy.com"));
        assert_ne!(name, fleet_name(&credential("s1", "a@example.com"), "http://127.0.0.1:9"));
        assert!(!name.contains("hunter2") && !name.contains("s1"));
    }
}
