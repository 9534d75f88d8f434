//! The refresher's slots: one per credential setting, kept across reloads while
//! a config uses it, retired when none does.

use std::collections::HashSet;

use tokio::time::Instant;

use super::super::{Credential, CredentialKind, CredentialTokens, SlotId, Token, TokenSource};
use super::{CredentialSet, RETIRED_GRACE, Refresher, shared};
use crate::secret::Secret;
use std::sync::Arc;

/// Whether a slot is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Life {
    /// Used by the current config.
    Live,
    /// Used only by older configs: never fetched again (its token serves
    /// their requests still in flight); forgotten at this time.
    Retired { forget_at: Instant },
    /// Forgotten: its token is cleared.
    Gone,
}

/// Refresh state of one slot.
pub(super) struct Slot {
    pub(super) id: SlotId,
    /// The settings it was created with.
    pub(super) credential: Credential,
    /// `application_user`: the slot of the application token it mints with.
    pub(super) application: Option<SlotId>,
    /// The upstream it belongs to (tokens never cross to another).
    pub(super) epoch: u32,
    pub(super) life: Life,
    /// The password grant's refresh token, if one is held and not yet redeemed.
    pub(super) refresh_token: Option<Secret>,
    /// When to fetch next; `None` for static tokens and retired slots.
    pub(super) due: Option<Instant>,
    /// Consecutive failures, for the backoff.
    pub(super) failures: u32,
    pub(super) fetching: bool,
    /// When a rejection last forced a refresh (rate-limits forced refreshes).
    pub(super) last_forced: Option<Instant>,
    /// `application_user`: the mint was refused for a dead application token;
    /// mint again as soon as the application's new token is published.
    pub(super) awaiting_application: bool,
    /// Fleet mode: the name the fleet knows this credential by (`None` for
    /// personal tokens, which are never fetched).
    pub(super) fleet_name: Option<Arc<str>>,
    /// The fleet generation this slot holds (0: none yet).
    pub(super) shared_generation: u64,
    /// The fleet refused this replica's key: fetch alone until the key
    /// returns after this many returns ([`crate::fleet::Fleet::rejoins`]
    /// when the fetch that left began).
    pub(super) outside_fleet: Option<u64>,
    /// Serves with the token of this slot (the one it replaced) until it
    /// obtains its own ([`Refresher::stand_in`]); a refresh of that slot
    /// still under way at the reload is passed on.
    pub(super) stands_in_for: Option<SlotId>,
    /// Fleet mode: the next fetch only looks for a newer set in the fleet (a
    /// rejection came too soon after a forced refresh to force another); the
    /// planned refresh time to go back to when there is none.
    pub(super) adopt_only: Option<Option<Instant>>,
    /// A dead-token rejection (its generation) that came while a look at
    /// the fleet's set was under way: judged once that look has ended (a
    /// look that finds nothing newer would otherwise release its waiters with
    /// Tallyfy's 401, no refresh forced).
    pub(super) rejected_meanwhile: Option<u64>,
}

impl Slot {
    /// Reads the fleet's set soon and takes it only if it is newer; the
    /// slot's own plan (its refresh time) stays as it was.
    pub(super) fn adopt_soon(&mut self, now: Instant) {
        if self.adopt_only.is_none() {
            self.adopt_only = Some(self.due);
        }
        self.due = Some(now);
    }

    /// Back in the fleet when its key has returned (`rejoins` returns so far)
    /// since the fetch that left it began.
    pub(super) fn back_in_fleet_after(&mut self, rejoins: u64) {
        if self.outside_fleet.is_some_and(|left| left < rejoins) {
            self.outside_fleet = None;
        }
    }
}

impl Refresher {
    /// Maps `config`'s credentials onto slots, creating the new ones (personal
    /// tokens are published at once; OAuth ones are due now) and retiring the
    /// ones it no longer uses. Fails, changing nothing, when a personal token
    /// cannot be sent in a header.
    pub fn configure(
        &mut self,
        set: &CredentialSet,
        issuer: impl TokenSource,
    ) -> Result<CredentialTokens, String> {
        self.configure_shared(set, Arc::new(issuer))
    }

    pub(super) fn configure_shared(
        &mut self,
        set: &CredentialSet,
        issuer: Arc<dyn TokenSource>,
    ) -> Result<CredentialTokens, String> {
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
        self.issuer = Some(issuer);
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
                    None => {
                        let first = match statics[index].take() {
                            Some(token) => First::Static(token),
                            None => self
                                .stand_in(credential, application, now)
                                .map_or(First::Fetch, First::StandIn),
                        };
                        self.create(credential, application, first, now)
                    }
                };
                kept.insert(id);
                assigned[index] = Some(id);
            }
        }
        for slot in &mut self.slots {
            if slot.life == Life::Live && !kept.contains(&slot.id) {
                slot.life = Life::Retired { forget_at: now + RETIRED_GRACE };
                slot.due = None;
                slot.awaiting_application = false;
                if !slot.fetching {
                    // No token will come for it: the requests waiting for one
                    // (a first token, or one after Tallyfy's 401) go at once.
                    // A fetch under way settles them as it ends.
                    self.store.settle(slot.id);
                }
            }
        }
        let slots: Vec<SlotId> =
            assigned.into_iter().map(|id| id.expect("every credential was assigned")).collect();
        let refreshable =
            set.credentials.iter().map(|c| !matches!(c.kind, CredentialKind::PersonalToken { .. })).collect();
        Ok(CredentialTokens::new(self.store.clone(), slots, refreshable))
    }

    /// What the new slot of a changed `credential` serves with until it
    /// obtains its own token: the token of the slot it replaces, while valid,
    /// when only a secret changed (the same principal: same name, upstream,
    /// kind, client id, user, org, scope and application, compared by
    /// [`shared::fleet_name`]). A credential now acting as another principal
    /// takes nothing: a token never acts for settings other than its own, and
    /// its callers wait for the first one (`Proxy::first_token`).
    fn stand_in(
        &self,
        credential: &Credential,
        application: Option<SlotId>,
        now: Instant,
    ) -> Option<(SlotId, Token)> {
        let principal = self.principal(credential, application);
        let previous = self.slots.iter().find(|slot| {
            slot.life == Life::Live
                && slot.epoch == self.epoch
                && slot.fleet_name.as_deref() == Some(principal.as_str())
        })?;
        let token = self.store.token(previous.id).filter(|token| token.is_valid_at(now))?;
        tracing::info!(
            credential = %credential.name,
            "credential's secret changed: its previous token serves until the new one obtains a token"
        );
        Some((previous.id, token))
    }

    /// Who `credential`'s tokens act as, secrets aside: its name in the fleet.
    fn principal(&self, credential: &Credential, application: Option<SlotId>) -> String {
        let application = application.map(|id| &self.slots[id.index()].credential);
        shared::fleet_name(credential, application, &self.upstream)
    }

    pub(super) fn create(
        &mut self,
        credential: &Credential,
        application: Option<SlotId>,
        first: First,
        now: Instant,
    ) -> SlotId {
        let id = self.store.add_slot(&credential.name);
        let mut stands_in_for = None;
        let due = match first {
            First::Static(token) => {
                self.store.publish(id, token);
                None
            }
            First::StandIn((previous, token)) => {
                self.store.publish(id, token);
                stands_in_for = Some(previous);
                Some(now)
            }
            First::Fetch => Some(now),
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
            fleet_name: (due.is_some()).then(|| self.principal(credential, application).into()),
            shared_generation: 0,
            outside_fleet: None,
            stands_in_for,
            adopt_only: None,
            rejected_meanwhile: None,
        });
        debug_assert_eq!(self.slots.len(), id.index() + 1, "slots and store entries share indexes");
        id
    }
}

/// What a new slot starts with.
pub(super) enum First {
    /// A personal token: published, never fetched.
    Static(Token),
    /// The previous settings' slot and token ([`Refresher::stand_in`]),
    /// published while the first fetch runs.
    StandIn((SlotId, Token)),
    /// Nothing: callers wait for the first fetch.
    Fetch,
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
