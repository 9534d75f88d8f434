//! Which requests may leave the proxy at all. Pure functions over the request
//! line and `Host`.
//!
//! Only `/api/*` is forwarded, and only to the configured upstream. Refused here,
//! for every identity and before any other work:
//! - `CONNECT` (400), `TRACE` and `TRACK` (405: an echoing upstream would hand the
//!   injected token back to the caller);
//! - absolute-form targets naming another host;
//! - paths Tallyfy could read differently from the proxy: dot segments (raw,
//!   percent-encoded or double-encoded), an encoded `/` or `\`, a NUL, an empty
//!   segment (`//`), or bytes that do not decode to UTF-8. Tallyfy's framework
//!   percent-decodes each segment before routing, so the proxy judges the decoded
//!   segments ([`segments`]), which [`crate::policy`] then matches;
//! - the OAuth endpoints (`/api/oauth/...`, however spelled or cased);
//! - a missing, repeated or malformed `Host` (it decides the links callers get back).

use std::borrow::Cow;

use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Uri, Version};
use percent_encoding::percent_decode;

use crate::error::ProxyError;

/// The path prefix that is proxied. `/api` itself and `/apix` are not.
pub const API_PREFIX: &str = "/api/";

/// The route word of Tallyfy's token endpoints.
const OAUTH: &str = "oauth";

/// Decides whether a request line may be forwarded to `upstream`.
pub fn check(method: &Method, version: Version, uri: &Uri, upstream: &Authority) -> Result<(), ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is refused: this is a reverse proxy for Tallyfy's API"));
    }
    // In any case: `trace` is a method of its own to hyper, and Symfony upper-cases it.
    if method.as_str().eq_ignore_ascii_case("TRACE") || method.as_str().eq_ignore_ascii_case("TRACK") {
        return Err(ProxyError::MethodNotAllowed);
    }
    // As nginx does: `post` would pass rules and limits written for `POST`, and
    // Symfony would act on it as a `POST`.
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(ProxyError::BadRequest("methods are written in capitals"));
    }
    // HTTP/2 requests always carry :scheme and :authority; only an HTTP/1 request
    // with an authority in its URI was written in absolute-form.
    if version < Version::HTTP_2
        && let Some(authority) = uri.authority()
    {
        let web_scheme = uri.scheme().filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS);
        if !web_scheme.is_some_and(|scheme| canonical_authority(scheme, authority) == *upstream) {
            return Err(ProxyError::BadRequest("absolute-form targets naming another host are refused"));
        }
        // RFC 9110 §4.2.4: user information in an http(s) URI is an error
        // (a credential in the target, or a host spoofed in front of an `@`).
        if authority.as_str().contains('@') {
            return Err(ProxyError::BadRequest("a target with user information (user@host) is refused"));
        }
    }
    let path = uri.path();
    if !path.starts_with(API_PREFIX) {
        return Err(ProxyError::NotProxied);
    }
    // One pass: every segment must decode one way, and the second must not be
    // Tallyfy's OAuth family (`/api/oauth/...`).
    for (at, segment) in segments(path).enumerate() {
        let segment = segment.map_err(ProxyError::BadRequest)?;
        if at == 1 && segment.eq_ignore_ascii_case(OAUTH) {
            return Err(ProxyError::Forbidden(
                "the OAuth endpoints are the proxy's own business: callers never need them",
            ));
        }
    }
    Ok(())
}

/// The methods that ask for nothing to be done (RFC 9110 §9.2.1) among those
/// the proxy passes on: sending one again cannot do anything twice.
pub fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// An authority as it names its host for `scheme` whatever its spelling: the
/// host in lower case, the scheme's default port left out
/// (`Go.Tallyfy.com:443` is `go.tallyfy.com` over `https`). The upstream's is
/// kept so, since Tallyfy writes its links so and they are found byte for byte.
pub fn canonical_authority(scheme: &Scheme, authority: &Authority) -> Authority {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = authority.host().to_ascii_lowercase();
    let text = match authority.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host,
    };
    text.parse().unwrap_or_else(|_| authority.clone())
}

/// `listen.unprefixed`: a path outside `/api` (as Tallyfy's SDKs send to
/// `https://api.tallyfy.com`) becomes the same path under `/api`, so every check
/// after this one sees the path Tallyfy will. `true` when it was rewritten.
pub fn add_api_prefix(uri: &mut Uri) -> Result<bool, ProxyError> {
    let path = uri.path();
    if path == "/api" || path.starts_with(API_PREFIX) || !path.starts_with('/') {
        return Ok(false);
    }
    let target = uri.path_and_query().map_or(path, |pq| pq.as_str());
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        format!("/api{target}")
            .parse()
            .map_err(|_| ProxyError::BadRequest("the request target is not valid"))?,
    );
    *uri = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("the request target is not valid"))?;
    Ok(true)
}

/// The segments of an absolute path after its leading `/`, each percent-decoded
/// as Tallyfy's router reads it; a trailing `/` adds no segment. A segment that
/// could be read two ways is an `Err` naming why.
pub fn segments(path: &str) -> impl Iterator<Item = Result<Cow<'_, str>, &'static str>> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    split_at_slashes(path).map(decode_segment)
}

/// `text` split at each `/`, as `str::split('/')` splits it, by a plain byte
/// scan: a char pattern's searcher costs more than the few bytes of a segment.
pub(crate) fn split_at_slashes(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.bytes().position(|b| b == b'/') {
            Some(at) => {
                rest = Some(&current[at + 1..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

pub(crate) fn decode_segment(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    if raw.is_empty() {
        return Err("paths with an empty segment ('//') are refused");
    }
    // Bytes, not chars: the three are ASCII, and a char pattern decodes UTF-8.
    if !raw.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return Ok(Cow::Borrowed(raw)); // the common case: an ID or a word
    }
    // Servers that read `\` as `/` would see other segments than the policy did.
    if raw.as_bytes().contains(&b'\\') {
        return Err("paths holding a '\\' are refused");
    }
    let once: Cow<'_, [u8]> = percent_decode(raw.as_bytes()).into();
    let twice: Cow<'_, [u8]> = percent_decode(&once).into();
    for decoded in [raw.as_bytes(), &once, &twice] {
        if decoded.contains(&0) {
            return Err("paths holding a NUL byte are refused");
        }
        if decoded.split(|&b| b == b'/' || b == b'\\').any(|part| part == b"." || part == b"..") {
            return Err("paths with '.' or '..' segments are refused");
        }
    }
    if once.contains(&b'/') || once.contains(&b'\\') || twice.contains(&b'/') || twice.contains(&b'\\') {
        return Err("paths with an encoded '/' or '\\' are refused");
    }
    match once {
        Cow::Borrowed(_) => Ok(Cow::Borrowed(raw)),
        Cow::Owned(bytes) => {
            String::from_utf8(bytes).map(Cow::Owned).map_err(|_| "paths must decode to UTF-8")
        }
    }
}

/// The authority the caller addressed: the single `Host` of an HTTP/1 request
/// (required on HTTP/1.1), or HTTP/2's `:authority` (else its `Host`). It must be
/// a plain `host[:port]`: no user info, path, spaces or control bytes.
pub fn host<'a>(
    version: Version,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, ProxyError> {
    let mut hosts = headers.get_all(HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(ProxyError::BadRequest("a request must carry one Host header, not several"));
    }
    let host = match (version, uri.authority(), first) {
        (Version::HTTP_2 | Version::HTTP_3, Some(authority), _) => Some(authority.as_str()),
        (_, _, Some(value)) => Some(value.to_str().map_err(|_| BAD_HOST)?),
        (Version::HTTP_11, _, None) => {
            return Err(ProxyError::BadRequest("HTTP/1.1 requests must carry a Host header"));
        }
        (_, _, None) => None,
    };
    match host {
        Some(host) if !is_host_and_port(host) => Err(BAD_HOST),
        host => Ok(host),
    }
}

const BAD_HOST: ProxyError = ProxyError::BadRequest("the Host header must be a plain host[:port]");

/// `name`, `name:port`, `[v6]` or `[v6]:port`, with a DNS-style name or IPv4.
fn is_host_and_port(value: &str) -> bool {
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
        _ => (value, None),
    };
    let port_ok = port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok());
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => !v6.is_empty() && v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        }
    };
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn upstream() -> Authority {
        Authority::from_static("go.tallyfy.com")
    }

    fn check_h1(method: Method, target: &str) -> Result<(), ProxyError> {
        check(&method, Version::HTTP_11, &target.parse().expect("valid URI"), &upstream())
    }

    proptest::proptest! {
        #[test]
        fn the_byte_split_is_strs_split(text in "[a/é%.]{0,24}") {
            let ours: Vec<&str> = split_at_slashes(&text).collect();
            let std: Vec<&str> = text.split('/').collect();
            proptest::prop_assert_eq!(ours, std);
        }
    }

    #[test]
    fn api_paths_pass_with_their_query() {
        assert!(check_h1(Method::GET, "/api/me").is_ok());
        assert!(check_h1(Method::GET, "/api/me/").is_ok(), "one trailing slash");
        assert!(check_h1(Method::POST, "/api/organizations/abc/tasks?x=%20y&z=1&p=%2F").is_ok());
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
    fn ambiguous_paths_are_refused_for_everyone() {
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
            "/api/organizations%2fx/tasks",
            "/api/x/a%5Cb",
            "/api/x/a%252fb",
            "/api//me",
            "/api/me//tasks",
            "/api/x/%c0%af",
        ] {
            assert!(matches!(check_h1(Method::GET, target), Err(ProxyError::BadRequest(_))), "{target}");
        }
    }

    #[test]
    fn the_token_endpoint_is_not_for_callers_however_spelled() {
        for target in
            ["/api/oauth/token", "/api/%6Fauth/token", "/api/oauth", "/api/OAuth/token", "/api/OAUTH/"]
        {
            assert!(matches!(check_h1(Method::POST, target), Err(ProxyError::Forbidden(_))), "{target}");
        }
        for encoded_slash in
            ["/api/oauth%2ftoken", "/api/%6F%61%75%74%68%2Ftoken", "/api/oauth%2fpersonal-access-tokens"]
        {
            assert!(
                matches!(check_h1(Method::POST, encoded_slash), Err(ProxyError::BadRequest(_))),
                "{encoded_slash}"
            );
        }
        assert!(check_h1(Method::GET, "/api/oauthx/token").is_ok());
    }

    #[test]
    fn connect_trace_and_foreign_absolute_form_are_refused() {
        assert!(matches!(check_h1(Method::CONNECT, "go.tallyfy.com:443"), Err(ProxyError::BadRequest(_))));
        assert!(matches!(check_h1(Method::TRACE, "/api/me"), Err(ProxyError::MethodNotAllowed)));
        let track = Method::from_bytes(b"TRACK").expect("method");
        assert!(matches!(check_h1(track, "/api/me"), Err(ProxyError::MethodNotAllowed)));
        assert!(matches!(
            check_h1(Method::GET, "http://evil.example/api/me"),
            Err(ProxyError::BadRequest(_))
        ));
        assert!(check_h1(Method::GET, "https://go.tallyfy.com/api/me").is_ok());
        assert!(
            matches!(
                check_h1(Method::GET, "https://u:p@go.tallyfy.com/api/me"),
                Err(ProxyError::BadRequest(_))
            ),
            "user information"
        );
        // The upstream's host however spelled, its scheme's default port written or not.
        assert!(check_h1(Method::GET, "https://Go.Tallyfy.COM:443/api/me").is_ok());
        for other_port in ["https://go.tallyfy.com:8443/api/me", "http://go.tallyfy.com:443/api/me"] {
            assert!(
                matches!(check_h1(Method::GET, other_port), Err(ProxyError::BadRequest(_))),
                "{other_port}"
            );
        }
    }

    #[test]
    fn http2_authority_is_not_absolute_form() {
        let uri: Uri = "http://proxy.local:8080/api/me".parse().expect("valid URI");
        assert!(check(&Method::GET, Version::HTTP_2, &uri, &upstream()).is_ok());
    }

    #[test]
    fn segments_are_decoded_once_for_policy() {
        let decoded: Vec<_> = segments("/api/%6Frganizations/a%40b/").map(Result::unwrap).collect();
        assert_eq!(decoded, ["api", "organizations", "a@b"]);
    }

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for host in hosts {
            map.append(HOST, HeaderValue::from_str(host).expect("header value"));
        }
        map
    }

    #[test]
    fn one_plain_host_is_required_on_http11() {
        let uri: Uri = "/api/me".parse().expect("uri");
        for good in ["proxy", "proxy.local:8080", "10.0.0.1:80", "[::1]:8080", "[::1]", "tallyfy_proxy"] {
            let h = headers(&[good]);
            assert_eq!(host(Version::HTTP_11, &uri, &h).expect(good), Some(good));
        }
        for bad in ["a@b", "a/b", "a b", "a:b", "a:123456", "[zz]", "", "a:", "a\tb"] {
            let h = headers(&[bad]);
            assert!(host(Version::HTTP_11, &uri, &h).is_err(), "{bad:?}");
        }
        assert!(host(Version::HTTP_11, &uri, &headers(&[])).is_err(), "missing");
        assert!(host(Version::HTTP_11, &uri, &headers(&["a", "b"])).is_err(), "two");
        assert_eq!(host(Version::HTTP_10, &uri, &headers(&[])).expect("1.0 may omit it"), None);
        let h2: Uri = "http://proxy:8080/api/me".parse().expect("uri");
        assert_eq!(host(Version::HTTP_2, &h2, &headers(&[])).expect("authority"), Some("proxy:8080"));
    }
}
