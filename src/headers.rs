//! Header hygiene, both directions. Pure functions over `HeaderMap`s.
//!
//! Upstream requests lose hop-by-hop headers (RFC 9110 §7.6.1, including every
//! name listed in `Connection`), the caller's own credentials and `Host`, and gain
//! the Tallyfy bearer token, `X-Tallyfy-Client` and, when absent,
//! `Accept: application/json`. Everything else passes as sent.

use http::header::{
    ACCEPT, AUTHORIZATION, CONNECTION, COOKIE, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::ProxyError;

pub const X_TALLYFY_CLIENT: HeaderName = HeaderName::from_static("x-tallyfy-client");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Connection-scoped headers that a proxy must not forward.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// Credentials a caller may present to the proxy; none of them goes upstream.
pub const CALLER_CREDENTIALS: [HeaderName; 4] = [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, X_API_KEY];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Turns the caller's headers into the upstream request's headers.
pub fn to_upstream(headers: &mut HeaderMap, authorization: HeaderValue, client_header: &HeaderValue) {
    remove_hop_by_hop(headers);
    for name in CALLER_CREDENTIALS {
        headers.remove(name);
    }
    // The HTTP client writes Host (or :authority) from the upstream URI.
    headers.remove(HOST);
    debug_assert!(authorization.is_sensitive(), "tokens are stored as sensitive values");
    headers.insert(AUTHORIZATION, authorization);
    headers.insert(X_TALLYFY_CLIENT, client_header.clone());
    if !headers.contains_key(ACCEPT) {
        headers.insert(ACCEPT, APPLICATION_JSON);
    }
}

/// Turns the upstream response's headers into the caller's.
pub fn to_caller(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
}

/// Enforces the header count and size limits with a JSON 431.
pub fn check_limits(headers: &HeaderMap, max_headers: usize, max_bytes: usize) -> Result<(), ProxyError> {
    if headers.len() > max_headers {
        return Err(ProxyError::HeadersTooLarge { limit: "server.max_headers", value: headers.len() });
    }
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if bytes > max_bytes {
        return Err(ProxyError::HeadersTooLarge { limit: "server.max_header_bytes", value: bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect()
    }

    fn bearer() -> HeaderValue {
        let mut v = HeaderValue::from_static("Bearer tallyfy-token");
        v.set_sensitive(true);
        v
    }

    #[test]
    fn caller_credentials_are_swapped_for_the_tallyfy_token() {
        let mut headers = map(&[
            ("authorization", "Bearer caller-key"),
            ("proxy-authorization", "Basic xyz"),
            ("cookie", "session=1"),
            ("x-api-key", "k"),
            ("x-tallyfy-client", "TallyfySDK"),
            ("host", "127.0.0.1:8080"),
            ("content-type", "application/json"),
            ("x-request-id", "r-1"),
        ]);
        to_upstream(&mut headers, bearer(), &HeaderValue::from_static("APIClient"));
        assert_eq!(headers["authorization"], "Bearer tallyfy-token");
        assert_eq!(headers.get_all("authorization").iter().count(), 1);
        assert_eq!(headers["x-tallyfy-client"], "APIClient");
        assert_eq!(headers["accept"], "application/json");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-request-id"], "r-1");
        for gone in ["proxy-authorization", "cookie", "x-api-key", "host"] {
            assert!(!headers.contains_key(gone), "{gone} must not go upstream");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "text/csv"),
        ]);
        to_upstream(&mut headers, bearer(), &HeaderValue::from_static("APIClient"));
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "transfer-encoding", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        assert_eq!(headers["accept"], "text/csv", "an explicit Accept is kept");
    }

    #[test]
    fn responses_keep_tallyfy_headers_and_lose_hop_by_hop() {
        let mut headers = map(&[
            ("content-type", "application/json"),
            ("retry-after", "30"),
            ("x-ratelimit-remaining", "9"),
            ("x-request-id", "abc"),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
        ]);
        to_caller(&mut headers);
        assert_eq!(headers.len(), 4);
        assert_eq!(headers["retry-after"], "30");
    }

    #[test]
    fn limits_count_fields_and_bytes() {
        let headers = map(&[("a", "1"), ("b", "22")]);
        assert!(check_limits(&headers, 2, 100).is_ok());
        assert!(check_limits(&headers, 1, 100).is_err());
        assert!(check_limits(&headers, 2, 4).is_err());
    }
}
