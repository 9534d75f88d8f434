//! Response bodies and the fixed answers Tallyfy gives.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

pub(super) type Body = BoxBody<Bytes, Infallible>;
pub(super) type Reply = Response<Body>;
/// A handler's answer; `Err` short-circuits with an error reply via `?`.
pub(super) type Outcome = Result<Reply, Reply>;

pub(super) const UNAUTHENTICATED: &str = r#"{"message":"Unauthenticated."}"#;
pub(super) const ENDPOINT_NOT_FOUND: &str =
    r#"{"error":true,"message":"API endpoint not found","code":"ENDPOINT_NOT_FOUND"}"#;
const UNAUTHORIZED: &str = r#"{"message":"This action is unauthorized."}"#;

pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A reply with `body` and `content_type` (none when empty).
pub(super) fn raw(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    if !content_type.is_empty() {
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    response
}

pub(super) fn json(status: StatusCode, value: &Value) -> Reply {
    raw(status, "application/json", value.to_string())
}

/// JSON as Laravel writes it by default (PHP's `json_encode` escapes `/` as
/// `\/`), so list responses carry links like `https:\/\/go.tallyfy.com\/api\/...`.
pub(super) fn php_json(status: StatusCode, value: &Value) -> Reply {
    // In JSON text a '/' can only stand inside a string, where `\/` means the same.
    raw(status, "application/json", value.to_string().replace('/', "\\/"))
}

/// `{"data": value}`.
pub(super) fn data(status: StatusCode, value: Value) -> Reply {
    json(status, &serde_json::json!({ "data": value }))
}

/// 401 `{"message":"Unauthenticated."}`, byte for byte.
/// The answer of a [`crate::ApiFault`].
pub(super) fn api_fault(fault: &crate::ApiFault) -> Reply {
    use crate::ApiFault;
    let (status, body, retry_after) = match fault {
        ApiFault::Throttled { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({ "message": "Too Many Attempts." }),
            *retry_after,
        ),
        ApiFault::HourlyCap { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({
                "error": true,
                "message": "You have reached the hourly limit for this action.",
                "code": "RATE_LIMIT_EXCEEDED"
            }),
            Some(*retry_after),
        ),
        ApiFault::Status(code) => (
            StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            serde_json::json!({ "message": "Service Unavailable" }),
            None,
        ),
    };
    let mut reply = self::json(status, &body);
    if let Some(seconds) = retry_after {
        reply.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
    }
    reply
}

pub(super) fn unauthenticated() -> Reply {
    raw(StatusCode::UNAUTHORIZED, "application/json", UNAUTHENTICATED)
}

/// 404 for anything under `/api` that is no route (or lacks `X-Tallyfy-Client`).
pub(super) fn endpoint_not_found() -> Reply {
    raw(StatusCode::NOT_FOUND, "application/json", ENDPOINT_NOT_FOUND)
}

/// 403 for a token used on an organization it does not belong to.
pub(super) fn unauthorized_action() -> Reply {
    raw(StatusCode::FORBIDDEN, "application/json", UNAUTHORIZED)
}

/// 404 `{"error":true,"message":"<what> not found"}` for a missing record.
pub(super) fn not_found(what: &str) -> Reply {
    json(StatusCode::NOT_FOUND, &serde_json::json!({"error": true, "message": format!("{what} not found")}))
}

/// 400 `{"error":true,"message":...}`: a body that is not a JSON object, or that broke off.
pub(super) fn bad_request(message: &str) -> Reply {
    json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": true, "message": message}))
}

/// 413 for a JSON body larger than the sandbox keeps.
pub(super) fn too_large() -> Reply {
    json(StatusCode::PAYLOAD_TOO_LARGE, &serde_json::json!({"error": true, "message": "Payload too large"}))
}

/// Outside `/api`: a plain 404, as a web server in front of Tallyfy would answer.
pub(super) fn plain_not_found() -> Reply {
    raw(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "Not Found")
}

/// The reply with its body gzip-encoded (as Tallyfy's servers do when asked).
pub(super) async fn gzipped(reply: Reply) -> Reply {
    use std::io::Write;
    let (mut parts, body) = reply.into_parts();
    let Ok(collected) = body.collect().await;
    let plain = collected.to_bytes();
    if plain.is_empty() {
        return Response::from_parts(parts, full(plain));
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let encoded = encoder.write_all(&plain).and_then(|()| encoder.finish());
    match encoded {
        Ok(gzip) => {
            parts.headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Response::from_parts(parts, full(gzip))
        }
        Err(_) => Response::from_parts(parts, full(plain)),
    }
}
