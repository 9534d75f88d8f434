//! Request targets Tallyfy could read differently from the proxy.

use std::time::Duration;

use tallyfy_sandbox::fixtures::{ORG_ID, OTHER_ORG_ID};

use super::{exchange, keyed_identity, stack, stack_with_identities};

const WAIT: Duration = Duration::from_secs(5);

fn request(method: &str, target: &str, extra_headers: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: proxy.local\r\n{extra_headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

#[tokio::test]
async fn the_oauth_block_holds_however_the_path_is_encoded_or_cased() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    for target in [
        "/api/oauth%2ftoken",
        "/api/%6F%61%75%74%68%2Ftoken",
        "/api/oauth%2fpersonal-access-tokens",
        "/api/oauth%252ftoken",
    ] {
        let answer = exchange(addr, &request("POST", target, ""), WAIT).await;
        assert_eq!(answer.status(), 400, "{target}: {}", answer.text());
        assert!(answer.text().contains("\"code\":\"bad_request\""), "{target}");
    }
    for target in ["/api/OAuth/token", "/api/OAUTH/personal-access-tokens", "/api/%4FAuth/token"] {
        let answer = exchange(addr, &request("POST", target, ""), WAIT).await;
        assert_eq!(answer.status(), 403, "{target}: {}", answer.text());
    }
    assert!(stack.sandbox.received().is_empty(), "nothing reached Tallyfy");
}

#[tokio::test]
async fn org_and_path_rules_hold_against_case_and_encoding() {
    let narrow = keyed_identity("narrow", "k")
        .with("orgs", vec![ORG_ID])
        .with("paths", vec!["/api/organizations/{org}/tasks", "/api/me"]);
    let (sandbox, proxy, _dir) = stack_with_identities([narrow]).await;
    let addr = proxy.proxy_addr();
    let key = "X-Api-Key: k\r\n";
    for target in [
        format!("/api/Organizations/{OTHER_ORG_ID}/tasks"),
        format!("/api/ORGANIZATIONS/{OTHER_ORG_ID}/tasks"),
        format!("/api/%4Frganizations/{OTHER_ORG_ID}/tasks"),
        format!("/api/Applications/{OTHER_ORG_ID}/users"),
        format!("/api/organizations/{ORG_ID}/runs"),
    ] {
        let answer = exchange(addr, &request("GET", &target, key), WAIT).await;
        assert_eq!(answer.status(), 403, "{target}: {}", answer.text());
    }
    for target in [
        format!("/api/organizations%2f{OTHER_ORG_ID}/tasks"),
        format!("/api//organizations/{OTHER_ORG_ID}/tasks"),
    ] {
        assert_eq!(exchange(addr, &request("GET", &target, key), WAIT).await.status(), 400, "{target}");
    }
    assert!(sandbox.received().is_empty());
    let allowed =
        exchange(addr, &request("GET", &format!("/api/Organizations/{ORG_ID}/Tasks"), key), WAIT).await;
    assert_ne!(allowed.status(), 403, "the identity's own routes, in any case, pass the policy");
}

#[tokio::test]
async fn traversal_and_ambiguous_segments_are_refused_in_every_encoding() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    for target in [
        "/api/../admin",
        "/api/./me",
        "/api/%2e%2e/admin",
        "/api/%2E%2E/admin",
        "/api/.%2e/admin",
        "/api/%252e%252e/admin",
        "/api/x/..%2fadmin",
        "/api/x/..%5cadmin",
        "/api/x/%2e%2e%5cadmin",
        "/api//me",
        "/api/me//tasks",
        "/api/x/%00",
        "/api/x/%c0%ae%c0%ae",
        "/api/organizations\\00000000000000000000000000000000/tasks",
        "/api/oauth\\token",
        "/api/x\\..\\oauth",
    ] {
        let answer = exchange(addr, &request("GET", target, ""), WAIT).await;
        assert_eq!(answer.status(), 400, "{target}: {}", answer.text());
    }
    assert!(stack.sandbox.received().is_empty());
}

#[tokio::test]
async fn other_request_target_forms_never_leave_the_proxy() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    let cases: [(&[u8], u16); 12] = [
        (b"GET http://evil.example/api/me HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 400),
        (b"GET go.tallyfy.com:443 HTTP/1.1\r\nHost: go.tallyfy.com\r\nConnection: close\r\n\r\n", 0),
        (
            b"CONNECT go.tallyfy.com:443 HTTP/1.1\r\nHost: go.tallyfy.com:443\r\nConnection: close\r\n\r\n",
            400,
        ),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 404),
        (b"TRACE /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 405),
        (b"TRACK /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 405),
        (b"trace /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 405),
        (b"Track /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 405),
        // Lower case passes no rule written for `POST`, and Symfony would act on it.
        (b"post /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 400),
        (b"connect /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 400),
        (b"Get /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 400),
        (b"GET /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 200),
    ];
    for (bytes, want) in cases {
        let answer = exchange(addr, bytes, WAIT).await;
        let line =
            String::from_utf8_lossy(bytes.split(|&b| b == b'\r').next().unwrap_or_default()).into_owned();
        if want == 0 {
            assert!((400..500).contains(&answer.status()), "{line}: {}", answer.text());
        } else {
            assert_eq!(answer.status(), want, "{line}: {}", answer.text());
        }
    }
    let received = stack.sandbox.received();
    assert_eq!(received.len(), 1, "only the plain GET reached Tallyfy: {received:?}");
    assert_eq!(received[0].method, http::Method::GET);
    let trace = exchange(addr, b"TRACE /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", WAIT).await;
    assert!(trace.text().to_ascii_lowercase().contains("allow: get"), "405 names what is allowed");
}

/// An absolute-form target naming Tallyfy with user information (`u:p@`) is
/// refused (RFC 9110 §4.2.4); it used to be served, the user information dropped.
#[tokio::test]
async fn an_absolute_form_target_with_user_information_is_refused() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    let authority = stack.sandbox.base_url().trim_start_matches("http://").to_owned();
    let request =
        |target: &str| format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let answer = exchange(addr, request(&format!("http://u:p@{authority}/api/me")).as_bytes(), WAIT).await;
    assert_eq!(answer.status(), 400, "{}", answer.text());
    let plain = exchange(addr, request(&format!("http://{authority}/api/me")).as_bytes(), WAIT).await;
    assert_eq!(plain.status(), 200, "the same target without it: {}", plain.text());
    assert_eq!(stack.sandbox.received().len(), 1, "only the plain one reached Tallyfy");
}

#[tokio::test]
async fn oversized_targets_and_header_floods_are_refused_before_forwarding() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    let long =
        format!("GET /api/me?q={} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "a".repeat(64 * 1024));
    let answer = exchange(addr, long.as_bytes(), WAIT).await;
    assert!(answer.bytes.is_empty() || (400..500).contains(&answer.status()), "{}", answer.text());
    let mut flood = String::from("GET /api/me HTTP/1.1\r\nHost: a\r\n");
    for i in 0..1000 {
        flood.push_str(&format!("X-Flood-{i}: 1\r\n"));
    }
    flood.push_str("Connection: close\r\n\r\n");
    let answer = exchange(addr, flood.as_bytes(), WAIT).await;
    assert!(answer.bytes.is_empty() || answer.status() == 431, "{}", answer.text());
    assert!(stack.sandbox.received().is_empty());
}
