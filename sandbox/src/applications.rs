//! Application routes (bearer = an application token): minting a user token for
//! a user of the organization, and provisioning users.

use http::StatusCode;
use serde_json::json;

use super::auth;
use super::encoding::percent_decode;
use super::oauth;
use super::respond::{self, Reply};
use super::router::{Call, Dropped};
use super::store::User;
use super::tokens::Principal;
use super::validation::{self, Errors};

const ROLES: [&str; 3] = ["admin", "standard", "light"];

/// `POST /api/applications/{org}/users/{email}/token`: a user token, recorded as
/// grant `user_token` and subject to the token fault.
pub(super) async fn mint(call: &Call<'_>, org: &str, raw_email: &str) -> Result<Reply, Dropped> {
    let principal = auth::principal(call.shared, &call.parts.headers);
    let client_id = match &principal {
        Some(Principal::App { client_id, .. }) => Some(client_id.clone()),
        _ => None,
    };
    let result = match oauth::fault(call.shared).await {
        Some(faulted) => faulted,
        None => Ok(mint_reply(call, principal, org, raw_email).unwrap_or_else(|reply| reply)),
    };
    oauth::record(call.shared, "user_token", client_id.as_deref(), &result);
    result
}

fn mint_reply(
    call: &Call<'_>,
    principal: Option<Principal>,
    org: &str,
    raw_email: &str,
) -> Result<Reply, Reply> {
    let (token_org, client_id) = application(principal)?;
    auth::check_org(org, &token_org)?;
    let email = percent_decode(raw_email, false)
        .filter(|email| validation::is_email(email))
        .ok_or_else(|| validation::invalid("email", "The email must be a valid email address.".to_owned()))?;
    let mut state = call.shared.lock();
    let Some(user) = state.store.user(&email) else {
        return Err(respond::json(
            StatusCode::NOT_FOUND,
            &json!({"error": true, "message": "User not found", "code": "USER_NOT_FOUND"}),
        ));
    };
    let principal = Principal::User { email: user.email.clone(), org: token_org };
    let lifetime = state.user_token_lifetime;
    let issued = state.tokens.issue(principal, &client_id, lifetime, false);
    Ok(oauth::issued(&issued))
}

/// `POST /api/applications/{org}/users`: creates a user (201), 422 when invalid or taken.
pub(super) fn provision(call: &Call<'_>, org: &str) -> Reply {
    provision_user(call, org).unwrap_or_else(|reply| reply)
}

fn provision_user(call: &Call<'_>, org: &str) -> Result<Reply, Reply> {
    let (token_org, _) = application(auth::principal(call.shared, &call.parts.headers))?;
    auth::check_org(org, &token_org)?;
    let input = validation::json_object(call.body)?;
    let mut errors = Errors::default();
    let first_name = validation::required_string(&input, "first_name", &mut errors);
    let last_name = validation::required_string(&input, "last_name", &mut errors);
    let email = validation::required_string(&input, "email", &mut errors);
    validation::check_email("email", email.as_deref(), &mut errors);
    let role =
        validation::optional_string(&input, "role", &mut errors).unwrap_or_else(|| "standard".to_owned());
    if !ROLES.contains(&role.as_str()) {
        errors.add("role", "The selected role is invalid.".to_owned());
    }
    let timezone =
        validation::optional_string(&input, "timezone", &mut errors).unwrap_or_else(|| "UTC".to_owned());
    let mut state = call.shared.lock();
    if email.as_deref().is_some_and(|email| state.store.user(email).is_some()) {
        errors.add("email", "The email has already been taken.".to_owned());
    }
    errors.finish()?;
    let user = User {
        id: state.store.next_user_id(),
        email: email.unwrap_or_default(), // present: `errors` would have stopped us
        first_name: first_name.unwrap_or_default(),
        last_name: last_name.unwrap_or_default(),
        role,
        timezone,
        created_at: super::dates::now(),
    };
    let body = user.to_json();
    state.store.users.push(user);
    Ok(respond::data(StatusCode::CREATED, body))
}

/// An application principal's organization and client; anything else is 401.
fn application(principal: Option<Principal>) -> Result<(String, String), Reply> {
    match principal {
        Some(Principal::App { org, client_id }) => Ok((org, client_id)),
        _ => Err(respond::unauthenticated()),
    }
}
