//! [`CredentialTokens`]: one config generation's view of the store.

use std::sync::Arc;

use tokio::time::Instant;

use super::credential::CredentialId;
use super::store::{SlotId, TokenStore};
use super::token::{Lease, Unavailable};

/// The tokens of one config generation's credentials: which slot each
/// `[[credentials]]` table (by [`CredentialId`]) reads, and whether it can be
/// refreshed. Cheap to clone.
#[derive(Clone)]
pub struct CredentialTokens {
    store: Arc<TokenStore>,
    slots: Arc<[SlotId]>,
    refreshable: Arc<[bool]>,
}

impl CredentialTokens {
    pub fn new(store: Arc<TokenStore>, slots: Vec<SlotId>, refreshable: Vec<bool>) -> Self {
        CredentialTokens { store, slots: slots.into(), refreshable: refreshable.into() }
    }

    pub fn store(&self) -> &Arc<TokenStore> {
        &self.store
    }

    pub fn slot(&self, credential: CredentialId) -> SlotId {
        self.slots[credential.index()]
    }

    /// Whether a new token can be fetched at all (not for personal tokens).
    pub fn is_refreshable(&self, credential: CredentialId) -> bool {
        self.refreshable[credential.index()]
    }

    pub fn lease(&self, credential: CredentialId, now: Instant) -> Result<Lease, Unavailable> {
        self.store.lease(self.slot(credential), now)
    }

    pub fn name(&self, credential: CredentialId) -> Arc<str> {
        self.store.name(self.slot(credential))
    }

    pub fn expires_at(&self, credential: CredentialId) -> Option<Instant> {
        self.store.expires_at(self.slot(credential))
    }

    /// Every credential's name and token expiry (`None`: no token or none known).
    pub fn expiries(&self) -> Vec<(Arc<str>, Option<Instant>)> {
        self.slots.iter().map(|&slot| (self.store.name(slot), self.store.expires_at(slot))).collect()
    }

    /// Names of the credentials without a token valid at `now`; empty when ready.
    pub fn not_ready(&self, now: Instant) -> Vec<Arc<str>> {
        self.store.not_ready(&self.slots, now)
    }

    /// Resolves once every credential holds a valid token.
    pub async fn ready(&self) {
        self.store.ready(&self.slots).await
    }
}
