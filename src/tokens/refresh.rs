//! The refresher: the token store's single writer.
//!
//! One task owns every credential's refresh state. It fetches every token at
//! start-up, then refreshes each at the time [`Schedule::refresh_at`] picks; a
//! failed fetch is retried after [`Schedule::backoff`], forever, while the old
//! token keeps serving until its real expiry. Requests never wait for it, except
//! after Tallyfy rejected their token: they report the rejected generation
//! through a [`RefreshHandle`], and however many report the same token, one fetch
//! runs and all of them wait for its result ([`TokenStore::newer_than`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::issuer::{FetchError, Issued, Issuer};
use super::schedule::Schedule;
use super::{CredentialId, Token, TokenStore};
use crate::config::{Config, Credential, CredentialKind};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// "Tallyfy rejected generation `generation` of this credential's token."
#[derive(Debug, Clone, Copy)]
struct Rejected {
    credential: CredentialId,
    generation: u64,
}

/// The request side of the refresher. Cheap to clone.
#[derive(Clone)]
pub struct RefreshHandle {
    rejected: mpsc::Sender<Rejected>,
    store: Arc<TokenStore>,
    /// Per credential: can a new token be fetched at all? (Not for personal tokens.)
    refreshable: Arc<[bool]>,
}

impl RefreshHandle {
    pub fn is_refreshable(&self, credential: CredentialId) -> bool {
        self.refreshable[credential.index()]
    }

    /// Reports a rejected token. Never blocks: when the queue is full, reports for
    /// this credential are already pending. When the refresher is gone (shutdown,
    /// reload), waiters are released at once.
    pub fn token_rejected(&self, credential: CredentialId, generation: u64) {
        if let Err(mpsc::error::TrySendError::Closed(_)) =
            self.rejected.try_send(Rejected { credential, generation })
        {
            self.store.settle(credential);
        }
    }
}

/// What a stopped refresher leaves for the next one.
#[derive(Default)]
pub struct Handover {
    /// The token endpoint and API the tokens were obtained from: tokens never
    /// cross to another upstream.
    upstream: String,
    entries: Vec<Carried>,
}

struct Carried {
    credential: Credential,
    /// `application_user`: the name of the application credential it was minted with.
    application: Option<String>,
    token: Option<Token>,
    refresh_token: Option<Secret>,
    due: Option<Instant>,
    failures: u32,
}

impl Handover {
    /// The state of a credential with the same name and the very same settings
    /// (secrets included; an `application_user`'s application compared by
    /// name); a changed credential starts afresh.
    fn take(&mut self, credential: &Credential, application: Option<&str>) -> Option<Carried> {
        let same = |c: &Carried| {
            c.credential.name == credential.name
                && c.application.as_deref() == application
                && match (&c.credential.kind, &credential.kind) {
                    (
                        CredentialKind::ApplicationUser { org: o1, email: e1, provision: p1, .. },
                        CredentialKind::ApplicationUser { org: o2, email: e2, provision: p2, .. },
                    ) => o1 == o2 && e1 == e2 && p1 == p2,
                    (old, new) => old == new,
                }
        };
        let position = self.entries.iter().position(same)?;
        Some(self.entries.swap_remove(position))
    }
}

/// Refresh state of one credential.
struct Slot {
    credential: Credential,
    /// The password grant's refresh token, if one is held and not yet redeemed.
    refresh_token: Option<Secret>,
    /// When to fetch next; `None` for static tokens.
    due: Option<Instant>,
    /// Consecutive failures, for the backoff.
    failures: u32,
    fetching: bool,
    /// When a rejection last forced a refresh (rate-limits forced refreshes).
    last_forced: Option<Instant>,
    /// `application_user`: the mint was refused for a dead application token;
    /// mint again as soon as the application's new token is published.
    awaiting_application: bool,
    /// `application_user` credentials minted with this one's token.
    dependents: Vec<usize>,
}

struct Outcome {
    index: usize,
    /// When the fetch started: lifetimes count from here, not from the answer.
    requested_at: Instant,
    result: Result<Issued, FetchError>,
}

pub struct Refresher {
    store: Arc<TokenStore>,
    metrics: Arc<Metrics>,
    issuer: Arc<Issuer>,
    schedule: Schedule,
    min_forced_interval: Duration,
    /// Token endpoint and API base: what a handover must match.
    upstream: String,
    slots: Vec<Slot>,
    rejected: mpsc::Receiver<Rejected>,
}

impl Refresher {
    /// Prepares the refresher for `config` and publishes its static tokens
    /// (personal access tokens need no token endpoint).
    pub fn new(
        config: &Config,
        store: Arc<TokenStore>,
        issuer: Issuer,
        metrics: Arc<Metrics>,
    ) -> Result<(Refresher, RefreshHandle), String> {
        let now = Instant::now();
        let mut slots: Vec<Slot> = config
            .credentials
            .iter()
            .map(|credential| Slot {
                credential: credential.clone(),
                refresh_token: None,
                due: Some(now),
                failures: 0,
                fetching: false,
                last_forced: None,
                awaiting_application: false,
                dependents: Vec::new(),
            })
            .collect();
        for index in 0..slots.len() {
            match &slots[index].credential.kind {
                CredentialKind::PersonalToken { token } => {
                    let token = Token::bearer(token, None).map_err(|_| {
                        format!(
                            "credential {}: the token cannot be sent in a header",
                            slots[index].credential.name
                        )
                    })?;
                    store.publish(CredentialId::new(index), token);
                    slots[index].due = None;
                }
                CredentialKind::ApplicationUser { application, .. } => {
                    let application = application.index();
                    slots[application].dependents.push(index);
                }
                CredentialKind::ClientCredentials { .. } | CredentialKind::Password { .. } => {}
            }
        }
        let refreshable: Arc<[bool]> = slots.iter().map(|s| s.due.is_some()).collect();
        let (tx, rx) = mpsc::channel(1024);
        let refresher = Refresher {
            store,
            metrics,
            issuer: Arc::new(issuer),
            schedule: config.tokens.schedule,
            min_forced_interval: config.tokens.min_forced_refresh_interval,
            upstream: format!(
                "{} {}://{}{}",
                config.upstream.token_url,
                config.upstream.scheme,
                config.upstream.authority,
                config.upstream.path_prefix
            ),
            slots,
            rejected: rx,
        };
        let handle = RefreshHandle { rejected: tx, store: refresher.store.clone(), refreshable };
        Ok((refresher, handle))
    }

    /// Takes over what the previous refresher (of the config being replaced)
    /// returned: credentials whose settings did not change keep their token,
    /// refresh token and schedule, and cost no token-endpoint call. Returns how
    /// many were carried over.
    pub fn adopt(&mut self, mut handover: Handover) -> usize {
        if handover.upstream != self.upstream {
            return 0;
        }
        let applications: Vec<Option<String>> = self
            .slots
            .iter()
            .map(|slot| {
                application_of(&slot.credential).map(|id| self.slots[id.index()].credential.name.clone())
            })
            .collect();
        let mut carried_over = 0;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(carried) = handover.take(&slot.credential, applications[index].as_deref()) else {
                continue;
            };
            slot.refresh_token = carried.refresh_token;
            slot.due = carried.due;
            slot.failures = carried.failures;
            if let Some(token) = carried.token {
                self.store.publish(CredentialId::new(index), token);
            }
            carried_over += 1;
        }
        carried_over
    }

    /// Runs until `shutdown` fires, then hands its state over (for a reload).
    /// Fetches still running are abandoned; a refresh token they carried is not
    /// reused, so none is ever presented twice.
    pub async fn run(mut self, shutdown: CancellationToken) -> Handover {
        let mut fetches: JoinSet<Outcome> = JoinSet::new();
        loop {
            let now = Instant::now();
            self.start_due(now, &mut fetches);
            let next_due = self.slots.iter().filter(|s| !s.fetching).filter_map(|s| s.due).min();
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
                next_due.unwrap_or(now + Duration::from_secs(3600)),
            ));
            tokio::select! {
                () = shutdown.cancelled() => return self.handover(),
                Some(rejected) = self.rejected.recv() => self.on_rejected(rejected),
                Some(joined) = fetches.join_next(), if !fetches.is_empty() => match joined {
                    Ok(outcome) => self.on_outcome(outcome),
                    Err(error) => tracing::error!(%error, "a token fetch task failed"),
                },
                () = sleep => {}
            }
        }
    }

    fn handover(self) -> Handover {
        let store = self.store;
        let applications: Vec<Option<String>> = self
            .slots
            .iter()
            .map(|slot| {
                application_of(&slot.credential).map(|id| self.slots[id.index()].credential.name.clone())
            })
            .collect();
        let entries = self
            .slots
            .into_iter()
            .zip(applications)
            .enumerate()
            .filter(|(_, (slot, _))| !matches!(slot.credential.kind, CredentialKind::PersonalToken { .. }))
            .map(|(index, (slot, application))| Carried {
                application,
                token: store.token(CredentialId::new(index)),
                refresh_token: slot.refresh_token,
                due: if slot.fetching { Some(Instant::now()) } else { slot.due },
                failures: slot.failures,
                credential: slot.credential,
            })
            .collect();
        Handover { upstream: self.upstream, entries }
    }

    fn start_due(&mut self, now: Instant, fetches: &mut JoinSet<Outcome>) {
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if slot.fetching || slot.due.is_none_or(|due| due > now) {
                continue;
            }
            if let Some(application) = application_of(&slot.credential)
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
            let issuer = self.issuer.clone();
            let store = self.store.clone();
            fetches.spawn(async move {
                let requested_at = Instant::now();
                let result = fetch(&issuer, &store, &kind, refresh_token).await;
                Outcome { index, requested_at, result }
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
        let id = rejected.credential;
        let current = self.store.generation(id);
        let slot = &mut self.slots[id.index()];
        if slot.fetching {
            return;
        }
        let recently_forced =
            slot.last_forced.is_some_and(|at| now.duration_since(at) < self.min_forced_interval);
        if current > rejected.generation || slot.failures > 0 || recently_forced {
            self.store.settle(id); // declined: release the waiters
            return;
        }
        tracing::info!(credential = %slot.credential.name, "Tallyfy rejected the token; refreshing now");
        slot.last_forced = Some(now);
        slot.due = Some(now);
    }

    fn on_outcome(&mut self, Outcome { index, requested_at, result }: Outcome) {
        let now = Instant::now();
        let jitter: f64 = rand::random();
        let slot = &mut self.slots[index];
        slot.fetching = false;
        match result {
            Ok(issued) => {
                let expires_at = requested_at + issued.lifetime;
                match Token::bearer(&issued.access_token, Some(expires_at)) {
                    Ok(token) => {
                        slot.failures = 0;
                        slot.refresh_token = issued.refresh_token;
                        slot.due = Some(self.schedule.refresh_at(requested_at, issued.lifetime, jitter));
                        tracing::info!(
                            credential = %slot.credential.name,
                            lifetime_s = issued.lifetime.as_secs(),
                            refresh_in_ms = slot.due.map_or(0, |d| d.saturating_duration_since(now).as_millis() as u64),
                            "token obtained"
                        );
                        self.store.publish(CredentialId::new(index), token);
                        // Mints waiting for this application token can go now.
                        for dependent in self.slots[index].dependents.clone() {
                            let dependent_slot = &mut self.slots[dependent];
                            let waiting = dependent_slot.awaiting_application
                                || self.store.lease(CredentialId::new(dependent), now).is_err();
                            if waiting && !dependent_slot.fetching {
                                dependent_slot.awaiting_application = false;
                                dependent_slot.due = Some(now);
                            }
                        }
                    }
                    Err(_) => self.failed(
                        index,
                        now,
                        jitter,
                        &FetchError::Malformed("access_token is not header-safe"),
                        true,
                    ),
                }
            }
            Err(error) => {
                if let (Some(application), FetchError::Refused { status: 401, .. }) =
                    (application_of(&slot.credential), &error)
                {
                    // The application token was refused while minting: renew it, and
                    // mint again as soon as it is back. Requests waiting for this
                    // credential keep waiting for that second mint.
                    slot.awaiting_application = true;
                    let application = &mut self.slots[application.index()];
                    if !application.fetching {
                        application.due = Some(now);
                    }
                    self.failed(index, now, jitter, &error, false);
                } else {
                    self.failed(index, now, jitter, &error, true);
                }
            }
        }
    }

    /// Schedules the retry of a failed fetch; `settle` releases the requests
    /// waiting for it.
    fn failed(&mut self, index: usize, now: Instant, jitter: f64, error: &FetchError, settle: bool) {
        let slot = &mut self.slots[index];
        self.metrics.refresh_failed(&slot.credential.name, error.reason());
        slot.failures = slot.failures.saturating_add(1);
        let delay = self.schedule.backoff(slot.failures, jitter);
        slot.due = Some(now + delay);
        let still_valid = self.store.lease(CredentialId::new(index), now).is_ok();
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
            self.store.settle(CredentialId::new(index));
        }
    }
}

fn application_of(credential: &Credential) -> Option<CredentialId> {
    match &credential.kind {
        CredentialKind::ApplicationUser { application, .. } => Some(*application),
        _ => None,
    }
}

/// One fetch for one credential: the grant its kind calls for.
async fn fetch(
    issuer: &Issuer,
    store: &TokenStore,
    kind: &CredentialKind,
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
        CredentialKind::ApplicationUser { application, org, email, provision } => {
            let lease =
                store.lease(*application, Instant::now()).map_err(|_| FetchError::NoApplicationToken)?;
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
