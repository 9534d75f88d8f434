//! Which requests may leave the proxy at all. Pure functions over the request line.
//!
//! Only `/api/*` is forwarded, and only to the configured upstream: `CONNECT`,
//! absolute-form targets naming another host, and paths with dot segments (raw,
//! percent-encoded or double-encoded) are refused here, before any other work.

use http::uri::{Authority, Scheme};
use http::{Method, Uri, Version};
use percent_encoding::percent_decode;

use crate::error::ProxyError;

/// The path prefix that is proxied. `/api` itself and `/apix` are not.
pub const API_PREFIX: &str = "/api/";

/// Decides whether a request line may be forwarded to `upstream`.
pub fn check(method: &Method, version: Version, uri: &Uri, upstream: &Authority) -> Result<(), ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::BadTarget("CONNECT is refused: this is a reverse proxy for Tallyfy's API"));
    }
    // HTTP/2 requests always carry :scheme and :authority; only an HTTP/1 request
    // with an authority in its URI was written in absolute-form.
    if version < Version::HTTP_2
        && let Some(authority) = uri.authority()
    {
        let web_scheme = matches!(uri.scheme(), Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS);
        if !web_scheme || !authority.as_str().eq_ignore_ascii_case(upstream.as_str()) {
            return Err(ProxyError::BadTarget("absolute-form targets naming another host are refused"));
        }
    }
    let path = uri.path();
    if !path.starts_with(API_PREFIX) {
        return Err(ProxyError::NotProxied);
    }
    if is_token_endpoint(path) {
        return Err(ProxyError::Forbidden(
            "the OAuth endpoints are the proxy's own business: callers never need them",
        ));
    }
    for segment in path.split('/') {
        match classify_segment(segment) {
            Segment::Plain => {}
            Segment::Dot => return Err(ProxyError::BadTarget("paths with '.' or '..' segments are refused")),
            Segment::Nul => return Err(ProxyError::BadTarget("paths holding a NUL byte are refused")),
        }
    }
    Ok(())
}

/// `/api/oauth/...`, however its second segment is encoded.
fn is_token_endpoint(path: &str) -> bool {
    let second = path[API_PREFIX.len()..].split('/').next().unwrap_or_default();
    percent_decode(second.as_bytes()).eq(b"oauth".iter().copied())
}

#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Plain,
    Dot,
    Nul,
}

/// Looks at a segment as an upstream that decodes once or twice might: `%2e%2e`,
/// `%252e%252e` and `..%2f` all hide a `..`.
fn classify_segment(segment: &str) -> Segment {
    if !segment.contains(['.', '%']) {
        return Segment::Plain; // the common case: an ID or a word
    }
    let once: Vec<u8> = percent_decode(segment.as_bytes()).collect();
    let twice: Vec<u8> = percent_decode(&once).collect();
    for decoded in [segment.as_bytes(), &once, &twice] {
        if decoded.contains(&0) {
            return Segment::Nul;
        }
        if decoded.split(|&b| b == b'/' || b == b'\\').any(|part| part == b"." || part == b"..") {
            return Segment::Dot;
        }
    }
    Segment::Plain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Authority {
        Authority::from_static("go.tallyfy.com")
    }

    fn check_h1(method: Method, target: &str) -> Result<(), ProxyError> {
        check(&method, Version::HTTP_11, &target.parse().expect("valid URI"), &upstream())
    }

    #[test]
    fn api_paths_pass_with_their_query() {
        assert!(check_h1(Method::GET, "/api/me").is_ok());
        assert!(check_h1(Method::POST, "/api/organizations/abc/tasks?x=%20y&z=1").is_ok());
        assert!(check_h1(Method::GET, "/api/applications/o/users/a%40b.com/token").is_ok());
        assert!(check_h1(Method::GET, "/api/files/report.v2.pdf").is_ok());
    }

    #[test]
    fn other_paths_are_not_proxied() {
        for target in ["/", "/api", "/apix/me", "/index.html", "/API/me", "/%61pi/me"] {
            assert!(matches!(check_h1(Method::GET, target), Err(ProxyError::NotProxied)), "{target}");
        }
    }

    #[test]
    fn dot_segments_in_any_encoding_are_refused() {
        for target in [
            "/api/../admin",
            "/api/./me",
            "/api/%2e%2e/admin",
            "/api/%2E%2E/admin",
            "/api/.%2e/admin",
            "/api/%252e%252e/admin",
            "/api/x/..%2fadmin",
            "/api/x/..%5cadmin",
            "/api/x/%00",
        ] {
            assert!(matches!(check_h1(Method::GET, target), Err(ProxyError::BadTarget(_))), "{target}");
        }
    }

    #[test]
    fn the_token_endpoint_is_not_for_callers() {
        for target in ["/api/oauth/token", "/api/%6Fauth/token", "/api/oauth"] {
            assert!(matches!(check_h1(Method::POST, target), Err(ProxyError::Forbidden(_))), "{target}");
        }
        assert!(check_h1(Method::GET, "/api/oauthx/token").is_ok());
    }

    #[test]
    fn connect_and_foreign_absolute_form_are_refused() {
        assert!(matches!(check_h1(Method::CONNECT, "go.tallyfy.com:443"), Err(ProxyError::BadTarget(_))));
        assert!(matches!(check_h1(Method::GET, "http://evil.example/api/me"), Err(ProxyError::BadTarget(_))));
        assert!(check_h1(Method::GET, "https://go.tallyfy.com/api/me").is_ok());
    }

    #[test]
    fn http2_authority_is_not_absolute_form() {
        let uri: Uri = "http://proxy.local:8080/api/me".parse().expect("valid URI");
        assert!(check(&Method::GET, Version::HTTP_2, &uri, &upstream()).is_ok());
    }
}
