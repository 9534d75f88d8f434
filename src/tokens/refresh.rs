//! The refresher: the token store's single writer, for the life of the process.
//!
//! One task owns every slot's refresh state. It fetches each token when its slot
//! is created, then refreshes it at the time [`Schedule::refresh_at`] picks; a
//! failed fetch is retried after [`Schedule::backoff`], forever, while the old
//! token keeps serving until its real expiry. Requests never wait for it, except
//! for a credential's first token (`Proxy::first_token`), and after Tallyfy
//! rejected their token: they report the rejected generation through a
//! [`RefreshHandle`], and however many report the same token, one fetch runs and
//! all of them wait for its result ([`TokenStore::newer_than`]).
//!
//! A config reload is a [`RefreshHandle::reconfigure`]: credentials whose
//! settings did not change keep their slot (token, refresh token, schedule, a
//! fetch already running, the requests waiting on it); changed ones get a new
//! slot, fetched at once. When only a secret changed (a rotation), the new slot
//! goes on with the previous slot's token until it obtains its own, so a
//! rotated secret Tallyfy refuses stops no traffic before that token expires;
//! a credential now acting as another principal (client, user, org, scope,
//! kind, application) starts empty, and its callers wait for its first token.
//! Slots no config uses any more are never fetched again, not even for a
//! request of the old config whose token Tallyfy rejects (a reload that removed
//! a credential makes no grant with its secrets after it), and are forgotten
//! after [`RETIRED_GRACE`], once requests of the old config are long done.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod fetch;
mod handle;
mod shared;
mod slots;
#[cfg(test)]
mod tests;

use super::TokenSource;
use super::issuer::FetchError;
use super::schedule::Schedule;
use super::{CredentialKind, SlotId, Token, TokenStore};
use fetch::{Outcome, fetch};
use shared::{Obtained, Source};
use slots::{Life, Slot};

use crate::fleet::{Fleet, News};
use crate::metrics::Metrics;
pub use handle::{CredentialSet, RefreshHandle};
use handle::{Reconfigure, Rejected};

/// How long a slot no config uses keeps its token, for requests of the old
/// config still in flight (a replay after a dead-token 401 needs it).
pub const RETIRED_GRACE: Duration = Duration::from_secs(15 * 60);

pub struct Refresher {
    store: Arc<TokenStore>,
    metrics: Arc<Metrics>,
    issuer: Option<Arc<dyn TokenSource>>,
    schedule: Schedule,
    min_forced_interval: Duration,
    /// Token endpoint and API base of the current config.
    upstream: String,
    /// Bumped whenever `upstream` changes.
    epoch: u32,
    /// Indexed by [`SlotId`].
    slots: Vec<Slot>,
    rejected: mpsc::UnboundedReceiver<Rejected>,
    reconfigures: mpsc::Receiver<Reconfigure>,
    /// Fleet mode: the Redis the replicas share, and its news of new token sets.
    fleet: Option<(Arc<Fleet>, tokio::sync::broadcast::Receiver<News>)>,
}

impl Refresher {
    pub fn new(store: Arc<TokenStore>, metrics: Arc<Metrics>) -> (Refresher, RefreshHandle) {
        // Unbounded: each request reports at most once, so the queue holds no
        // more than the requests in flight; a bounded one dropped reports when
        // full, another credential's only report among them.
        let (rejected_tx, rejected) = mpsc::unbounded_channel();
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
            fleet: None,
        };
        (refresher, handle)
    }

    /// Shares tokens and refreshes with the other replicas of `fleet` (call
    /// before the first configure).
    pub fn join_fleet(&mut self, fleet: Arc<Fleet>) {
        let news = fleet.news();
        self.fleet = Some((fleet, news));
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
                    // Never fetched again: only its forgetting is due.
                    Life::Retired { forget_at } => Some(forget_at),
                    Life::Live => slot.due,
                    Life::Gone => None,
                })
                .min()
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(request) = self.reconfigures.recv() => {
                    let Reconfigure { set, issuer, reply } = request;
                    let _ = reply.send(self.configure_shared(&set, issuer));
                }
                Some(rejected) = self.rejected.recv() => self.on_rejected(rejected),
                Some(news) = next_news(self.fleet.as_mut().map(|(_, news)| news)) => self.on_news(&news),
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
                slot.credential.forget_secrets();
                slot.refresh_token = None;
                slot.due = None;
                self.store.clear(slot.id);
            }
        }
    }

    fn start_due(&mut self, now: Instant, fetches: &mut JoinSet<Outcome>) {
        let Some(issuer) = self.issuer.clone() else { return };
        let mut waiting_for: SmallVec<[SlotId; 2]> = SmallVec::new();
        for slot in &mut self.slots {
            // Only a slot the current config uses is fetched: a retired one's
            // settings were removed or replaced (a secret revoked, say), and
            // no grant is made with them any more.
            if slot.fetching || slot.life != Life::Live || slot.due.is_none_or(|due| due > now) {
                continue;
            }
            if let Some(application) = slot.application
                && self.store.lease(application, now).is_err()
            {
                // Minting needs the application's token: wait for it to be published
                // (which makes this slot due again), with a slow poll as a fallback.
                slot.due = Some(now + self.schedule.backoff_max);
                waiting_for.push(application);
                continue;
            }
            slot.fetching = true;
            if slot.adopt_only.is_none() {
                // A look at the fleet's set (news of it) is no refresh.
                Metrics::credential(&self.metrics.refresh_attempts, &slot.credential.name);
            }
            // Taken, not copied: a refresh token is presented at most once, whatever
            // the outcome (a timed-out redemption may still have rotated it).
            let refresh_token = slot.refresh_token.take();
            let kind = slot.credential.kind.clone();
            let (id, application) = (slot.id, slot.application);
            let application_generation = application
                .and_then(|application| self.store.lease(application, now).ok())
                .map(|l| l.generation);
            let (issuer, store) = (issuer.clone(), self.store.clone());
            let one_fetch = move |refresh_token| {
                let (issuer, store, kind) = (issuer.clone(), store.clone(), kind.clone());
                async move { fetch(&*issuer, &store, &kind, application, refresh_token).await }
            };
            // A credential out of the fleet tries it again at its own time
            // once the key has returned since (news of it may never come: a
            // credential no replica in the fleet writes).
            if let Some((fleet, _)) = &self.fleet {
                slot.back_in_fleet_after(fleet.rejoins());
            }
            let shared = match (&self.fleet, &slot.fleet_name) {
                (Some((fleet, _)), Some(name)) if slot.outside_fleet.is_none() => {
                    Some((fleet.clone(), self.metrics.clone(), name.clone(), slot.credential.name.clone()))
                }
                _ => None,
            };
            let installed = slot.shared_generation;
            let adopt_only = slot.adopt_only.is_some();
            let fetch = async move {
                match shared {
                    Some((fleet, metrics, name, credential)) if adopt_only => {
                        shared::adopt(&fleet, &metrics, &credential, &name, installed).await
                    }
                    Some((fleet, metrics, name, credential)) => {
                        // The slot's own refresh token is not used: in a fleet only a lease
                        // holder presents one, the one the fleet holds.
                        drop(refresh_token);
                        shared::obtain(&fleet, &metrics, &credential, &name, installed, one_fetch).await
                    }
                    None => {
                        let requested_at = Instant::now();
                        one_fetch(refresh_token).await.map(|issued| Obtained {
                            issued,
                            requested_at,
                            source: Source::Alone,
                        })
                    }
                }
            };
            // A fetch that panics fails like any other, so its slot is not left
            // fetching (and never refreshed) for ever.
            fetches.spawn(async move {
                let result = AssertUnwindSafe(fetch).catch_unwind().await.unwrap_or_else(|_| {
                    tracing::error!("a token fetch panicked; retried with backoff");
                    Err(FetchError::Transport("the fetch panicked".to_owned()))
                });
                Outcome { slot: id, result, application_generation }
            });
        }
        // An application between attempts (backing off) will not publish soon.
        for application in waiting_for {
            if !self.slots[application.index()].fetching {
                self.no_first_mint(application);
            }
        }
    }

    /// A request saw Tallyfy reject generation `rejected.generation`. Refresh now,
    /// unless a refresh is already running (its end wakes the waiters), a newer
    /// token exists, the backoff after failures owns the schedule, or a rejection
    /// forced a refresh less than `min_forced_refresh_interval` ago (a caller whose
    /// requests draw 401s for other reasons must not hammer the token endpoint),
    /// or no config uses the slot any more (its requests get Tallyfy's answer).
    fn on_rejected(&mut self, rejected: Rejected) {
        let now = Instant::now();
        let id = rejected.slot;
        let current = self.store.generation(id);
        let epoch = self.epoch;
        let slot = &mut self.slots[id.index()];
        if slot.fetching {
            if slot.adopt_only.is_some() {
                slot.rejected_meanwhile = slot.rejected_meanwhile.max(Some(rejected.generation));
            }
            return;
        }
        let recently_forced =
            slot.last_forced.is_some_and(|at| now.duration_since(at) < self.min_forced_interval);
        let refreshable = slot.epoch == epoch
            && slot.life == Life::Live
            && !matches!(slot.credential.kind, CredentialKind::PersonalToken { .. });
        let in_fleet = self.fleet.is_some() && slot.fleet_name.is_some() && slot.outside_fleet.is_none();
        if refreshable && current <= rejected.generation && recently_forced && in_fleet {
            // Another replica's refresh may have ended this token: take the
            // fleet's newer one if there is one, without forcing a refresh.
            slot.adopt_soon(now);
            return;
        }
        if current > rejected.generation {
            // A late report of a token already replaced: its waiters take the
            // newer one at once (when it is valid: else they are released).
            // Settling otherwise would release the waiters of a rejection of
            // the current token that is still to be judged.
            if self.store.lease(id, now).is_err() {
                self.store.settle(id);
            }
            return;
        }
        if slot.awaiting_application && refreshable {
            // A mint waits for its application's new token: its waiters are kept for it.
            return;
        }
        if !refreshable || slot.failures > 0 || recently_forced {
            self.store.settle(id); // declined: release the waiters
            return;
        }
        tracing::info!(credential = %slot.credential.name, "Tallyfy rejected the token; refreshing now");
        slot.last_forced = Some(now);
        slot.adopt_only = None; // a refresh, not only a look at the fleet's set
        slot.due = Some(now);
    }

    /// Another replica wrote a newer set: take it now rather than at this
    /// slot's own refresh time (only a read of the fleet's set: news is a hint
    /// anyone who can publish on the channel, or write the generations, can
    /// give, and a refresh for each message rotated the credential's tokens
    /// under every replica, once a message). A slot
    /// that left the fleet when its key was refused comes back once the key
    /// has become this replica's again since its fetch began (never at every
    /// poll: each would be a sign-in alone).
    fn on_news(&mut self, news: &News) {
        let News::Tokens { credential, generation } = news else { return };
        let now = Instant::now();
        let rejoins = self.fleet.as_ref().map_or(0, |(fleet, _)| fleet.rejoins());
        for slot in &mut self.slots {
            if slot.fleet_name.as_deref() != Some(&**credential) {
                continue;
            }
            slot.back_in_fleet_after(rejoins);
            if slot.life == Life::Live
                && !slot.fetching
                && slot.outside_fleet.is_none()
                && slot.shared_generation < *generation
            {
                // At most one look at the fleet's set (its lease, then the
                // set) a message or poll: one for a generation the set does
                // not reach yet (a blip, a forged number, a set that does not
                // open) is made again at the next, never lost.
                slot.adopt_soon(now);
            }
        }
    }

    fn on_outcome(&mut self, Outcome { slot: id, result, application_generation }: Outcome) {
        let slot = &mut self.slots[id.index()];
        slot.fetching = false;
        let planned = slot.adopt_only.take();
        if let Some(generation) = slot.rejected_meanwhile.take() {
            // Judged as it would have been had it come after this outcome
            // (a newer token published lets its waiters go with it).
            self.settle_outcome(id, result, application_generation, planned, true);
            return self.on_rejected(Rejected { slot: id, generation });
        }
        self.settle_outcome(id, result, application_generation, planned, false);
    }

    /// The rest of [`Refresher::on_outcome`]: `judged_next` when a rejection
    /// is judged right after (the waiters of a look that found nothing newer
    /// are then left to it).
    fn settle_outcome(
        &mut self,
        id: SlotId,
        result: Result<Obtained, FetchError>,
        application_generation: Option<u64>,
        planned: Option<Option<Instant>>,
        judged_next: bool,
    ) {
        let now = Instant::now();
        let jitter: f64 = rand::random();
        let slot = &mut self.slots[id.index()];
        let Obtained { issued, requested_at, source } = match result {
            Ok(obtained) => obtained,
            Err(FetchError::NothingNewer) => {
                // Nothing newer: back to the plan, and the waiters get Tallyfy's answer.
                slot.due = planned.flatten().filter(|_| slot.life == Life::Live);
                if !judged_next {
                    self.store.settle(id);
                }
                return;
            }
            Err(error) if slot.life != Life::Live => {
                // Retired while it fetched: it is not fetched again (no mint
                // awaits a new application token), and its waiters go at once.
                slot.awaiting_application = false;
                return self.failed(id, now, jitter, &error, true);
            }
            Err(error) => {
                if let (Some(application), FetchError::Refused { status: 401, .. }) =
                    (slot.application, &error)
                {
                    // The application token was refused while minting: renew it, and
                    // mint again as soon as it is back. Requests waiting for this
                    // credential keep waiting for that second mint. At most once per
                    // `min_forced_refresh_interval`, as a dead token forces one: a
                    // mint Tallyfy always refuses is an ordinary failure, retried
                    // with backoff, not a loop of mints and application tokens.
                    let min_forced = self.min_forced_interval;
                    let replaced = self.store.lease(application, now).ok().map(|l| l.generation)
                        > application_generation;
                    let application = &mut self.slots[application.index()];
                    if application.fetching || replaced {
                        // The application token is being renewed, or was since
                        // the mint began: mint again with the new one (when it
                        // is published), no failure counted, the waiters kept.
                        let slot = &mut self.slots[id.index()];
                        if replaced {
                            slot.due = Some(now);
                        } else {
                            slot.awaiting_application = true;
                            slot.due = Some(now + self.schedule.backoff_max);
                        }
                        self.metrics.refresh_failed(&slot.credential.name, error.reason());
                        return;
                    }
                    let renewable = application.life == Life::Live
                        && application.last_forced.is_none_or(|at| now.duration_since(at) >= min_forced);
                    if renewable {
                        application.last_forced = Some(now);
                        application.due = Some(now);
                        self.slots[id.index()].awaiting_application = true;
                        return self.failed(id, now, jitter, &error, false);
                    }
                    return self.failed(id, now, jitter, &error, true);
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
        slot.stands_in_for = None;
        slot.refresh_token = issued.refresh_token;
        match source {
            Source::Alone => {}
            Source::Fleet(generation) => slot.shared_generation = generation,
            Source::Refused(rejoins) => slot.outside_fleet = Some(rejoins),
        }
        slot.due = (slot.life == Life::Live)
            .then(|| self.schedule.refresh_at(requested_at, issued.lifetime, jitter));
        tracing::info!(
            credential = %slot.credential.name,
            lifetime_s = issued.lifetime.as_secs(),
            refresh_in_ms = slot.due.map_or(0, |d| d.saturating_duration_since(now).as_millis() as u64),
            "token obtained"
        );
        // A refresh of a replaced slot that was under way at the reload: the
        // slots standing in for it, directly or through rotations since whose
        // slots have no token of their own yet, go on with the new token (the
        // old one may have been revoked by that refresh). A successor is
        // always created after the slot it stands in for.
        let mut reached: SmallVec<[SlotId; 4]> = smallvec::smallvec![id];
        for successor in &self.slots[id.index() + 1..] {
            if successor.life != Life::Gone && successor.stands_in_for.is_some_and(|s| reached.contains(&s)) {
                reached.push(successor.id);
            }
        }
        for &slot in &reached[1..] {
            self.store.publish(slot, token.clone());
        }
        self.store.publish(id, token);
        for application in reached {
            self.wake_mints(application, now);
        }
    }

    /// Mints waiting for the application token of `application` can go now.
    fn wake_mints(&mut self, application: SlotId, now: Instant) {
        for dependent in &mut self.slots {
            if dependent.application != Some(application)
                || dependent.fetching
                || dependent.life != Life::Live
            {
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
            if !still_valid {
                self.no_first_mint(id);
            }
        }
    }

    /// The application `id` has no token and none is being fetched: the user
    /// tokens it would mint first, and whose mint has not begun, will not come
    /// before its next attempt, so their callers stop waiting.
    fn no_first_mint(&self, id: SlotId) {
        for dependent in &self.slots {
            if dependent.application == Some(id)
                && !dependent.fetching
                && self.store.first_pending(dependent.id)
            {
                self.store.settle(dependent.id);
            }
        }
    }
}

/// The next news of the fleet, if in one; never resolves otherwise.
async fn next_news(news: Option<&mut tokio::sync::broadcast::Receiver<News>>) -> Option<News> {
    let Some(news) = news else { return std::future::pending().await };
    loop {
        match news.recv().await {
            Ok(news) => return Some(news),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}
