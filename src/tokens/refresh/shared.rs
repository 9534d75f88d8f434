//! A fetch in fleet mode: take the fleet's newer token set if there is one;
//! otherwise refresh under the credential's lease and share the result; while
//! another replica holds the lease, wait for what it writes. Whenever the fleet
//! cannot answer (Redis away, a key the fleet refused), fetch alone.
//!
//! A rotating refresh token is presented only by a lease holder, only the one
//! the fleet holds, and only after the stored set was rewritten without it: a
//! holder that dies or fails after presenting it leaves no spent token behind
//! for the next. Fetching alone never presents one (a password credential signs
//! in with its password), so no two replicas can redeem the same token.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::super::issuer::{FetchError, Issued};
use super::super::schedule::MAX_LIFETIME;
use super::super::{Credential, CredentialKind};
use crate::fleet::{Announce, Fence, Fleet, FleetError, News, Stored};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Where a fetched set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Fetched by this replica alone (no fleet, or the fleet could not answer).
    Alone,
    /// Fetched by this replica for the fleet, or taken from it: this generation.
    Fleet(u64),
    /// The fleet refused this replica's key: this credential stays out of
    /// the fleet until the key returns after this many returns
    /// ([`Fleet::rejoins`] when its fetch began).
    Refused(u64),
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
}

impl Shared {
    fn encode(&self) -> Vec<u8> {
        json!({
            "generation": self.generation,
            "access_token": self.issued.access_token.expose(),
            "refresh_token": self.issued.refresh_token.as_ref().map(Secret::expose),
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
            lifetime: Duration::from_millis(value["lifetime_ms"].as_u64()?).min(MAX_LIFETIME),
        };
        Some(Shared { generation: value["generation"].as_u64()?, issued })
    }
}

/// A set as read: what it holds and how long Redis keeps it (the token's
/// remaining life, on Redis's clock: no replica's clock skew counts).
struct Current {
    shared: Shared,
    remaining: Duration,
    /// The generation the fleet last announced: a set below it is an older
    /// one back in Redis (a value written back, a key restored).
    announced: u64,
}

impl Current {
    /// As the refresher takes it: its life began `lifetime - remaining` ago, so
    /// every replica plans the next refresh for the same moment.
    fn obtained(self) -> Obtained {
        let age = self.shared.issued.lifetime.saturating_sub(self.remaining);
        let now = Instant::now();
        let requested_at = now.checked_sub(age).unwrap_or(now);
        Obtained { issued: self.shared.issued, requested_at, source: Source::Fleet(self.shared.generation) }
    }
}

/// The name a credential goes by in the fleet: its own name and a digest of
/// its non-secret settings and upstream (for a minted user token, its
/// application's too), so a credential acting as another principal never
/// takes the set of the one it replaced. Secrets stay out of it: the digest
/// of a password would be guessable. Equal names are what a reload calls the
/// same principal (a rotated secret).
pub(super) fn fleet_name(
    credential: &Credential,
    application: Option<&Credential>,
    upstream: &str,
) -> String {
    let minted_by = application.map(|application| fleet_name(application, None, upstream));
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
            part(minted_by.as_deref().unwrap_or_default());
        }
    }
    let digest = digest.finalize();
    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}.{short}", credential.name)
}

/// A fetch in fleet mode (see the module docs). `installed` is the fleet
/// generation this replica holds (0: none); `fetch` calls Tallyfy, presenting
/// the refresh token it is given, if any.
pub(super) async fn obtain<F, Fut>(
    fleet: &Arc<Fleet>,
    metrics: &Metrics,
    credential: &str,
    name: &str,
    installed: u64,
    fetch: F,
) -> Result<Obtained, FetchError>
where
    F: Fn(Option<Secret>) -> Fut,
    Fut: Future<Output = Result<Issued, FetchError>>,
{
    let mut news = fleet.news();
    let rejoins = fleet.rejoins();
    let by_itself = |error: FleetError| alone(rejoins, metrics, error, &fetch);
    // However the holder fares, this replica fetches alone after this long.
    let deadline = Instant::now() + fleet.lease() * 2 + Duration::from_secs(1);
    loop {
        let current = match read(fleet, name).await {
            Ok(current) => current,
            Err(error) => return by_itself(error).await,
        };
        if let Ok(current) = newer(current, installed) {
            Metrics::credential(&metrics.fleet_adopted, credential);
            return Ok(current.obtained());
        }
        let fence = match fleet.acquire(name).await {
            Ok(fence) => fence,
            Err(error) => return by_itself(error).await,
        };
        if let Some(fence) = fence {
            let held = Held { fleet: fleet.clone(), name: name.to_owned(), fence, released: false };
            return refresh(held, metrics, credential, installed, rejoins, &fetch).await;
        }
        // Another replica is refreshing: wait for its news, polling meanwhile.
        if Instant::now() >= deadline {
            let error = FleetError::Unreachable("the lease holder wrote nothing in time".into());
            return by_itself(error).await;
        }
        news_or_a_while(&mut news, name, installed).await;
    }
}

/// Waits for the fleet's news of a generation above `installed` for `name`, or
/// 250 ms, whichever comes first (news can be missed: the caller reads again).
async fn news_or_a_while(news: &mut tokio::sync::broadcast::Receiver<News>, name: &str, installed: u64) {
    let poll = tokio::time::sleep(Duration::from_millis(250));
    tokio::pin!(poll);
    loop {
        tokio::select! {
            () = &mut poll => return,
            heard = news.recv() => match heard {
                Ok(News::Tokens { credential, generation }) if &*credential == name && generation > installed => return,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return poll.await,
            },
        }
    }
}

/// Takes the fleet's set if it is newer than the `installed` generation, and
/// calls nobody: for a rejection that may not force a refresh (one was forced
/// moments ago), but whose token another replica's refresh may have ended
/// (rotating a refresh token kills its access token at Tallyfy). While a
/// replica holds the lease, its set may be moments away (it has redeemed the
/// refresh token and not yet written): wait for it, as a fetch does, for as
/// long as a live holder's fetch can take (under a third of the lease: the
/// config holds `lease_ms` above three fetch timeouts). With no refresh under
/// way, nothing newer is coming.
pub(super) async fn adopt(
    fleet: &Fleet,
    metrics: &Metrics,
    credential: &str,
    name: &str,
    installed: u64,
) -> Result<Obtained, FetchError> {
    let mut news = fleet.news();
    let deadline = Instant::now() + fleet.lease() / 3 + Duration::from_secs(1);
    loop {
        // The lease is looked at before the set is read: a holder writes before
        // it lets go, so a lease free before a read that finds nothing newer
        // means no refresh was under way.
        let refreshing = matches!(fleet.refreshing(name).await, Ok(true));
        match read(fleet, name).await.map(|current| newer(current, installed)) {
            Ok(Ok(current)) => {
                Metrics::credential(&metrics.fleet_adopted, credential);
                return Ok(current.obtained());
            }
            Ok(Err(_)) => {}
            Err(_) => return Err(FetchError::NothingNewer),
        }
        if !refreshing || Instant::now() >= deadline {
            return Err(FetchError::NothingNewer);
        }
        news_or_a_while(&mut news, name, installed).await;
    }
}

/// The fleet's set when it is newer than the `installed` generation and not
/// older than the one last announced (and alive: Redis keeps nothing past its
/// token's life); otherwise what was read. An older set back in Redis is not
/// taken: its access token died when its refresh token was redeemed.
fn newer(current: Option<Current>, installed: u64) -> Result<Current, Option<Current>> {
    match current {
        Some(current) if current.shared.generation > installed && !current.is_older() => Ok(current),
        other => Err(other),
    }
}

impl Current {
    /// Whether a later generation was announced: this set came back from
    /// before it.
    fn is_older(&self) -> bool {
        self.shared.generation < self.announced
    }
}

async fn read(fleet: &Fleet, name: &str) -> Result<Option<Current>, FleetError> {
    let stored = fleet.read(name).await?;
    Ok(stored.and_then(|Stored { plaintext, ttl, announced }| {
        Shared::decode(&plaintext).map(|shared| Current { shared, remaining: ttl, announced })
    }))
}

/// A held lease, released when dropped (also when the fetch holding it is
/// abandoned at shutdown).
struct Held {
    fleet: Arc<Fleet>,
    name: String,
    fence: Fence,
    released: bool,
}

impl Held {
    async fn release(mut self) {
        self.released = true;
        self.fleet.release(&self.name, self.fence).await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (fleet, name, fence) = (self.fleet.clone(), std::mem::take(&mut self.name), self.fence);
            runtime.spawn(async move { fleet.release(&name, fence).await });
        }
    }
}

/// Under the lease: re-reads (another replica may have written between the
/// read and the lease), spends the fleet's refresh token, calls Tallyfy with
/// the lease kept extended, and shares the result.
async fn refresh<F, Fut>(
    held: Held,
    metrics: &Metrics,
    credential: &str,
    installed: u64,
    rejoins: u64,
    fetch: &F,
) -> Result<Obtained, FetchError>
where
    F: Fn(Option<Secret>) -> Fut,
    Fut: Future<Output = Result<Issued, FetchError>>,
{
    let (fleet, name, fence) = (held.fleet.clone(), held.name.clone(), held.fence);
    let current = match read(&fleet, &name).await {
        Ok(current) => current,
        Err(error) => {
            held.release().await;
            return alone(rejoins, metrics, error, fetch).await;
        }
    };
    let current = match newer(current, installed) {
        Ok(current) => {
            held.release().await;
            Metrics::credential(&metrics.fleet_adopted, credential);
            return Ok(current.obtained());
        }
        Err(current) => current,
    };
    let refresh_token = match current {
        // Never the refresh token of a set older than the one this replica
        // installed or the one the fleet last announced (a Redis that lost
        // writes, or an old sealed value written back): it may have been
        // spent since, and a spent one presented again has Tallyfy revoke the
        // whole family. The holder signs in instead.
        Some(Current { shared: Shared { generation, issued }, remaining, announced })
            if issued.refresh_token.is_some() && generation >= installed.max(announced) =>
        {
            // Rewritten without it first: whatever happens next, no holder presents it again.
            let spent = Shared {
                generation,
                issued: Issued {
                    access_token: issued.access_token.clone(),
                    refresh_token: None,
                    lifetime: issued.lifetime,
                },
            };
            match fleet.write(&name, fence, &spent.encode(), remaining, Announce::Quietly).await {
                Ok(true) => issued.refresh_token,
                _ => None,
            }
        }
        _ => None,
    };
    tracing::info!(credential = %name, generation = fence.0, "fleet: refreshing for the fleet");
    let requested_at = Instant::now();
    let call = fetch(refresh_token);
    tokio::pin!(call);
    let mut extend = tokio::time::interval_at(requested_at + fleet.lease() / 3, fleet.lease() / 3);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            _ = extend.tick() => { let _ = fleet.extend(&name, fence).await; }
        }
    };
    let issued = match result {
        Ok(issued) => issued,
        Err(error) => {
            held.release().await;
            return Err(error);
        }
    };
    let shared = Shared { generation: fence.0, issued };
    let remaining = shared.issued.lifetime.saturating_sub(requested_at.elapsed());
    match fleet.write(&name, fence, &shared.encode(), remaining, Announce::NewGeneration).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(credential = %name, "fleet: the refresh lease lapsed before the token was shared")
        }
        Err(error) => tracing::warn!(credential = %name, %error, "fleet: the new token could not be shared"),
    }
    held.release().await;
    Ok(Obtained { issued: shared.issued, requested_at, source: Source::Fleet(fence.0) })
}

/// Fetches alone, counting why. Never presents a refresh token: one the fleet
/// shared may be presented by a lease holder at the same time.
async fn alone<F, Fut>(
    rejoins: u64,
    metrics: &Metrics,
    error: FleetError,
    fetch: &F,
) -> Result<Obtained, FetchError>
where
    F: Fn(Option<Secret>) -> Fut,
    Fut: Future<Output = Result<Issued, FetchError>>,
{
    Metrics::reason(&metrics.fleet_fallbacks, error.reason());
    let requested_at = Instant::now();
    let issued = fetch(None).await?;
    let source = if error == FleetError::Undecryptable { Source::Refused(rejoins) } else { Source::Alone };
    Ok(Obtained { issued, requested_at, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::OAuthClient;

    #[test]
    fn a_set_from_another_replica_lives_at_most_the_longest_lifetime() {
        let bytes = br#"{"generation":1,"access_token":"a","lifetime_ms":18446744073709551615}"#;
        let shared = Shared::decode(bytes).expect("decoded");
        assert_eq!(shared.issued.lifetime, MAX_LIFETIME);
    }

    #[test]
    fn a_set_round_trips_and_its_age_comes_from_redis_ttl() {
        let shared = Shared {
            generation: 7,
            issued: Issued {
                access_token: Secret::new("access"),
                refresh_token: Some(Secret::new("refresh")),
                lifetime: Duration::from_secs(60),
            },
        };
        let decoded = Shared::decode(&shared.encode()).expect("decodes");
        assert_eq!(decoded.generation, 7);
        assert_eq!(decoded.issued.access_token.expose(), "access");
        assert_eq!(decoded.issued.refresh_token.as_ref().map(Secret::expose), Some("refresh"));
        let obtained =
            Current { shared: decoded, remaining: Duration::from_secs(45), announced: 7 }.obtained();
        let age = Instant::now() - obtained.requested_at;
        assert!(age >= Duration::from_secs(15) && age < Duration::from_secs(16), "{age:?}");
        assert_eq!(obtained.source, Source::Fleet(7));
    }

    #[test]
    fn a_set_is_taken_only_when_above_the_installed_one_and_not_below_the_announced_one() {
        let current = |generation: u64, announced: u64| {
            let issued = Issued {
                access_token: Secret::new("access"),
                refresh_token: None,
                lifetime: Duration::from_secs(60),
            };
            Some(Current {
                shared: Shared { generation, issued },
                remaining: Duration::from_secs(30),
                announced,
            })
        };
        assert!(newer(current(5, 5), 0).is_ok(), "a replica that holds none takes the fleet's");
        assert!(newer(current(5, 0), 4).is_ok(), "nothing announced (Redis lost it): by installed alone");
        assert!(newer(current(5, 5), 5).is_err(), "the one it holds");
        assert!(newer(current(4, 5), 0).is_err(), "an older set back in Redis, for a replica holding none");
        assert!(newer(None, 0).is_err());
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
        let name = fleet_name(&credential("s1", "a@example.com"), None, "https://go.tallyfy.com");
        assert!(name.starts_with("user."), "{name}");
        assert_eq!(
            name,
            fleet_name(&credential("s2", "a@example.com"), None, "https://go.tallyfy.com"),
            "secrets do not count"
        );
        assert_ne!(name, fleet_name(&credential("s1", "b@example.com"), None, "https://go.tallyfy.com"));
        assert_ne!(name, fleet_name(&credential("s1", "a@example.com"), None, "http://127.0.0.1:9"));
        assert!(!name.contains("hunter2") && !name.contains("s1"));
    }
}
