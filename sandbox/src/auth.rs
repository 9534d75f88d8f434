//! Who is calling: the `X-Tallyfy-Client` gate, bearer parsing, and the
//! organization check that every org-scoped route shares.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use super::fixtures::{ORG_ID, OTHER_ORG_ID};
use super::respond::{self, Reply};
use super::state::Shared;
use super::tokens::Principal;

/// The user a resource request acts as.
pub(super) struct Caller {
    pub user_id: u64,
    pub email: String,
}

/// Tallyfy rejects API calls without a non-empty `X-Tallyfy-Client`.
pub(super) fn has_client_header(headers: &HeaderMap) -> bool {
    headers.get("x-tallyfy-client").is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
}

/// The token of exactly one `Authorization: Bearer <token>` header (one space,
/// case-sensitive scheme, no spaces in the token).
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let token = value.to_str().ok()?.strip_prefix("Bearer ")?;
    (!token.is_empty() && !token.contains(' ')).then_some(token)
}

/// The principal behind the request's bearer token, if it is live.
pub(super) fn principal(shared: &Shared, headers: &HeaderMap) -> Option<Principal> {
    let token = bearer(headers)?;
    shared.lock().tokens.authenticate(token)
}

/// A user principal resolved to its user; anything else is 401.
pub(super) fn caller(shared: &Shared, headers: &HeaderMap) -> Result<(Caller, String), Reply> {
    let Some(Principal::User { email, org }) = principal(shared, headers) else {
        return Err(respond::unauthenticated());
    };
    let user_id = shared.lock().store.user(&email).map(|u| u.id).ok_or_else(respond::unauthenticated)?;
    Ok((Caller { user_id, email }, org))
}

/// `path_org` must be the token's organization: another known organization is
/// 403, an unknown one 404.
pub(super) fn check_org(path_org: &str, token_org: &str) -> Result<(), Reply> {
    if path_org == token_org {
        Ok(())
    } else if path_org == ORG_ID || path_org == OTHER_ORG_ID {
        Err(respond::unauthorized_action())
    } else {
        Err(respond::not_found("Organization"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_must_be_exact() {
        let with = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(AUTHORIZATION, HeaderValue::from_static(v));
            }
            bearer(&headers).map(str::to_owned)
        };
        assert_eq!(with(&["Bearer abc"]).as_deref(), Some("abc"));
        for bad in [
            &["bearer abc"][..],
            &["Bearer  abc"],
            &["Bearer "],
            &["Basic abc"],
            &["Bearer a", "Bearer a"],
            &[],
        ] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn orgs() {
        assert!(check_org(ORG_ID, ORG_ID).is_ok());
        assert_eq!(check_org(OTHER_ORG_ID, ORG_ID).map_err(|r| r.status()), Err(http::StatusCode::FORBIDDEN));
        assert_eq!(check_org("nope", ORG_ID).map_err(|r| r.status()), Err(http::StatusCode::NOT_FOUND));
    }
}
