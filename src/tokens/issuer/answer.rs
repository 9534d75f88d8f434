//! What the token endpoint answered, classified: a token with its lifetime, or
//! why not. Pure functions over status and body, so every shape seen in the wild
//! is a unit test.

use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;

use crate::secret::Secret;
use crate::tokens::{jwt, schedule};

/// A freshly issued token.
#[derive(Debug)]
pub struct Issued {
    pub access_token: Secret,
    /// Password and refresh grants only; Tallyfy may rotate it on every refresh.
    pub refresh_token: Option<Secret>,
    pub lifetime: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// A 4xx with an OAuth error code (`invalid_grant`, `invalid_client`, ...) or
    /// `http_<status>` when the body named none.
    #[error("refused with {status}: {code}")]
    Refused { status: u16, code: String },
    /// A 5xx (maintenance pages included).
    #[error("server error {status}")]
    ServerError { status: u16 },
    /// A 2xx whose body is not a usable token.
    #[error("malformed token response: {0}")]
    Malformed(&'static str),
    /// No answer: connection refused, reset, TLS failure.
    #[error("transport failure: {0}")]
    Transport(String),
    #[error("timed out")]
    Timeout,
    /// `application_user`: the application credential has no valid token.
    #[error("the application credential has no valid token")]
    NoApplicationToken,
    /// Fleet mode: a look for a token newer than the rejected one found none.
    /// Not a failure: nothing was asked of Tallyfy.
    #[error("the fleet holds no newer token")]
    NothingNewer,
}

impl FetchError {
    /// The refresh token (or password) was refused: try the next grant.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, Self::Refused { code, .. } if code == "invalid_grant")
    }

    /// A bounded label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused { code, .. } if code == "invalid_grant" => "invalid_grant",
            Self::Refused { code, .. } if code == "invalid_client" => "invalid_client",
            Self::Refused { status: 404, .. } => "not_found",
            Self::Refused { .. } => "refused",
            Self::ServerError { .. } => "server_error",
            Self::Malformed(_) => "malformed",
            Self::Transport(_) => "transport",
            Self::Timeout => "timeout",
            Self::NoApplicationToken => "no_application_token",
            Self::NothingNewer => "nothing_newer",
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

/// Tokens that live shorter than this are treated as malformed.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// A longer access token is refused: it would ride on every request (Tallyfy's
/// JWTs are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A successful token response -> [`Issued`]. Pure; `now_unix` for the JWT `exp`.
pub fn parse_token(body: &[u8], default_lifetime: Duration, now_unix: u64) -> Result<Issued, FetchError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(FetchError::Malformed("empty body"));
    }
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|_| FetchError::Malformed("not a JSON token object"))?;
    let access_token =
        parsed.access_token.filter(|t| !t.is_empty()).ok_or(FetchError::Malformed("no access_token"))?;
    if access_token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(FetchError::Malformed("access_token is not a header-safe string"));
    }
    if access_token.len() > MAX_TOKEN_BYTES {
        return Err(FetchError::Malformed("access_token is longer than 16 KiB"));
    }
    // A number, or a number in a string (`"3600"`, `"-5"`, `"0.5"`: read alike);
    // a negative or fractional one is a lifetime that ends at once.
    let seconds = |f: f64| f.max(0.0) as u64;
    let expires_in = match parsed.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(seconds)),
        Some(serde_json::Value::String(s)) => {
            let s = s.trim();
            s.parse().ok().or_else(|| s.parse::<f64>().ok().filter(|f| f.is_finite()).map(seconds))
        }
        _ => None,
    };
    let lifetime = schedule::lifetime(expires_in, jwt::expiry(&access_token), now_unix, default_lifetime);
    if lifetime < MIN_LIFETIME {
        // Already expired (or nearly): treat as a failure so the backoff applies,
        // instead of refreshing in a tight loop.
        return Err(FetchError::Malformed("the token expires at once"));
    }
    Ok(Issued {
        access_token: Secret::new(access_token),
        refresh_token: parsed.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
        lifetime,
    })
}

/// The error codes a refusal is logged with: OAuth's (RFC 6749 §4.1.2.1 and
/// §5.2, RFC 6750 §3.1) and Tallyfy's own. Any other is logged as the status
/// alone: a code is the body's word, and an endpoint (or something in front of
/// it) that echoes what it got would put a client secret, a password or a
/// refresh token there, shaped just like a code.
const KNOWN_CODES: [&str; 15] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "access_denied",
    "unsupported_response_type",
    "server_error",
    "temporarily_unavailable",
    "invalid_token",
    "insufficient_scope",
    "ENDPOINT_NOT_FOUND",
    "SEAT_POOL_EXHAUSTED",
    "RATE_LIMIT_EXCEEDED",
];

/// A non-2xx answer -> the error, keeping only the known error code of its
/// body ([`KNOWN_CODES`]).
pub fn refusal(status: StatusCode, body: &[u8]) -> FetchError {
    if status.is_server_error() {
        return FetchError::ServerError { status: status.as_u16() };
    }
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| {
            let code = match &json["error"] {
                serde_json::Value::String(code) => Some(code.as_str()),
                serde_json::Value::Object(inner) => inner.get("code").and_then(|c| c.as_str()),
                _ => None,
            }?;
            KNOWN_CODES.iter().find(|known| **known == code).map(|known| (*known).to_owned())
        })
        .unwrap_or_else(|| format!("http_{}", status.as_u16()));
    FetchError::Refused { status: status.as_u16(), code }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_token_response_gives_token_refresh_token_and_lifetime() {
        let issued = parse_token(
            br#"{"token_type":"Bearer","expires_in":1800,"access_token":"abc","refresh_token":"r1"}"#,
            HOUR,
            0,
        )
        .expect("valid");
        assert_eq!(issued.access_token.expose(), "abc");
        assert_eq!(issued.refresh_token.expect("present").expose(), "r1");
        assert_eq!(issued.lifetime, Duration::from_secs(1800));
        let string_expiry =
            parse_token(br#"{"access_token":"abc","expires_in":"60"}"#, HOUR, 0).expect("valid");
        assert_eq!(string_expiry.lifetime, Duration::from_secs(60));
        assert_eq!(parse_token(br#"{"access_token":"abc"}"#, HOUR, 0).expect("valid").lifetime, HOUR);
    }

    #[test]
    fn tokens_that_expire_at_once_are_failures_so_the_backoff_applies() {
        assert!(matches!(
            parse_token(br#"{"access_token":"abc","expires_in":0}"#, HOUR, 0),
            Err(FetchError::Malformed(_))
        ));
        for expires_in in ["-5", "0.5", r#""-5""#, r#""0.5""#, r#"" -1e3 ""#] {
            let body = format!(r#"{{"access_token":"abc","expires_in":{expires_in}}}"#);
            assert!(
                matches!(parse_token(body.as_bytes(), HOUR, 0), Err(FetchError::Malformed(_))),
                "{expires_in}: expires at once, as a number or in a string"
            );
        }
        let unreadable = |expires_in: &str| {
            let body = format!(r#"{{"access_token":"abc","expires_in":"{expires_in}"}}"#);
            parse_token(body.as_bytes(), HOUR, 0).map(|issued| issued.lifetime)
        };
        assert_eq!(unreadable("NaN").ok(), Some(HOUR), "no number: the default lifetime");
        assert_eq!(unreadable("inf").ok(), Some(HOUR));
        assert_eq!(unreadable("1800.9").ok(), Some(Duration::from_secs(1800)));
        let expired_jwt = format!(
            "eyJhbGciOiJub25lIn0.{}.c2ln",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, r#"{"exp":100}"#)
        );
        let body = format!(r#"{{"access_token":"{expired_jwt}"}}"#);
        assert!(matches!(parse_token(body.as_bytes(), HOUR, 1_000), Err(FetchError::Malformed(_))));
    }

    #[test]
    fn malformed_successes_are_errors() {
        for body in [
            &b""[..],
            b"  \n",
            b"<html>maintenance</html>",
            b"{}",
            br#"{"access_token":""}"#,
            br#"{"access_token":"a b"}"#,
            b"[1]",
        ] {
            assert!(
                matches!(parse_token(body, HOUR, 0), Err(FetchError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn refusals_keep_only_the_oauth_code() {
        let invalid = refusal(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"The refresh token is invalid.","message":"x"}"#,
        );
        assert!(invalid.is_invalid_grant());
        assert_eq!(
            refusal(StatusCode::UNAUTHORIZED, br#"{"error":"invalid_client"}"#).reason(),
            "invalid_client"
        );
        assert_eq!(
            refusal(StatusCode::BAD_REQUEST, br#"{"error":true,"message":"bad"}"#),
            FetchError::Refused { status: 400, code: "http_400".into() }
        );
        assert_eq!(
            refusal(StatusCode::CONFLICT, br#"{"error":{"code":"SEAT_POOL_EXHAUSTED","message":"m"}}"#),
            FetchError::Refused { status: 409, code: "SEAT_POOL_EXHAUSTED".into() }
        );
        assert_eq!(refusal(StatusCode::NOT_FOUND, b"").reason(), "not_found");
        assert_eq!(refusal(StatusCode::SERVICE_UNAVAILABLE, b"<html>").reason(), "server_error");
        let sneaky = refusal(StatusCode::BAD_REQUEST, br#"{"error":"secret value with spaces"}"#);
        assert_eq!(
            sneaky,
            FetchError::Refused { status: 400, code: "http_400".into() },
            "free text never passes"
        );
        // An endpoint that echoes a secret it got, shaped like a code.
        for echoed in [
            &br#"{"error":"CCSECRETxyz222aBcD0123456789aBcD0123456789"}"#[..],
            br#"{"error":{"code":"correcthorsebatterystaple"}}"#,
        ] {
            assert_eq!(
                refusal(StatusCode::BAD_REQUEST, echoed),
                FetchError::Refused { status: 400, code: "http_400".into() },
                "only known codes are kept"
            );
        }
    }
}
