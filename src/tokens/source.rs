//! [`TokenSource`]: the calls that yield tokens, as the refresher sees them.
//!
//! [`Issuer`] makes them over HTTP against Tallyfy. The refresher holds any
//! source, so its tests answer in-process and run on a paused clock: a token's
//! hour of life, its refresh at 80 % and a backoff after failures take no real
//! time.

use std::future::Future;
use std::pin::Pin;

use http::HeaderValue;

use super::issuer::{FetchError, Issued, Issuer};
use super::{OAuthClient, Provision};
use crate::secret::Secret;

/// A call's answer, boxed so sources can be held as `dyn TokenSource`.
pub type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<T, FetchError>> + Send + 'a>>;

/// Where the refresher gets tokens: the grants of the token endpoint and the
/// application routes that mint and provision users.
pub trait TokenSource: Send + Sync + 'static {
    fn client_credentials<'a>(
        &'a self,
        client: &'a OAuthClient,
        scope: Option<&'a str>,
    ) -> Answer<'a, Issued>;

    fn password<'a>(
        &'a self,
        client: &'a OAuthClient,
        username: &'a str,
        password: &'a Secret,
        scope: Option<&'a str>,
    ) -> Answer<'a, Issued>;

    fn refresh<'a>(&'a self, client: &'a OAuthClient, refresh_token: &'a Secret) -> Answer<'a, Issued>;

    /// A user token, minted with the application's token.
    fn mint_user_token<'a>(
        &'a self,
        application_token: &'a HeaderValue,
        org: &'a str,
        email: &'a str,
    ) -> Answer<'a, Issued>;

    /// Creates the user a mint could not find.
    fn provision_user<'a>(
        &'a self,
        application_token: &'a HeaderValue,
        org: &'a str,
        email: &'a str,
        provision: &'a Provision,
    ) -> Answer<'a, ()>;
}

impl TokenSource for Issuer {
    fn client_credentials<'a>(
        &'a self,
        client: &'a OAuthClient,
        scope: Option<&'a str>,
    ) -> Answer<'a, Issued> {
        Box::pin(Issuer::client_credentials(self, client, scope))
    }

    fn password<'a>(
        &'a self,
        client: &'a OAuthClient,
        username: &'a str,
        password: &'a Secret,
        scope: Option<&'a str>,
    ) -> Answer<'a, Issued> {
        Box::pin(Issuer::password(self, client, username, password, scope))
    }

    fn refresh<'a>(&'a self, client: &'a OAuthClient, refresh_token: &'a Secret) -> Answer<'a, Issued> {
        Box::pin(Issuer::refresh(self, client, refresh_token))
    }

    fn mint_user_token<'a>(
        &'a self,
        application_token: &'a HeaderValue,
        org: &'a str,
        email: &'a str,
    ) -> Answer<'a, Issued> {
        Box::pin(Issuer::mint_user_token(self, application_token, org, email))
    }

    fn provision_user<'a>(
        &'a self,
        application_token: &'a HeaderValue,
        org: &'a str,
        email: &'a str,
        provision: &'a Provision,
    ) -> Answer<'a, ()> {
        Box::pin(Issuer::provision_user(self, application_token, org, email, provision))
    }
}
