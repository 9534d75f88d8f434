//! The token endpoint (`POST /api/oauth/token`, also `/oauth/token`) with Laravel
//! Passport semantics, and the simulated faults it shares with the user-token mint.

use http::StatusCode;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, PRAGMA};
use serde_json::{Value, json};

use super::TokenFault;
use super::encoding::{form_value, parse_form};
use super::fixtures::{
    APP_CLIENT_ID, APP_CLIENT_SECRET, ORG_ID, PASSWORD, USER_CLIENT_ID, USER_CLIENT_SECRET, USERNAME,
};
use super::respond::{self, Reply};
use super::router::{Call, Dropped};
use super::state::Shared;
use super::tokens::{Issued, Principal};

const MALFORMED: &str = "The request is missing a required parameter, includes an invalid parameter value, \
                         includes a parameter more than once, or is otherwise malformed.";

/// Answers a token request and records it in `token_requests`.
pub(super) async fn token(call: &Call<'_>) -> Result<Reply, Dropped> {
    let form = is_form(call).then(|| parse_form(&call.body.prefix)).flatten();
    let field = |name| form.as_deref().and_then(|pairs| form_value(pairs, name)).map(str::to_owned);
    let grant = field("grant_type").unwrap_or_default();
    let client_id = field("client_id");
    let result = match fault(call.shared).await {
        Some(faulted) => faulted,
        None => Ok(match form.as_deref() {
            Some(pairs) => grant_reply(call.shared, pairs),
            None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", MALFORMED, None),
        }),
    };
    record(call.shared, &grant, client_id.as_deref(), &result);
    result
}

/// Logs a token call with the status it got (0: dropped).
pub(super) fn record(shared: &Shared, grant: &str, client_id: Option<&str>, result: &Result<Reply, Dropped>) {
    let answered = result.as_ref().map_or(0, |reply| reply.status().as_u16());
    shared.lock().log.record_token_request(grant, client_id, answered);
    tracing::debug!(grant, answered, "sandbox: token request");
}

/// The configured fault's answer; `None` to answer normally (after a `Slow` delay).
pub(super) async fn fault(shared: &Shared) -> Option<Result<Reply, Dropped>> {
    let fault = shared.lock().fault.clone()?;
    let reply = match fault {
        TokenFault::Slow(delay) => {
            tokio::time::sleep(delay).await;
            return None;
        }
        TokenFault::Drop => return Some(Err(Dropped)),
        TokenFault::ServerError => respond::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "server_error", "message": "Internal server error"}),
        ),
        TokenFault::Maintenance => respond::raw(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/html; charset=UTF-8",
            "<!DOCTYPE html><html><head><title>Down for maintenance</title></head>\
             <body><h1>Tallyfy is down for maintenance. Be right back.</h1></body></html>",
        ),
        TokenFault::Empty => respond::raw(StatusCode::OK, "application/json", ""),
        TokenFault::Garbage => respond::raw(StatusCode::OK, "text/plain", "ok <not json> {{"),
        TokenFault::MissingToken => {
            respond::json(StatusCode::OK, &json!({"token_type": "Bearer", "expires_in": 3600}))
        }
        TokenFault::Oversized => respond::json(
            StatusCode::OK,
            &json!({"token_type": "Bearer", "expires_in": 3600, "access_token": "oversized",
                    "padding": "x".repeat(1024 * 1024)}),
        ),
    };
    Some(Ok(reply))
}

fn is_form(call: &Call<'_>) -> bool {
    call.body.complete()
        && call.parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
        })
}

/// The clients the sandbox knows and the grant each may use.
fn client_for(pairs: &[(String, String)], allowed: &[&str]) -> Result<String, Reply> {
    let Some(id) = form_value(pairs, "client_id") else {
        return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", MALFORMED, Some("client_id")));
    };
    let secret = match id {
        APP_CLIENT_ID => APP_CLIENT_SECRET,
        USER_CLIENT_ID => USER_CLIENT_SECRET,
        _ => "",
    };
    if secret.is_empty() || form_value(pairs, "client_secret") != Some(secret) || !allowed.contains(&id) {
        return Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed",
            None,
        ));
    }
    Ok(id.to_owned())
}

fn grant_reply(shared: &Shared, pairs: &[(String, String)]) -> Reply {
    let result = match form_value(pairs, "grant_type").unwrap_or_default() {
        "client_credentials" => client_credentials(shared, pairs),
        "password" => password(shared, pairs),
        "refresh_token" => refresh(shared, pairs),
        _ => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server.",
            Some("grant_type"),
        )),
    };
    result.unwrap_or_else(|reply| reply)
}

fn client_credentials(shared: &Shared, pairs: &[(String, String)]) -> Result<Reply, Reply> {
    let client_id = client_for(pairs, &[APP_CLIENT_ID])?;
    let mut state = shared.lock();
    let lifetime = state.token_lifetime;
    let principal = Principal::App { org: ORG_ID.to_owned(), client_id: client_id.clone() };
    Ok(issued(&state.tokens.issue(principal, &client_id, lifetime, false)))
}

fn password(shared: &Shared, pairs: &[(String, String)]) -> Result<Reply, Reply> {
    let client_id = client_for(pairs, &[USER_CLIENT_ID])?;
    let (Some(username), Some(password)) = (form_value(pairs, "username"), form_value(pairs, "password"))
    else {
        return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", MALFORMED, Some("username")));
    };
    if !username.eq_ignore_ascii_case(USERNAME) || password != PASSWORD {
        return Err(invalid_grant("The user credentials were incorrect."));
    }
    let mut state = shared.lock();
    let lifetime = state.token_lifetime;
    Ok(issued(&state.tokens.issue(Principal::user(USERNAME), &client_id, lifetime, true)))
}

/// Rotating refresh: the presented refresh token and its access token die.
fn refresh(shared: &Shared, pairs: &[(String, String)]) -> Result<Reply, Reply> {
    let client_id = client_for(pairs, &[APP_CLIENT_ID, USER_CLIENT_ID])?;
    let Some(refresh_token) = form_value(pairs, "refresh_token") else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            MALFORMED,
            Some("refresh_token"),
        ));
    };
    let mut state = shared.lock();
    let principal = state.tokens.redeem(refresh_token, &client_id).map_err(|error| {
        tracing::debug!(?error, "sandbox: refresh token refused");
        invalid_grant("The refresh token is invalid.")
    })?;
    let lifetime = state.token_lifetime;
    Ok(issued(&state.tokens.issue(principal, &client_id, lifetime, true)))
}

/// 200 with Passport's token response.
pub(super) fn issued(issued: &Issued) -> Reply {
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "access_token": issued.access_token,
    });
    if let Some(refresh_token) = &issued.refresh_token {
        body["refresh_token"] = Value::String(refresh_token.clone());
    }
    let mut reply = respond::json(StatusCode::OK, &body);
    reply.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply.headers_mut().insert(PRAGMA, HeaderValue::from_static("no-cache"));
    reply
}

fn invalid_grant(description: &str) -> Reply {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description, None)
}

/// league/oauth2-server's error shape, as Passport sends it.
fn oauth_error(status: StatusCode, error: &str, description: &str, parameter: Option<&str>) -> Reply {
    let mut body = json!({"error": error, "error_description": description, "message": description});
    if let Some(parameter) = parameter {
        body["hint"] = Value::String(format!("Check the `{parameter}` parameter"));
    }
    respond::json(status, &body)
}
