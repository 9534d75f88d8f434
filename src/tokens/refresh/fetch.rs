//! One fetch for one slot: the grant its kind calls for.

use tokio::time::Instant;

use super::super::TokenSource;
use super::super::issuer::{FetchError, Issued};
use super::super::{CredentialKind, SlotId, TokenStore};
use super::shared::Obtained;
use crate::secret::Secret;

pub(super) struct Outcome {
    pub(super) slot: SlotId,
    /// The token, when its life began (lifetimes count from the request, not
    /// from the answer), and where it came from.
    pub(super) result: Result<Obtained, FetchError>,
    /// A mint's: the generation of the application token it was made with.
    pub(super) application_generation: Option<u64>,
}

/// One fetch for one slot: the grant its kind calls for.
pub(super) async fn fetch(
    issuer: &dyn TokenSource,
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
