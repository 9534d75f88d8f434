//! The request and reload side of the refresher: reports of rejected tokens,
//! and new configs' credentials.

use tokio::sync::{mpsc, oneshot};

use super::super::{Credential, CredentialKind, CredentialTokens, Settings, SlotId, TokenSource, TokenStore};
use crate::upstream;
use std::sync::Arc;

/// "Tallyfy rejected generation `generation` of this slot's token."
#[derive(Debug, Clone, Copy)]
pub(super) struct Rejected {
    pub(super) slot: SlotId,
    pub(super) generation: u64,
}

/// What the refresher needs of a config: its credentials, how to keep them
/// fresh, and which upstream they belong to (tokens never cross to another).
#[derive(Debug, Clone)]
pub struct CredentialSet {
    pub credentials: Vec<Credential>,
    pub settings: Settings,
    /// The token endpoint and API base.
    pub(super) upstream: String,
}

impl CredentialSet {
    pub fn new(credentials: Vec<Credential>, settings: Settings, upstream: &upstream::Settings) -> Self {
        let upstream = format!(
            "{} {}://{}{}",
            upstream.token_url, upstream.scheme, upstream.authority, upstream.path_prefix
        );
        CredentialSet { credentials, settings, upstream }
    }

    /// Whom each credential's tokens act as, secrets aside (its name in the
    /// fleet), in order: a credential that keeps its principal across a
    /// reload is the same to Tallyfy.
    pub fn principals(&self) -> Vec<String> {
        self.credentials
            .iter()
            .map(|credential| {
                let application = match &credential.kind {
                    CredentialKind::ApplicationUser { application, .. } => {
                        self.credentials.get(application.index())
                    }
                    _ => None,
                };
                super::shared::fleet_name(credential, application, &self.upstream)
            })
            .collect()
    }
}

/// A new config's credentials, and where to send their slots.
pub(super) struct Reconfigure {
    pub(super) set: CredentialSet,
    pub(super) issuer: Arc<dyn TokenSource>,
    pub(super) reply: oneshot::Sender<Result<CredentialTokens, String>>,
}

/// The request and reload side of the refresher. Cheap to clone.
#[derive(Clone)]
pub struct RefreshHandle {
    pub(super) rejected: mpsc::UnboundedSender<Rejected>,
    pub(super) reconfigure: mpsc::Sender<Reconfigure>,
    pub(super) store: Arc<TokenStore>,
}

impl RefreshHandle {
    /// Reports a rejected token. Never blocks, and never drops a report. When
    /// the refresher is gone (shutdown), waiters are released at once.
    pub fn token_rejected(&self, slot: SlotId, generation: u64) {
        if self.rejected.send(Rejected { slot, generation }).is_err() {
            self.store.settle(slot);
        }
    }

    /// Maps a new config's credentials onto slots (see the module docs). An
    /// `Err` leaves everything as it was.
    pub async fn reconfigure(
        &self,
        set: CredentialSet,
        issuer: impl TokenSource,
    ) -> Result<CredentialTokens, String> {
        let (reply, answer) = oneshot::channel();
        let request = Reconfigure { set, issuer: Arc::new(issuer), reply };
        self.reconfigure.send(request).await.map_err(|_| "the refresher has stopped".to_owned())?;
        answer.await.map_err(|_| "the refresher has stopped".to_owned())?
    }
}
