//! Caller headers that would make claims to Tallyfy's stack, and log forging.

use std::time::Duration;

use super::support::{self, TestConfig, start_proxy};
use super::{access_line, access_log, exchange, stack};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn forwarding_claims_and_names_php_would_fold_never_reach_tallyfy() {
    let stack = stack().await;
    let request = "GET /api/me HTTP/1.1\r\nHost: a\r\n\
        X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\
        X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nForwarded: for=10.9.9.9;host=evil.example\r\n\
        X-Real-IP: 10.9.9.9\r\nX-Original-URL: /api/oauth/token\r\nX-Rewrite-URL: /api/oauth/token\r\n\
        X_Api_Key: stolen\r\nX_Tallyfy_Client: Spoofed\r\nAuthorization_Override: Bearer x\r\n\
        X-HTTP-Method.Override: DELETE\r\nX-Forwarded.For: 10.9.9.9\r\n\
        X-Upstream-Request-Id: forged\r\nX-Kept: yes\r\nConnection: close\r\n\r\n";
    let answer = exchange(stack.proxy.proxy_addr(), request.as_bytes(), WAIT).await;
    assert_eq!(answer.status(), 200, "{}", answer.text());
    let received = stack.sandbox.received();
    let upstream = &received.last().expect("forwarded").headers;
    for name in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
        "x_api_key",
        "x_tallyfy_client",
        "authorization_override",
        "x-http-method.override",
        "x-forwarded.for",
        "x-upstream-request-id",
    ] {
        assert!(!upstream.contains_key(name), "{name} reached Tallyfy");
    }
    assert_eq!(upstream["x-kept"], "yes");
    assert_eq!(upstream["x-tallyfy-client"], "APIClient");
    assert_eq!(upstream.get_all("x-tallyfy-client").iter().count(), 1);
}

#[tokio::test]
async fn no_field_of_the_access_line_can_be_forged() {
    let _capture = access_log();
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    // An id that is a plain token is kept, and written quoted.
    let answer = exchange(addr, b"GET /api/me HTTP/1.1\r\nHost: a\r\nX-Request-Id: r1,status=599,identity=idB\r\nConnection: close\r\n\r\n", WAIT).await;
    assert_eq!(answer.status(), 200);
    let line = access_line("r1,status=599").await;
    assert!(line.contains(r#"request_id="r1,status=599,identity=idB""#), "{line}");
    assert_eq!(line.matches(" status=").count(), 1, "{line}");
    assert!(line.contains(" status=200"), "{line}");

    // One with a quote cannot be quoted safely everywhere: it is replaced.
    let answer = exchange(
        addr,
        b"GET /api/me HTTP/1.1\r\nHost: a\r\nX-Request-Id: x\" identity=idB status=200\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    let text = answer.text();
    let id = text.lines().find_map(|l| l.strip_prefix("x-request-id: ")).expect("an id came back").to_owned();
    assert!(!id.contains('"'), "a made id replaced the forged one: {id}");
    let line = access_line(&id).await;
    assert!(!line.contains("idB"), "{line}");
    assert_eq!(line.matches(" identity=").count(), 1, "{line}");
}

#[tokio::test]
async fn no_character_of_a_path_can_rearrange_or_split_the_access_line() {
    let _capture = access_log();
    let stack = stack().await;
    // Raw UTF-8 in the path (hyper accepts it): a line separator (U+2028),
    // a right-to-left override (U+202E) and a zero-width space (U+200B),
    // which a log viewer would show as a break, reversed text, or nothing.
    let request: &[u8] =
        b"GET /api/me/unprintable\xe2\x80\xa8status=200\xe2\x80\xaeidentity=x\xe2\x80\x8b HTTP/1.1\r\n\
        Host: a\r\nConnection: close\r\n\r\n";
    let answer = exchange(stack.proxy.proxy_addr(), request, WAIT).await;
    assert!(answer.status() >= 400, "{}", answer.text());
    let line = access_line("/api/me/unprintable").await;
    assert!(
        line.contains(r#" path="/api/me/unprintable\u{2028}status=200\u{202e}identity=x\u{200b}""#),
        "{line}"
    );
    assert!(line.is_ascii(), "every character escaped: {line}");
}

#[tokio::test]
async fn a_header_the_caller_lists_in_connection_never_reaches_tallyfy_whatever_else_the_list_holds() {
    let stack = stack().await;
    // `Connection` lists `X-Secret-Hop` beside a byte above 0x7F (obs-text,
    // which hyper accepts): the listed header is still hop-by-hop.
    let request: &[u8] = b"GET /api/me HTTP/1.1\r\nHost: a\r\nX-Secret-Hop: 1\r\nX-Kept: yes\r\n\
        Connection: X-Secret-Hop, \xff\xfe, close\r\n\r\n";
    let answer = exchange(stack.proxy.proxy_addr(), request, WAIT).await;
    assert_eq!(answer.status(), 200, "{}", answer.text());
    let received = stack.sandbox.received();
    let upstream = &received.last().expect("forwarded").headers;
    assert!(!upstream.contains_key("x-secret-hop"), "a Connection-listed header reached Tallyfy");
    assert_eq!(upstream["x-kept"], "yes");
}

#[tokio::test]
async fn proxy_headers_never_reach_tallyfy_where_php_would_read_them_as_its_http_proxy() {
    let stack = stack().await;
    let request = "GET /api/me HTTP/1.1\r\nHost: a\r\nProxy: http://evil.example:3128\r\n\
        Proxy-Token: caller-secret\r\nPROXY-Anything: x\r\nX-Kept: yes\r\nConnection: close\r\n\r\n";
    let answer = exchange(stack.proxy.proxy_addr(), request.as_bytes(), WAIT).await;
    assert_eq!(answer.status(), 200, "{}", answer.text());
    let received = stack.sandbox.received();
    let upstream = &received.last().expect("forwarded").headers;
    for name in ["proxy", "proxy-token", "proxy-anything"] {
        assert!(!upstream.contains_key(name), "{name} reached Tallyfy");
    }
    assert_eq!(upstream["x-kept"], "yes");
}

#[tokio::test]
async fn a_connection_list_cannot_remove_the_request_id_the_proxy_sends() {
    let stack = stack().await;
    let request = "GET /api/me HTTP/1.1\r\nHost: a\r\nConnection: X-Request-Id, close\r\n\r\n";
    let answer = exchange(stack.proxy.proxy_addr(), request.as_bytes(), WAIT).await;
    assert_eq!(answer.status(), 200, "{}", answer.text());
    let sent_back = answer
        .text()
        .lines()
        .find_map(|line| line.strip_prefix("x-request-id: ").map(str::to_owned))
        .expect("the caller got a request id");
    let received = stack.sandbox.received();
    let upstream = &received.last().expect("forwarded").headers;
    assert_eq!(upstream.get("x-request-id").expect("Tallyfy got the request id"), sent_back.as_str());
}

/// A chunked upload's trailer fields hold the caller's own key, another
/// client header and a method override; Tallyfy speaks HTTP/2, where hyper's
/// client would send them on as a last HEADERS frame. None of them arrives.
#[tokio::test]
async fn trailers_never_reach_tallyfy_even_over_http2() {
    let (sandbox, dir, base) = support::tls_sandbox(&[b"h2"]).await;
    let config = super::short_timers(TestConfig::personal_any(&base)).set("upstream", "ca_file", "ca.pem");
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let request: &[u8] =
        b"POST /api/organizations/org/runs HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\
        Authorization: Bearer caller-secret\r\nX-Api-Key: caller-key\r\nX-Tallyfy-Client: Evil\r\n\
        X-HTTP-Method-Override: DELETE\r\nCookie: session=1\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    assert!(answer.status() > 0, "{}", answer.text());
    let received = sandbox.received();
    let upstream = received.last().expect("forwarded");
    assert_eq!(upstream.version, http::Version::HTTP_2, "ALPN chose h2");
    assert_eq!(upstream.body, "abc");
    assert!(
        upstream.trailers.is_empty(),
        "trailers reached Tallyfy: {:?}",
        upstream.trailers.keys().map(|name| name.as_str()).collect::<Vec<_>>()
    );
}
