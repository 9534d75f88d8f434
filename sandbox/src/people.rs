//! The caller (`/me`, `/me/organizations`) and guests.

use http::StatusCode;
use serde_json::json;

use super::auth::Caller;
use super::dates;
use super::encoding::random_hex;
use super::fixtures::ORG_ID;
use super::respond::{self, Outcome, Reply};
use super::router::Call;
use super::store::Guest;
use super::validation::{self, Errors};

/// `GET /api/me`: the caller's user record.
pub(super) fn me(call: &Call<'_>, caller: &Caller) -> Outcome {
    let state = call.shared.lock();
    let user = state.store.user(&caller.email).ok_or_else(respond::unauthenticated)?;
    Ok(respond::data(StatusCode::OK, user.to_json()))
}

/// `GET /api/me/organizations`: the token's organization.
pub(super) fn my_organizations(token_org: &str) -> Reply {
    let name = if token_org == ORG_ID { "Sandbox Organization" } else { "Organization" };
    respond::json(
        StatusCode::OK,
        &json!({"data": [{"id": token_org, "name": name, "slug": "sandbox-organization", "timezone": "UTC"}]}),
    )
}

/// `POST /api/organizations/{org}/guests`: email required, `external_date_creation`
/// a request-format date.
pub(super) fn create_guest(call: &Call<'_>) -> Outcome {
    let input = validation::json_object(call.body)?;
    let mut errors = Errors::default();
    let email = validation::required_string(&input, "email", &mut errors);
    validation::check_email("email", email.as_deref(), &mut errors);
    let first_name = validation::optional_string(&input, "first_name", &mut errors);
    let last_name = validation::optional_string(&input, "last_name", &mut errors);
    let external_date_creation =
        dates::optional(call.date_format(), &input, "external_date_creation", &mut errors);
    let mut state = call.shared.lock();
    if let Some(email) = &email
        && state.store.guests.iter().any(|g| g.email.eq_ignore_ascii_case(email))
    {
        errors.add("email", "The email has already been taken.".to_owned());
    }
    errors.finish()?;
    let guest = Guest {
        id: random_hex(32),
        email: email.unwrap_or_default(),
        first_name,
        last_name,
        external_date_creation,
        created_at: dates::now(),
    };
    let body = guest.to_json();
    state.store.guests.push(guest);
    Ok(respond::data(StatusCode::CREATED, body))
}
