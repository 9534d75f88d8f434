//! The credentials the proxy authenticates to Tallyfy with (`[[credentials]]`),
//! as the refresher uses them: a kind, its client and secrets.

use crate::secret::Secret;

/// Index of a `[[credentials]]` table in one config, fixed when it is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialId(usize);

impl CredentialId {
    pub fn new(index: usize) -> Self {
        Self(index)
    }

    pub fn index(self) -> usize {
        self.0
    }
}

#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub kind: CredentialKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// A personal access token from Tallyfy's Settings > Integrations > REST API.
    PersonalToken { token: Secret },
    /// An application token from the `client_credentials` grant.
    ClientCredentials { client: OAuthClient, scope: Option<String> },
    /// A user token from the `password` grant, kept fresh with its refresh token.
    Password { client: OAuthClient, username: String, password: Secret, scope: Option<String> },
    /// A user token minted by an application for one of its org's users.
    ApplicationUser { application: CredentialId, org: String, email: String, provision: Option<Provision> },
}

impl CredentialKind {
    /// The `kind = "..."` value that selects this variant.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PersonalToken { .. } => "personal_token",
            Self::ClientCredentials { .. } => "client_credentials",
            Self::Password { .. } => "password",
            Self::ApplicationUser { .. } => "application_user",
        }
    }
}

/// An OAuth client of Tallyfy's (Laravel Passport) token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    pub id: String,
    pub secret: Secret,
}

/// How to create the user of an `application_user` credential when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provision {
    pub first_name: String,
    pub last_name: String,
    pub role: Option<String>,
    pub timezone: Option<String>,
}
