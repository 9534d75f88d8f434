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

impl Credential {
    /// Lets go of the secrets it holds (a personal token, a client secret, a
    /// password): what a forgotten slot keeps is its name and settings only.
    pub fn forget_secrets(&mut self) {
        match &mut self.kind {
            CredentialKind::PersonalToken { token } => *token = Secret::new(""),
            CredentialKind::ClientCredentials { client, .. } => client.secret = Secret::new(""),
            CredentialKind::Password { client, password, .. } => {
                client.secret = Secret::new("");
                *password = Secret::new("");
            }
            CredentialKind::ApplicationUser { .. } => {}
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_credential_holds_no_secret() {
        let client = OAuthClient { id: "9".to_owned(), secret: Secret::new("client-s3cret") };
        let mut credential = Credential {
            name: "user".to_owned(),
            kind: CredentialKind::Password {
                client,
                username: "a@b.c".to_owned(),
                password: Secret::new("pass-s3cret"),
                scope: None,
            },
        };
        credential.forget_secrets();
        let CredentialKind::Password { client, password, username, .. } = &credential.kind else {
            panic!("still a password credential");
        };
        assert_eq!((client.secret.expose(), password.expose(), username.as_str()), ("", "", "a@b.c"));
        let mut personal = Credential {
            name: "ops".to_owned(),
            kind: CredentialKind::PersonalToken { token: Secret::new("tok") },
        };
        personal.forget_secrets();
        assert!(
            matches!(&personal.kind, CredentialKind::PersonalToken { token } if token.expose().is_empty())
        );
    }
}
