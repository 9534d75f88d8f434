//! The refresher: the token store's single writer, for the life of the process.
//!
//! One task owns every slot's refresh state. It fetches each token when its slot
//! is created, then refreshes it at the time [`Schedule::refresh_at`] picks; a
//! failed fetch is retried after [`Schedule::backoff`], forever, while the old
//! token keeps serving until its real expiry. Requests never wait for it, except
//! after Tallyfy rejected their token: they report the rejected generation
//! through a [`RefreshHandle`], and however many report the same token, one fetch
//! runs and all of them wait for its result ([`TokenStore::newer_than`]).
//!
//! A config reload is a [`RefreshHandle::reconfigure`]: credentials whose
//! settings did not change keep their slot (token, refresh token, schedule, a
//! fetch already running, the requests waiting on it); changed ones get a new
//! slot, fetched at once; slots no config uses any more stop being refreshed and
//! are forgotten after [`RETIRED_GRACE`], once requests of the old config are long
//! done.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::issuer::{FetchError, Issued, Issuer};
use super::schedule::Schedule;
use super::{Credential, CredentialKind, Settings};
use super::{CredentialTokens, SlotId, Token, TokenStore};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream;

/// How long a slot no config uses keeps its token, for requests of the old
/// config still in flight (a replay after a dead-token 401 needs it).
pub const RETIRED_GRACE: Duration = Duration::from_secs(15 * 60);

/// "Tallyfy rejected generation `generation` of this slot's token."
#[derive(Debug, Clone, Copy)]
struct Rejected {
    slot: SlotId,
    generation: u64,
}

/// What the refresher needs of a config: its credentials, how to keep them
/// fresh, and which upstream they belong to (tokens never cross to another).
#[derive(Debug, Clone)]
pub struct CredentialSet {
    pub credentials: Vec<Credential>,
    pub settings: Settings,
    /// The token endpoint and API base.
    upstream: String,
}

impl CredentialSet {
    pub fn new(credentials: Vec<Credential>, settings: Settings, upstream: &upstream::Settings) -> Self {
        let upstream = format!(
            "{} {}://{}{}",
            upstream.token_url, upstream.scheme, upstream.authority, upstream.path_prefix
        );
        CredentialSet { credentials, settings, upstream }
    }
}

/// A new config's credentials, and where to send their slots.
struct Reconfigure {
    set: CredentialSet,
    issuer: Issuer,
    reply: oneshot::Sender<Result<CredentialTokens, String>>,
}

/// The request and reload side of the refresher. Cheap to clone.
#[derive(Clone)]
pub struct RefreshHandle {
    rejected: mpsc::Sender<Rejected>,
    reconfigure: mpsc::Sender<Reconfigure>,
    store: Arc<TokenStore>,
}

impl RefreshHandle {
    /// Reports a rejected token. Never blocks: when the queue is full, reports
    /// are already pending. When the refresher is gone (shutdown), waiters are
    /// released at once.
    pub fn token_rejected(&self, slot: SlotId, generation: u64) {
        if let Err(mpsc::error::TrySendError::Closed(_)) =
            self.rejected.try_send(Rejected { slot, generation })
        {
            self.store.settle(slot);
        }
    }

    /// Maps a new config's credentials onto slots (see the module docs). An
    /// `Err` leaves everything as it was.
    pub async fn reconfigure(&self, set: CredentialSet, issuer: Issuer) -> Result<CredentialTokens, String> {
        let (reply, answer) = oneshot::channel();
        let request = Reconfigure { set, issuer, reply };
        self.reconfigure.send(request).await.map_err(|_| "the refresher has stopped".to_owned())?;
        answer.await.map_err(|_| "the refresher has stopped".to_owned())?
    }
}

/// Whether a slot is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Used by the current config.
    Live,
    /// Used only by older configs: no scheduled refresh; forgotten at this time.
    Retired { forget_at: Instant },
    /// Forgotten: its token is cleared.
    Gone,
}

/// Refresh state of one slot.
struct Slot {
    id: SlotId,
    /// The settings it was created with.
    credential: Credential,
    /// `application_user`: the slot of the application token it mints with.
    application: Option<SlotId>,
    /// The upstream it belongs to (tokens never cross to another).
    epoch: u32,
    life: Life,
    /// The password grant's refresh token, if one is held and not yet redeemed.
    refresh_token: Option<Secret>,
    /// When to fetch next; `None` for static tokens and retired slots.
    due: Option<Instant>,
    /// Consecutive failures, for the backoff.
    failures: u32,
    fetching: bool,
    /// When a rejection last forced a refresh (rate-limits forced refreshes).
    last_forced: Option<Instant>,
    /// `application_user`: the mint was refused for a dead application token;
    /// mint again as soon as the application's new token is published.
    awaiting_application: bool,
}

struct Outcome {
    slot: SlotId,
    /// When the fetch started: lifetimes count from here, not from the answer.
    requested_at: Instant,
    result: Result<Issued, FetchError>,
}

pub struct Refresher {
    store: Arc<TokenStore>,
    metrics: Arc<Metrics>,
    issuer: Option<Arc<Issuer>>,
    schedule: Schedule,
    min_forced_interval: Duration,
    /// Token endpoint and API base of the current config.
    upstream: String,
    /// Bumped whenever `upstream` changes.
    epoch: u32,
    /// Indexed by [`SlotId`].
    slots: Vec<Slot>,
    rejected: mpsc::Receiver<Rejected>,
    reconfigures: mpsc::Receiver<Reconfigure>,
}

impl Refresher {
    pub fn new(store: Arc<TokenStore>, metrics: Arc<Metrics>) -> (Refresher, RefreshHandle) {
        let (rejected_tx, rejected) = mpsc::channel(1024);
        let (reconfigure_tx, reconfigures) = mpsc::channel(4);
        let handle =
            RefreshHandle { rejected: rejected_tx, reconfigure: reconfigure_tx, store: store.clone() };
        let refresher = Refresher {
            store,
            metrics,
            issuer: None,
            schedule: Schedule::default(),
            min_forced_interval: Duration::ZERO,
            upstream: String::new(),
            epoch: 0,
            slots: Vec::new(),
            rejected,
            reconfigures,
        };
        (refresher, handle)
    }

    /// Maps `config`'s credentials onto slots, creating the new ones (personal
    /// tokens are published at once; OAuth ones are due now) and retiring the
    /// ones it no longer uses. Fails, changing nothing, when a personal token
    /// cannot be sent in a header.
    pub fn configure(&mut self, set: &CredentialSet, issuer: Issuer) -> Result<CredentialTokens, String> {
        let mut statics = Vec::with_capacity(set.credentials.len());
        for credential in &set.credentials {
            statics.push(match &credential.kind {
                CredentialKind::PersonalToken { token } => {
                    Some(Token::bearer(token, None).map_err(|_| {
                        format!("credential {}: the token cannot be sent in a header", credential.name)
                    })?)
                }
                _ => None,
            });
        }
        let upstream = set.upstream.clone();
        if upstream != self.upstream {
            self.upstream = upstream;
            self.epoch += 1;
        }
        self.issuer = Some(Arc::new(issuer));
        self.schedule = set.settings.schedule;
        self.min_forced_interval = set.settings.min_forced_refresh_interval;
        let now = Instant::now();
        let mut assigned: Vec<Option<SlotId>> = vec![None; set.credentials.len()];
        let mut kept = HashSet::new();
        // Applications first: a user token's slot depends on its application's.
        for minted in [false, true] {
            for (index, credential) in set.credentials.iter().enumerate() {
                let application = match &credential.kind {
                    CredentialKind::ApplicationUser { application, .. } => Some(application.index()),
                    _ => None,
                };
                if application.is_some() != minted {
                    continue;
                }
                let application = application.and_then(|a| assigned[a]);
                let reusable = self.slots.iter().find(|slot| {
                    slot.life == Life::Live
                        && slot.epoch == self.epoch
                        && !kept.contains(&slot.id)
                        && slot.application == application
                        && same_settings(&slot.credential, credential)
                });
                let id = match reusable {
                    Some(slot) => slot.id,
                    None => self.create(credential, application, statics[index].take(), now),
                };
                kept.insert(id);
                assigned[index] = Some(id);
            }
        }
        for slot in &mut self.slots {
            if slot.life == Life::Live && !kept.contains(&slot.id) {
                slot.life = Life::Retired { forget_at: now + RETIRED_GRACE };
                slot.due = None;
            }
        }
        let slots: Vec<SlotId> =
            assigned.into_iter().map(|id| id.expect("every credential was assigned")).collect();
        let refreshable =
            set.credentials.iter().map(|c| !matches!(c.kind, CredentialKind::PersonalToken { .. })).collect();
        Ok(CredentialTokens::new(self.store.clone(), slots, refreshable))
    }

    fn create(
        &mut self,
        credential: &Credential,
        application: Option<SlotId>,
        token: Option<Token>,
        now: Instant,
    ) -> SlotId {
        let id = self.store.add_slot(&credential.name);
        let due = match token {
            Some(token) => {
                self.store.publish(id, token);
                None
            }
            None => Some(now),
        };
        self.slots.push(Slot {
            id,
            credential: credential.clone(),
            application,
            epoch: self.epoch,
            life: Life::Live,
            refresh_token: None,
            due,
            failures: 0,
            fetching: false,
            last_forced: None,
            awaiting_application: false,
        });
        debug_assert_eq!(self.slots.len(), id.index() + 1, "slots and store entries share indexes");
        id
    }

    /// Runs until `shutdown` fires. Fetches still running are abandoned.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut fetches: JoinSet<Outcome> = JoinSet::new();
        loop {
            let now = Instant::now();
            self.start_due(now, &mut fetches);
            self.forget_retired(now);
            let next = self
                .slots
                .iter()
                .filter(|slot| !slot.fetching) // its outcome wakes the loop
                .filter_map(|slot| match slot.life {
                    Life::Retired { forget_at } => Some(slot.due.map_or(forget_at, |due| due.min(forget_at))),
                    Life::Live => slot.due,
                    Life::Gone => None,
                })
                .min()
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(request) = self.reconfigures.recv() => {
                    let Reconfigure { set, issuer, reply } = request;
                    let _ = reply.send(self.configure(&set, issuer));
                }
                Some(rejected) = self.rejected.recv() => self.on_rejected(rejected),
                Some(joined) = fetches.join_next(), if !fetches.is_empty() => match joined {
                    Ok(outcome) => self.on_outcome(outcome),
                    Err(error) => tracing::error!(%error, "a token fetch task failed"),
                },
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    fn forget_retired(&mut self, now: Instant) {
        for slot in &mut self.slots {
            if let Life::Retired { forget_at } = slot.life
                && forget_at <= now
                && !slot.fetching
            {
                slot.life = Life::Gone;
                slot.refresh_token = None;
                slot.due = None;
                self.store.clear(slot.id);
            }
        }
    }

    fn start_due(&mut self, now: Instant, fetches: &mut JoinSet<Outcome>) {
        let Some(issuer) = self.issuer.clone() else { return };
        for slot in &mut self.slots {
            if slot.fetching || slot.life == Life::Gone || slot.due.is_none_or(|due| due > now) {
                continue;
            }
            if let Some(application) = slot.application
                && self.store.lease(application, now).is_err()
            {
                // Minting needs the application's token: wait for it to be published
                // (which makes this slot due again), with a slow poll as a fallback.
                slot.due = Some(now + self.schedule.backoff_max);
                continue;
            }
            slot.fetching = true;
            Metrics::credential(&self.metrics.refresh_attempts, &slot.credential.name);
            // Taken, not copied: a refresh token is presented at most once, whatever
            // the outcome (a timed-out redemption may still have rotated it).
            let refresh_token = slot.refresh_token.take();
            let kind = slot.credential.kind.clone();
            let (id, application) = (slot.id, slot.application);
            let (issuer, store) = (issuer.clone(), self.store.clone());
            fetches.spawn(async move {
                let requested_at = Instant::now();
                let result = fetch(&issuer, &store, &kind, application, refresh_token).await;
                Outcome { slot: id, requested_at, result }
            });
        }
    }

    /// A request saw Tallyfy reject generation `rejected.generation`. Refresh now,
    /// unless a refresh is already running (its end wakes the waiters), a newer
    /// token exists, the backoff after failures owns the schedule, or a rejection
    /// forced a refresh less than `min_forced_refresh_interval` ago (a caller whose
    /// requests draw 401s for other reasons must not hammer the token endpoint).
    fn on_rejected(&mut self, rejected: Rejected) {
        let now = Instant::now();
        let id = rejected.slot;
        let current = self.store.generation(id);
        let epoch = self.epoch;
        let slot = &mut self.slots[id.index()];
        if slot.fetching {
            return;
        }
        let recently_forced =
            slot.last_forced.is_some_and(|at| now.duration_since(at) < self.min_forced_interval);
        let refreshable = slot.epoch == epoch
            && slot.life != Life::Gone
            && !matches!(slot.credential.kind, CredentialKind::PersonalToken { .. });
        if !refreshable || current > rejected.generation || slot.failures > 0 || recently_forced {
            self.store.settle(id); // declined: release the waiters
            return;
        }
        tracing::info!(credential = %slot.credential.name, "Tallyfy rejected the token; refreshing now");
        slot.last_forced = Some(now);
        slot.due = Some(now);
    }

    fn on_outcome(&mut self, Outcome { slot: id, requested_at, result }: Outcome) {
        let now = Instant::now();
        let jitter: f64 = rand::random();
        let slot = &mut self.slots[id.index()];
        slot.fetching = false;
        let issued = match result {
            Ok(issued) => issued,
            Err(error) => {
                if let (Some(application), FetchError::Refused { status: 401, .. }) =
                    (slot.application, &error)
                {
                    // The application token was refused while minting: renew it, and
                    // mint again as soon as it is back. Requests waiting for this
                    // credential keep waiting for that second mint.
                    slot.awaiting_application = true;
                    let application = &mut self.slots[application.index()];
                    if !application.fetching && application.life != Life::Gone {
                        application.due = Some(now);
                    }
                    return self.failed(id, now, jitter, &error, false);
                }
                return self.failed(id, now, jitter, &error, true);
            }
        };
        let expires_at = requested_at + issued.lifetime;
        let Ok(token) = Token::bearer(&issued.access_token, Some(expires_at)) else {
            let error = FetchError::Malformed("access_token is not header-safe");
            return self.failed(id, now, jitter, &error, true);
        };
        slot.failures = 0;
        slot.refresh_token = issued.refresh_token;
        slot.due = (slot.life == Life::Live)
            .then(|| self.schedule.refresh_at(requested_at, issued.lifetime, jitter));
        tracing::info!(
            credential = %slot.credential.name,
            lifetime_s = issued.lifetime.as_secs(),
            refresh_in_ms = slot.due.map_or(0, |d| d.saturating_duration_since(now).as_millis() as u64),
            "token obtained"
        );
        self.store.publish(id, token);
        // Mints waiting for this application token can go now.
        for dependent in &mut self.slots {
            if dependent.application != Some(id) || dependent.fetching || dependent.life == Life::Gone {
                continue;
            }
            if dependent.awaiting_application || self.store.lease(dependent.id, now).is_err() {
                dependent.awaiting_application = false;
                dependent.due = Some(now);
            }
        }
    }

    /// Schedules the retry of a failed fetch (live slots only); `settle`
    /// releases the requests waiting for it.
    fn failed(&mut self, id: SlotId, now: Instant, jitter: f64, error: &FetchError, settle: bool) {
        let slot = &mut self.slots[id.index()];
        self.metrics.refresh_failed(&slot.credential.name, error.reason());
        slot.failures = slot.failures.saturating_add(1);
        let delay = self.schedule.backoff(slot.failures, jitter);
        slot.due = (slot.life == Life::Live).then_some(now + delay);
        let still_valid = self.store.lease(id, now).is_ok();
        tracing::warn!(
            credential = %slot.credential.name,
            reason = error.reason(),
            error = %error,
            failures = slot.failures,
            retry_in_ms = delay.as_millis() as u64,
            still_serving = still_valid,
            "token fetch failed"
        );
        if settle {
            self.store.settle(id);
        }
    }
}

/// Whether `slot` was made for the very same credential settings (secrets
/// included; an `application_user`'s application is compared by slot).
fn same_settings(slot: &Credential, new: &Credential) -> bool {
    slot.name == new.name
        && match (&slot.kind, &new.kind) {
            (
                CredentialKind::ApplicationUser { org: o1, email: e1, provision: p1, .. },
                CredentialKind::ApplicationUser { org: o2, email: e2, provision: p2, .. },
            ) => o1 == o2 && e1 == e2 && p1 == p2,
            (old, new) => old == new,
        }
}

/// One fetch for one slot: the grant its kind calls for.
async fn fetch(
    issuer: &Issuer,
    store: &TokenStore,
    kind: &CredentialKind,
    application: Option<SlotId>,
    refresh_token: Option<Secret>,
) -> Result<Issued, FetchError> {
    match kind {
        CredentialKind::PersonalToken { .. } => {
            Err(FetchError::Malformed("personal tokens are never fetched"))
        }
        CredentialKind::ClientCredentials { client, scope } => {
            issuer.client_credentials(client, scope.as_deref()).await
        }
        CredentialKind::Password { client, username, password, scope } => {
            if let Some(refresh_token) = refresh_token {
                match issuer.refresh(client, &refresh_token).await {
                    Ok(issued) => return Ok(issued),
                    Err(error) if error.is_invalid_grant() => {
                        tracing::info!("refresh token refused; signing in with the password grant");
                    }
                    Err(error) => return Err(error),
                }
            }
            issuer.password(client, username, password, scope.as_deref()).await
        }
        CredentialKind::ApplicationUser { org, email, provision, .. } => {
            let application = application.ok_or(FetchError::NoApplicationToken)?;
            let lease =
                store.lease(application, Instant::now()).map_err(|_| FetchError::NoApplicationToken)?;
            match issuer.mint_user_token(&lease.authorization, org, email).await {
                Err(FetchError::Refused { status: 404, .. }) if provision.is_some() => {
                    let provision = provision.as_ref().expect("checked by the guard");
                    tracing::info!(%org, "user not found; provisioning it");
                    issuer.provision_user(&lease.authorization, org, email, provision).await?;
                    issuer.mint_user_token(&lease.authorization, org, email).await
                }
                other => other,
            }
        }
    }
}
