//! Every way a request can fail, classified, and the one place that turns a failure
//! into a response: JSON `{"error":{"code":"...","message":"..."}}` with a fitting
//! status. Messages are written for the caller: no internals, never a secret.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Any error, for the bodies and services that box theirs.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whose fault it is: decides the log level and, later, the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The calling app sent something the proxy will not forward.
    Caller,
    /// Tallyfy (or its token endpoint) failed, was unreachable or too slow.
    Upstream,
    /// A bug or resource problem in the proxy itself.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("only /api/* is proxied to Tallyfy")]
    NotProxied,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("TRACE and TRACK are refused: an echo would hand the injected token back")]
    MethodNotAllowed,
    #[error("the request carries both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    #[error("only Transfer-Encoding: chunked is supported")]
    UnsupportedTransferEncoding,
    #[error("{0}")]
    OverrideUnreadable(&'static str),
    #[error(
        "a POST by an identity with a methods rule is read whole to judge a _method override, up to {limit} bytes (dates.max_body_bytes)"
    )]
    PolicyBodyTooLarge { limit: u64 },
    #[error("request headers exceed {limit}")]
    HeadersTooLarge { limit: &'static str, value: usize },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error(
        "the body may hold dates and exceeds the {limit} bytes the proxy rewrites (dates.max_body_bytes)"
    )]
    DatesBodyTooLarge { limit: u64 },
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {} ms", .0.as_millis())]
    BodyTimeout(Duration),
    #[error("no identity matches this caller")]
    UnknownCaller,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("over the limit {limit}; retry in {} s", whole_seconds(*.retry_after))]
    RateLimited { limit: std::sync::Arc<str>, retry_after: Duration },
    #[error("this identity has {max} requests in flight (its max_in_flight); retry shortly")]
    TooManyInFlight { max: usize },
    #[error("no valid Tallyfy token for credential {credential}")]
    TokenUnavailable { credential: String, retry_after: Duration },
    #[error(
        "the proxy holds as many bodies as its memory budget (server.max_buffered_bytes) allows; retry shortly"
    )]
    BuffersFull,
    #[error("Tallyfy could not be reached: {0}")]
    UpstreamUnreachable(String),
    #[error("Tallyfy's connection failed: {0}")]
    UpstreamBroken(String),
    #[error("Tallyfy did not answer within {} ms", .0.as_millis())]
    UpstreamTimeout(Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotProxied
            | Self::BadRequest(_)
            | Self::MethodNotAllowed
            | Self::AmbiguousLength
            | Self::UnsupportedTransferEncoding
            | Self::OverrideUnreadable(_)
            | Self::PolicyBodyTooLarge { .. }
            | Self::HeadersTooLarge { .. }
            | Self::BodyTooLarge { .. }
            | Self::DatesBodyTooLarge { .. }
            | Self::BodyRead(_)
            | Self::BodyTimeout(_)
            | Self::UnknownCaller
            | Self::Forbidden(_)
            | Self::RateLimited { .. }
            | Self::TooManyInFlight { .. }
            // As `TooManyInFlight`: the proxy is briefly unavailable to this
            // caller (an access line at info, a local rejection), no fault of its own.
            | Self::BuffersFull => ErrorClass::Caller,
            Self::TokenUnavailable { .. }
            | Self::UpstreamUnreachable(_)
            | Self::UpstreamBroken(_)
            | Self::UpstreamTimeout(_) => ErrorClass::Upstream,
            Self::Internal(_) => ErrorClass::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotProxied => StatusCode::NOT_FOUND,
            Self::BadRequest(_) | Self::BodyRead(_) | Self::AmbiguousLength | Self::OverrideUnreadable(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // As nginx answers a transfer coding it does not implement (RFC 9112 §6.1).
            Self::UnsupportedTransferEncoding => StatusCode::NOT_IMPLEMENTED,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge { .. } | Self::DatesBodyTooLarge { .. } | Self::PolicyBodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UnknownCaller => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            // Not 429: the caller is not too fast, the identity's requests are
            // slow to finish; it is the server that is briefly unavailable to it.
            Self::TokenUnavailable { .. } | Self::TooManyInFlight { .. } | Self::BuffersFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnreachable(_) | Self::UpstreamBroken(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable, machine-readable code for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotProxied => "not_proxied",
            Self::BadRequest(_) => "bad_request",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::AmbiguousLength => "ambiguous_length",
            Self::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Self::OverrideUnreadable(_) => "method_override_unreadable",
            Self::PolicyBodyTooLarge { .. } => "body_too_large_for_policy",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::DatesBodyTooLarge { .. } => "body_too_large_for_dates",
            Self::BodyRead(_) => "request_body_error",
            Self::BodyTimeout(_) => "request_body_timeout",
            Self::UnknownCaller => "unknown_caller",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::TooManyInFlight { .. } => "too_many_in_flight",
            Self::TokenUnavailable { .. } => "token_unavailable",
            Self::BuffersFull => "buffers_full",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamBroken(_) => "upstream_error",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// The sentence the caller reads. Upstream and internal details stay in the log.
    fn public_message(&self) -> String {
        match self {
            Self::UpstreamUnreachable(_) => "Tallyfy could not be reached".to_owned(),
            Self::UpstreamBroken(_) => "the connection to Tallyfy failed".to_owned(),
            Self::Internal(_) => "the proxy failed to handle this request".to_owned(),
            Self::BodyRead(_) => "the request body could not be read".to_owned(),
            Self::TokenUnavailable { .. } => {
                "no valid Tallyfy token is available for this caller yet; retry later".to_owned()
            }
            Self::HeadersTooLarge { limit, value } => format!("request headers exceed {limit} ({value})"),
            other => other.to_string(),
        }
    }

    /// The response the caller gets. The only place errors become HTTP.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.public_message() }
        });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Self::UnknownCaller => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(r#"Bearer realm="tallyfy-proxy""#));
            }
            Self::TokenUnavailable { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds(*retry_after)));
            }
            Self::TooManyInFlight { .. } | Self::BuffersFull => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::MethodNotAllowed => {
                headers
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
            }
            // The connection's framing cannot be trusted past this request.
            Self::AmbiguousLength | Self::UnsupportedTransferEncoding => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// A wait as `Retry-After` gives it: whole seconds, rounded up, at least 1.
pub fn whole_seconds(wait: Duration) -> u64 {
    wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(error: ProxyError) -> (StatusCode, serde_json::Value) {
        let response = error.to_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("Full never fails").to_bytes();
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    #[tokio::test]
    async fn upstream_details_stay_out_of_the_body() {
        let (status, body) =
            body_of(ProxyError::UpstreamUnreachable("tcp connect to 10.0.0.7:443 refused".into())).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body["error"]["code"], "upstream_unreachable");
        assert!(!body.to_string().contains("10.0.0.7"));
    }

    #[tokio::test]
    async fn token_unavailable_says_when_to_retry() {
        let error =
            ProxyError::TokenUnavailable { credential: "ops".into(), retry_after: Duration::from_secs(5) };
        let response = error.to_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "5");
    }

    #[test]
    fn every_caller_error_is_4xx_and_every_upstream_error_5xx() {
        let errors = [
            ProxyError::NotProxied,
            ProxyError::BadRequest("x"),
            ProxyError::MethodNotAllowed,
            ProxyError::AmbiguousLength,
            ProxyError::OverrideUnreadable("x"),
            ProxyError::PolicyBodyTooLarge { limit: 1 },
            ProxyError::HeadersTooLarge { limit: "max_headers", value: 1 },
            ProxyError::BodyTooLarge { limit: 1 },
            ProxyError::DatesBodyTooLarge { limit: 1 },
            ProxyError::BodyRead("x".into()),
            ProxyError::BodyTimeout(Duration::from_secs(1)),
            ProxyError::UnknownCaller,
            ProxyError::Forbidden("x"),
            ProxyError::TokenUnavailable { credential: "c".into(), retry_after: Duration::from_secs(1) },
            ProxyError::UpstreamUnreachable("x".into()),
            ProxyError::UpstreamBroken("x".into()),
            ProxyError::UpstreamTimeout(Duration::from_secs(1)),
            ProxyError::Internal("x".into()),
        ];
        for error in errors {
            let expected_client = error.class() == ErrorClass::Caller;
            assert_eq!(error.status().is_client_error(), expected_client, "{error:?}");
            assert_eq!(error.status().is_server_error(), !expected_client, "{error:?}");
        }
        // The one caller error answered 5xx, as nginx does: a transfer coding the
        // proxy does not implement.
        let unsupported = ProxyError::UnsupportedTransferEncoding;
        assert_eq!(
            (unsupported.class(), unsupported.status()),
            (ErrorClass::Caller, StatusCode::NOT_IMPLEMENTED)
        );
    }
}
