//! Tallyfy-aware traffic against the sandbox: local limits answered by the
//! proxy with nothing sent, Tallyfy's 429s remembered and absorbed, safe
//! retries within their budget, and callers written for either API host.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{
    Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, client, closed_port, scrape, start_proxy,
    start_sandbox, start_sandbox_with, table,
};
use tallyfy_proxy::app::Running;
use tallyfy_sandbox::fixtures::{ORG_ID, OTHER_ORG_ID, PERSONAL_TOKEN};
use tallyfy_sandbox::{ApiFault, SandboxConfig};
use tokio::net::TcpListener;
use toml::Value;

/// A personal-token credential and one identity matching anyone, with `change`.
fn config(base_url: &str, identity: impl FnOnce(Identity) -> Identity) -> TestConfig {
    TestConfig::new(base_url)
        .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
        .identity(identity(Identity::new("billing", "ops", Match::Any)))
}

async fn proxy(config: TestConfig) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let proxy = start_proxy(&config.parse(dir.path())).await;
    (proxy, dir)
}

fn url(proxy: &Running, path: &str) -> String {
    format!("http://{}{path}", proxy.proxy_addr())
}

fn guests(org: &str) -> String {
    format!("/api/organizations/{org}/guests")
}

/// A `[[limits]]` table.
fn limit(name: &str, method: &str, path: &str, max: i64, per_seconds: i64) -> Value {
    table([
        ("name", name.into()),
        ("methods", Value::from(vec![method])),
        ("path", path.into()),
        ("max", max.into()),
        ("per_seconds", per_seconds.into()),
    ])
}

fn with_limits(config: TestConfig, limits: Vec<Value>) -> TestConfig {
    limits.into_iter().fold(config, TestConfig::limit)
}

/// A sample of the Prometheus text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn post_guest(http: &reqwest::Client, proxy: &Running, org: &str) -> reqwest::Response {
    let body = serde_json::json!({ "email": "guest@example.com" });
    http.post(url(proxy, &guests(org))).json(&body).send().await.expect("answered")
}

#[tokio::test]
async fn a_burst_over_the_rate_limit_gets_exactly_the_excess_refused_and_nothing_sent() {
    let sandbox = start_sandbox().await;
    let rate = table([("per_second", 1.into()), ("burst", 5.into())]);
    let (proxy, _dir) = proxy(config(&sandbox.base_url(), |id| id.with("rate_limit", rate))).await;
    let http = client();
    let mut statuses = Vec::new();
    let began = Instant::now();
    for _ in 0..8 {
        let response = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
        if response.status() == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
            let body: serde_json::Value = response.json().await.expect("JSON");
            assert_eq!(body["error"]["code"], "rate_limited");
            assert!(
                body["error"]["message"].as_str().expect("text").contains("billing.rate_limit"),
                "{body}"
            );
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    // The bucket refills one a second: a machine so slow that the eight took
    // more than a second may pass one more per whole second, never fewer.
    let refilled = began.elapsed().as_secs() as usize;
    let passed = statuses.iter().filter(|status| **status == 200).count();
    assert_eq!(&statuses[..5], [200; 5], "{statuses:?}");
    assert!(passed <= 5 + refilled && statuses.iter().all(|s| [200, 429].contains(s)), "{statuses:?}");
    if refilled == 0 {
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    }
    let refused = (8 - passed) as f64;
    assert_eq!(sandbox.count("GET", "/api/me"), passed, "the refused requests never reached Tallyfy");
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_local_rejections_total{reason="rate_limited"}"#), refused);
    assert_eq!(
        sample(&metrics, r#"tallyfy_proxy_limit_rejections_total{limit="billing.rate_limit"}"#),
        refused
    );
}

#[tokio::test]
async fn an_hourly_style_cap_is_kept_per_org_and_reopens_with_its_window() {
    let sandbox = start_sandbox().await;
    // A 3 s window, so the three POSTs fall in it on however slow a machine.
    let cap = limit("guest-invites", "POST", "/api/organizations/{org}/guests", 2, 3);
    let (proxy, _dir) = proxy(with_limits(config(&sandbox.base_url(), |id| id), vec![cap])).await;
    let http = client();
    assert_ne!(post_guest(&http, &proxy, ORG_ID).await.status(), 429);
    // The window opened before that answer came back: it closes by opened + 3 s.
    let opened = Instant::now();
    assert_ne!(post_guest(&http, &proxy, ORG_ID).await.status(), 429);
    let refused = post_guest(&http, &proxy, ORG_ID).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"].to_str().expect("text").parse().expect("seconds");
    assert!((1..=3).contains(&wait), "the rest of the window: {wait}");
    assert_eq!(sandbox.count("POST", &guests(ORG_ID)), 2, "the third never reached Tallyfy");
    assert_ne!(post_guest(&http, &proxy, OTHER_ORG_ID).await.status(), 429, "another org counts apart");
    assert_ne!(
        http.get(url(&proxy, &guests(ORG_ID))).send().await.expect("answered").status(),
        429,
        "only POST is counted"
    );

    // The window closes 3 s after it opened.
    let reopened = opened + Duration::from_secs(3);
    tokio::time::sleep_until(reopened.into()).await;
    assert_ne!(post_guest(&http, &proxy, ORG_ID).await.status(), 429, "a new window");
    assert_eq!(sandbox.count("POST", &guests(ORG_ID)), 3);
}

#[tokio::test]
async fn a_remembered_429_keeps_tallyfy_from_seeing_the_next_calls_and_lifts_at_retry_after() {
    let sandbox = start_sandbox().await;
    let (proxy, _dir) = proxy(config(&sandbox.base_url(), |id| id)).await;
    let http = client();
    sandbox.fail_api("/api/me", 1, ApiFault::Throttled { retry_after: Some(1) });
    let first = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    // The proxy remembered the 429 before this answer reached the test: the
    // memory lifts at most Retry-After after this instant.
    let throttled_at = Instant::now();
    assert_eq!(first.status(), 429, "Tallyfy's own 429 is passed on");
    assert_eq!(first.headers()["retry-after"], "1");
    assert_eq!(first.text().await.expect("body"), r#"{"message":"Too Many Attempts."}"#);
    for _ in 0..5 {
        let local = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
        assert_eq!(local.status(), 429);
        assert_eq!(local.headers()["retry-after"], "1");
        let body: serde_json::Value = local.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "rate_limited", "answered by the proxy: {body}");
    }
    assert_eq!(sandbox.count("GET", "/api/me"), 1, "Tallyfy saw none of the five");
    tokio::time::sleep_until((throttled_at + Duration::from_millis(1050)).into()).await;
    assert_eq!(http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(), 200, "lifted");
    assert_eq!(sandbox.count("GET", "/api/me"), 2);
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_upstream_429_total{credential="ops"}"#), 1.0);
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_remembered_429_answers_total{credential="ops"}"#), 5.0);
}

#[tokio::test]
async fn an_hourly_cap_from_tallyfy_holds_back_only_its_org_and_limit() {
    let sandbox = start_sandbox().await;
    let cap = limit("guest-invites", "POST", "/api/organizations/{org}/guests", 30, 3600);
    let (proxy, _dir) = proxy(with_limits(config(&sandbox.base_url(), |id| id), vec![cap])).await;
    let http = client();
    sandbox.fail_api("/guests", 1, ApiFault::HourlyCap { retry_after: 600 });
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 429);
    let local = post_guest(&http, &proxy, ORG_ID).await;
    assert_eq!(local.status(), 429);
    let wait: u64 = local.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((599..=600).contains(&wait), "{wait}");
    assert_eq!(sandbox.count("POST", &guests(ORG_ID)), 1);
    assert_ne!(post_guest(&http, &proxy, OTHER_ORG_ID).await.status(), 429, "another org is not capped");
    assert_eq!(
        http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(),
        200,
        "nor other calls"
    );
}

/// A `base_url` with a path of its own (Tallyfy behind a prefix) changes
/// nothing about which org and limit a cap is remembered under: both the
/// named rule's cap and an unnamed path's are kept on the path the caller sent,
/// where the prefix used to shift the segments so neither ever held a call back.
#[tokio::test]
async fn a_base_url_path_does_not_shift_what_a_remembered_cap_holds_back() {
    let sandbox =
        start_sandbox_with(SandboxConfig { path_prefix: "/tallyfy".into(), ..SandboxConfig::default() })
            .await;
    let prefixed = format!("{}/tallyfy", sandbox.base_url());
    let cap = limit("guest-invites", "POST", "/api/organizations/{org}/guests", 30, 3600);
    let (proxy, _dir) = proxy(with_limits(config(&prefixed, |id| id), vec![cap])).await;
    let http = client();
    sandbox.fail_api("/guests", 1, ApiFault::HourlyCap { retry_after: 600 });
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 429, "Tallyfy's cap");
    let held = post_guest(&http, &proxy, ORG_ID).await;
    assert_eq!(held.status(), 429);
    let json: serde_json::Value = held.json().await.expect("JSON");
    assert_eq!(json["error"]["code"], "rate_limited", "answered by the proxy: {json}");
    assert_eq!(sandbox.count("POST", &format!("/tallyfy{}", guests(ORG_ID))), 1, "sent once");
    assert_ne!(post_guest(&http, &proxy, OTHER_ORG_ID).await.status(), 429, "another org is not capped");

    let comments = format!("/api/organizations/{ORG_ID}/tasks/t1/comments");
    sandbox.fail_api("/comments", 1, ApiFault::HourlyCap { retry_after: 600 });
    let body = serde_json::json!({ "comment": "hello" });
    let post = || http.post(url(&proxy, &comments)).json(&body).send();
    assert_eq!(post().await.expect("answered").status(), 429, "Tallyfy's cap");
    let held = post().await.expect("answered");
    assert_eq!(held.status(), 429);
    let json: serde_json::Value = held.json().await.expect("JSON");
    assert_eq!(json["error"]["code"], "rate_limited", "answered by the proxy: {json}");
    let reached = sandbox.received().iter().filter(|r| r.uri.contains("/comments")).count();
    assert_eq!(reached, 1, "the unnamed cap held the second back");
    let me = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(me.status(), 200, "the credential's other calls reach Tallyfy under its prefix");
    assert!(sandbox.received().iter().all(|r| r.uri.starts_with("/tallyfy/api/")), "every call prefixed");
}

/// An hourly cap on a path no `[[limits]]` rule names is remembered for the
/// path as Tallyfy reads it: its respellings (a trailing `/`, percent-encoded
/// letters, other cases) are held back too, where they used to go through.
#[tokio::test]
async fn an_unnamed_hourly_cap_holds_back_every_spelling_of_its_path() {
    let sandbox = start_sandbox().await;
    let (proxy, _dir) = proxy(config(&sandbox.base_url(), |id| id)).await;
    let http = client();
    let comments = format!("/api/organizations/{ORG_ID}/tasks/t1/comments");
    sandbox.fail_api("/comments", 1, ApiFault::HourlyCap { retry_after: 600 });
    let body = serde_json::json!({ "comment": "hello" });
    let post = |path: String| http.post(url(&proxy, &path)).json(&body).send();
    assert_eq!(post(comments.clone()).await.expect("answered").status(), 429, "Tallyfy's cap");
    let upper_org = ORG_ID.to_ascii_uppercase();
    for respelled in [
        format!("{comments}/"),
        comments.replace("comments", "c%6fmments"),
        comments.replace("organizations", "Organizations"),
        comments.replace(ORG_ID, &upper_org),
    ] {
        let answer = post(respelled.clone()).await.expect("answered");
        assert_eq!(answer.status(), 429, "{respelled}");
        let json: serde_json::Value = answer.json().await.expect("JSON");
        assert_eq!(json["error"]["code"], "rate_limited", "answered by the proxy for {respelled}");
    }
    let reached = sandbox.received().iter().filter(|r| r.uri.contains("omments")).count();
    assert_eq!(reached, 1, "no respelling reached Tallyfy");
    assert_eq!(
        http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(),
        200,
        "the credential's other calls go on"
    );
}

/// Tallyfy is asked only for codings the proxy can undo: a caller's `br` or
/// `zstd` would have Tallyfy code a 429 (or a JSON body with dates and links)
/// in a way the proxy cannot read.
#[tokio::test]
async fn tallyfy_is_asked_only_for_codings_the_proxy_can_undo() {
    let sandbox = start_sandbox().await;
    let (proxy, _dir) = proxy(config(&sandbox.base_url(), |id| id)).await;
    let http = client();
    for (asked, sent) in [
        ("gzip", "gzip"),
        ("identity", "identity"),
        ("br, gzip;q=0.8, zstd", "gzip;q=0.8"),
        ("br", "identity"),
        ("*", "identity"),
        ("deflate, BR;q=1", "deflate"),
    ] {
        let response =
            http.get(url(&proxy, "/api/me")).header("accept-encoding", asked).send().await.expect("answered");
        assert_eq!(response.status(), 200);
        let received = sandbox.received();
        let request = received.last().expect("reached Tallyfy");
        assert_eq!(request.headers["accept-encoding"], sent, "asked {asked:?}");
    }
}

/// Tallyfy gzips its 429 for a caller that accepts gzip (as the Python SDK
/// does): the cap is still read as an hourly cap of its org and limit, where
/// read coded it held back every call of the credential for the whole hour.
#[tokio::test]
async fn a_gzipped_hourly_cap_holds_back_only_its_org_and_limit() {
    let sandbox = start_sandbox().await;
    let cap = limit("guest-invites", "POST", "/api/organizations/{org}/guests", 30, 3600);
    let (proxy, _dir) = proxy(with_limits(config(&sandbox.base_url(), |id| id), vec![cap])).await;
    let http = client();
    sandbox.fail_api("/guests", 1, ApiFault::HourlyCap { retry_after: 1800 });
    let body = serde_json::json!({ "email": "guest@example.com" });
    let capped = http
        .post(url(&proxy, &guests(ORG_ID)))
        .header("accept-encoding", "gzip")
        .json(&body)
        .send()
        .await
        .expect("answered");
    assert_eq!(capped.status(), 429);
    assert_eq!(capped.headers()["content-encoding"], "gzip", "Tallyfy's coded 429, passed on");
    let received = sandbox.received();
    let sent = received.last().expect("the POST reached Tallyfy");
    assert_eq!(sent.headers["accept-encoding"], "gzip", "the caller's coding was asked for");
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 429, "the org's cap is remembered");
    assert_eq!(sandbox.count("POST", &guests(ORG_ID)), 1);
    assert_ne!(post_guest(&http, &proxy, OTHER_ORG_ID).await.status(), 429, "another org is not capped");
    assert_eq!(
        http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(),
        200,
        "nor the credential's other calls"
    );
}

#[tokio::test]
async fn a_short_429_is_waited_out_and_the_app_never_sees_it() {
    let sandbox = start_sandbox().await;
    let config = config(&sandbox.base_url(), |id| id).set("upstream", "retry_429_max_wait_ms", 2000);
    let (proxy, _dir) = proxy(config).await;
    sandbox.fail_api("/api/me", 1, ApiFault::Throttled { retry_after: Some(1) });
    let began = Instant::now();
    let response = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    assert!(began.elapsed() >= Duration::from_millis(950), "it waited Tallyfy's Retry-After");
    assert_eq!(sandbox.count("GET", "/api/me"), 2, "sent once more");
}

/// The sandbox issuing tokens that live `lifetime`.
async fn sandbox_with_tokens_of(lifetime: Duration) -> tallyfy_sandbox::Sandbox {
    start_sandbox_with(SandboxConfig {
        token_lifetime: lifetime,
        user_token_lifetime: lifetime,
        ..SandboxConfig::default()
    })
    .await
}

/// The fixture user (password grant: its requests are kept for replay) for any caller.
fn user_config(sandbox: &tallyfy_sandbox::Sandbox) -> TestConfig {
    let user = Credential::fixture_user();
    TestConfig::new(&sandbox.base_url())
        .identity(Identity::new("app", &user.name(), Match::Any))
        .credential(user)
}

/// A request sent again after waiting out a 429 goes with the credential's
/// token then: a refresh that ran during the wait (2-second tokens, renewed
/// at 75-85 % of their life) spares it a 401 and a replay with the token it
/// was first sent with, which expired meanwhile.
#[tokio::test]
async fn a_request_sent_again_after_a_429_goes_with_the_token_refreshed_meanwhile() {
    let sandbox = sandbox_with_tokens_of(Duration::from_secs(2)).await;
    let config = user_config(&sandbox).set("upstream", "retry_429_max_wait_ms", 5000);
    let (proxy, _dir) = proxy(config).await;
    sandbox.fail_api("/api/me", 1, ApiFault::Throttled { retry_after: Some(4) });
    let response = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(sandbox.count("GET", "/api/me"), 2, "sent once more, with no 401 between");
    assert!(sandbox.token_requests().len() >= 2, "a refresh ran during the wait");
}

/// Every later send goes with the token the request last went with: a retry
/// that took the token refreshed during its backoff is not followed by one
/// with the token first sent (dead by then), which met a 401 blamed on the
/// new token, and went to the caller when a forced refresh was not allowed.
#[tokio::test]
async fn a_second_retry_goes_with_the_token_the_first_took() {
    let sandbox = sandbox_with_tokens_of(Duration::from_secs(1)).await;
    let retry = table([("attempts", 3.into()), ("backoff_ms", 2000.into())]);
    let (proxy, _dir) = proxy(user_config(&sandbox).set("upstream", "retry", retry)).await;
    // The first token lives a second; the one its refresh brings, an hour.
    sandbox.set_token_lifetime(Duration::from_secs(3600));
    sandbox.fail_api("/api/me", 2, ApiFault::Status(503));
    let response = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(sandbox.count("GET", "/api/me"), 3, "two 503s, then the answer: no 401 between");
}

/// A request sent again after a short 429 that meets a second 429 passes it on,
/// and the second is remembered and counted like the first: the next call is
/// held back by the proxy instead of going straight to a throttling Tallyfy.
#[tokio::test]
async fn a_429_to_the_request_sent_again_is_remembered_too() {
    let sandbox = start_sandbox().await;
    let config = config(&sandbox.base_url(), |id| id).set("upstream", "retry_429_max_wait_ms", 2000);
    let (proxy, _dir) = proxy(config).await;
    sandbox.fail_api("/api/me", 2, ApiFault::Throttled { retry_after: Some(1) });
    let http = client();
    // The first 429 comes after this, the resend a second after it, and the
    // second 429, remembered for its second, lifts no sooner than 2 s after this.
    let sent = Instant::now();
    let response = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 429, "the second 429 is passed on");
    assert_eq!(sandbox.count("GET", "/api/me"), 2, "sent once more, not twice");
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_upstream_429_total{credential="ops"}"#), 2.0);
    // Remembered: the next call waits it out (at most 2 s) rather than go at once.
    assert_eq!(http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(), 200);
    assert!(sent.elapsed() >= Duration::from_secs(2), "held back: {:?}", sent.elapsed());
    assert_eq!(sandbox.count("GET", "/api/me"), 3);
}

/// `retry_429_max_wait_ms = 0` (the default) means a 429 is never waited out,
/// even one whose `Retry-After` is 0 or a date already past, and even when the
/// request's body is kept for a retry.
#[tokio::test]
async fn with_no_429_wait_a_retry_after_of_zero_is_passed_on_too() {
    let sandbox = start_sandbox().await;
    let retry = table([("attempts", 3.into()), ("backoff_ms", 10.into())]);
    let (proxy, _dir) = proxy(config(&sandbox.base_url(), |id| id).set("upstream", "retry", retry)).await;
    sandbox.fail_api("/api/me", 1, ApiFault::Throttled { retry_after: Some(0) });
    let response = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 429, "passed on");
    assert_eq!(sandbox.count("GET", "/api/me"), 1, "never sent again");
}

#[tokio::test]
async fn get_is_retried_on_a_503_and_post_never() {
    let sandbox = start_sandbox().await;
    let retry = table([("attempts", 3.into()), ("backoff_ms", 10.into())]);
    let (proxy, _dir) = proxy(config(&sandbox.base_url(), |id| id).set("upstream", "retry", retry)).await;
    let http = client();
    sandbox.fail_api("/api/me", 2, ApiFault::Status(503));
    assert_eq!(http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(), 200);
    assert_eq!(sandbox.count("GET", "/api/me"), 3, "two 503s, then the answer");

    let tasks = format!("/api/organizations/{ORG_ID}/tasks");
    sandbox.fail_api("/tasks", 1, ApiFault::Status(503));
    let body = serde_json::json!({ "title": "Q3", "task_type": "task" });
    let posted = http.post(url(&proxy, &tasks)).json(&body).send().await.expect("answered");
    assert_eq!(posted.status(), 503, "Tallyfy's 503 is passed on");
    assert_eq!(sandbox.count("POST", &tasks), 1, "a POST is never sent twice");
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_upstream_retries_total{reason="503"}"#), 2.0);
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let down = closed_port();
    let retry = table([("attempts", 3.into()), ("backoff_ms", 10.into())]);
    let (proxy, _dir) =
        proxy(config(&format!("http://{}", down.addr), |id| id).set("upstream", "retry", retry)).await;
    let response = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 502);
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_upstream_retries_total{reason="connect"}"#), 2.0);
}

/// An upstream that accepts connections and closes them at once, counting them.
async fn hanging_up_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn the_budget_stops_retries_when_the_upstream_is_down() {
    let (upstream, accepted) = hanging_up_upstream().await;
    let retry = table([("attempts", 3.into()), ("backoff_ms", 1.into()), ("budget_percent", 20.into())]);
    let (proxy, _dir) =
        proxy(config(&format!("http://{upstream}"), |id| id).set("upstream", "retry", retry)).await;
    let http = client();
    let requests = 60;
    for _ in 0..requests {
        let status = http.get(url(&proxy, "/api/me")).send().await.expect("answered").status();
        assert_eq!(status, 502);
    }
    let attempts = accepted.load(Ordering::SeqCst);
    // Without a budget: 3 sends each, 180. With it: the requests, plus 20 % of
    // them or the 10 every window allows, whichever is more (12 here).
    assert!((requests..=requests + 15).contains(&attempts), "{attempts} connections for {requests} requests");
    let metrics = scrape(proxy.admin_addr()).await;
    assert!(sample(&metrics, "tallyfy_proxy_retry_budget_exhausted_total") >= 40.0, "{metrics}");
}

#[tokio::test]
async fn unprefixed_paths_get_the_same_checks_policy_and_limits_and_links_in_their_style() {
    let sandbox = start_sandbox().await;
    let paths =
        Value::from(vec!["/api/me", "/api/organizations/{org}/runs", "/api/organizations/{org}/guests"]);
    let cap = limit("guest-invites", "POST", "/api/organizations/{org}/guests", 1, 3600);
    let config = with_limits(config(&sandbox.base_url(), |id| id.with("paths", paths)), vec![cap]).set(
        "listen",
        "unprefixed",
        true,
    );
    let (proxy, _dir) = proxy(config).await;
    let http = client();

    assert_eq!(http.get(url(&proxy, "/me")).send().await.expect("answered").status(), 200);
    assert_eq!(sandbox.received().last().expect("forwarded").uri, "/api/me", "Tallyfy sees /api/me");
    assert_eq!(http.get(url(&proxy, "/api/me")).send().await.expect("answered").status(), 200, "both styles");

    let tasks =
        http.get(url(&proxy, &format!("/organizations/{ORG_ID}/tasks"))).send().await.expect("answered");
    assert_eq!(tasks.status(), 403, "the identity's paths apply");
    let oauth = http.post(url(&proxy, "/oauth/token")).send().await.expect("answered");
    assert_eq!(oauth.status(), 403, "/oauth/token is /api/oauth/token: refused");

    let runs = http
        .get(url(&proxy, &format!("/organizations/{ORG_ID}/runs?per_page=2")))
        .send()
        .await
        .expect("answered");
    assert_eq!(runs.status(), 200);
    let body: serde_json::Value = runs.json().await.expect("JSON");
    let next = body["meta"]["pagination"]["links"]["next"].as_str().expect("a next link").to_owned();
    let expected = format!("http://{}/organizations/{ORG_ID}/runs?", proxy.proxy_addr());
    assert!(next.starts_with(&expected), "the link keeps the caller's style: {next}");
    assert_eq!(http.get(&next).send().await.expect("answered").status(), 200, "and works");

    let unprefixed_guests = format!("/organizations/{ORG_ID}/guests");
    let body = serde_json::json!({ "email": "guest@example.com" });
    let first = http.post(url(&proxy, &unprefixed_guests)).json(&body).send().await.expect("answered");
    assert_ne!(first.status(), 429);
    let second = http.post(url(&proxy, &guests(ORG_ID))).json(&body).send().await.expect("answered");
    assert_eq!(second.status(), 429, "one window for both spellings");
}

/// An upstream that accepts connections and never answers, counting them.
async fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn requests_over_max_in_flight_get_503_with_retry_after_and_are_never_sent() {
    let (upstream, accepted) = silent_upstream().await;
    let (proxy, _dir) = proxy(config(&format!("http://{upstream}"), |id| id.with("max_in_flight", 2)).set(
        "upstream",
        "request_timeout_ms",
        30_000,
    ))
    .await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let request = client().get(url(&proxy, "/api/me")).send();
            tokio::spawn(request)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "both requests reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_in_flight", "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the third never left the proxy");
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_local_rejections_total{reason="too_many_in_flight"}"#), 1.0);
    held.iter().for_each(tokio::task::JoinHandle::abort);
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_window_and_restarts_a_changed_one() {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("proxy.toml");
    let text = |max: i64, comment: &str| {
        let cap = limit("guest-invites", "POST", "/api/organizations/{org}/guests", max, 3600);
        let config = TestConfig::new(&sandbox.base_url())
            .credential(Credential::personal("ops", Secret::File("token")))
            .identity(Identity::new("billing", "ops", Match::Any));
        format!("# {comment}\n{}", with_limits(config, vec![cap]).text())
    };
    // From a file: a reload reads secrets from the process, not the tests' table.
    std::fs::write(dir.path().join("token"), PERSONAL_TOKEN).expect("write");
    std::fs::write(&file, text(1, "v0")).expect("write");
    let loaded = tallyfy_proxy::config::Config::parse(&text(1, "v0"), &file, &support::env).expect("valid");
    let proxy = start_proxy(&loaded).await;
    let http = client();
    let applied = |proxy: &Running| {
        let label = tallyfy_proxy::metrics::OutcomeLabel { outcome: "applied".to_owned() };
        proxy.metrics().config_reloads.get_or_create(&label).get()
    };
    let reload = |text: String, count: u64| {
        std::fs::write(&file, text).expect("write");
        let deadline = Instant::now() + Duration::from_secs(10);
        let proxy = &proxy;
        async move {
            while applied(proxy) < count {
                assert!(Instant::now() < deadline, "reload {count} applied");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_ne!(post_guest(&http, &proxy, ORG_ID).await.status(), 429);
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 429);

    reload(text(1, "v1: the same limit"), 1).await;
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 429, "the hour's window survived");

    reload(text(2, "v2: a new limit"), 2).await;
    assert_ne!(post_guest(&http, &proxy, ORG_ID).await.status(), 429, "a changed rule counts afresh");
    assert_eq!(sandbox.count("POST", &guests(ORG_ID)), 2);
}

/// A request the proxy refuses after the limits counted it (here a body whose
/// `_method` cannot be read, a 400 found only once the body is read) never
/// reached Tallyfy: it gives its count back. Two refused requests leave a
/// 2-per-minute cap whole for two that go; the third is 429.
#[tokio::test]
async fn requests_refused_before_sending_spend_no_limit() {
    let sandbox = start_sandbox().await;
    let narrow = |id: Identity| id.with("methods", vec!["GET", "POST"]);
    let config = with_limits(
        config(&sandbox.base_url(), narrow),
        vec![limit("guest-invites", "POST", "/api/organizations/{org}/guests", 2, 60)],
    );
    let (proxy, _dir) = proxy(config).await;
    let http = client();
    for _ in 0..2 {
        let unreadable = serde_json::json!({ "email": "guest@example.com", "_method": "1" });
        let response =
            http.post(url(&proxy, &guests(ORG_ID))).json(&unreadable).send().await.expect("answered");
        assert_eq!(response.status(), 400, "an override that names no method");
    }
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 201, "the refused spent nothing");
    // Tallyfy's own answer (the guest exists now), not the cap's.
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 422);
    assert_eq!(post_guest(&http, &proxy, ORG_ID).await.status(), 429, "two went: the cap is reached");
    assert_eq!(sandbox.count("POST", &guests(ORG_ID)), 2);
}

/// A request that waits out a short 429 goes with the credential's token at
/// the end of its wait, or not at all: when the token expired meanwhile (its
/// refreshes failing), the caller gets 503 `token_unavailable` and Tallyfy
/// sees nothing, as for a request that arrives then. Both waits: the one that
/// met the 429 (absorbed) and one that arrived while it was remembered.
#[tokio::test]
async fn a_request_whose_token_expired_while_it_waited_is_not_sent_with_it() {
    let sandbox = sandbox_with_tokens_of(Duration::from_secs(2)).await;
    let config = user_config(&sandbox).set("upstream", "retry_429_max_wait_ms", 5000);
    let (proxy, _dir) = proxy(config).await;
    sandbox.set_token_fault(Some(tallyfy_sandbox::TokenFault::ServerError));
    sandbox.fail_api("/api/me", 1, ApiFault::Throttled { retry_after: Some(3) });
    let http = client();
    let absorbed = http.get(url(&proxy, "/api/me")).send();
    let waited = async {
        // Arrives once the 429 is remembered: it waits too.
        let series = r#"tallyfy_proxy_upstream_429_total{credential="user"}"#;
        while sample(&scrape(proxy.admin_addr()).await, series) < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        http.get(url(&proxy, "/api/me")).send().await
    };
    let (absorbed, waited) = tokio::join!(absorbed, waited);
    for response in [absorbed, waited] {
        let response = response.expect("answered");
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "token_unavailable", "{body}");
    }
    assert_eq!(sandbox.count("GET", "/api/me"), 1, "only the first send, before the token expired");
}

/// A request replayed with a fresh token after a dead one that meets a 429 is
/// sent as any request is: the 429 is remembered and counted, and the next
/// call is answered by the proxy instead of going to a throttling Tallyfy.
#[tokio::test]
async fn a_429_to_a_replay_after_a_dead_token_is_remembered() {
    let sandbox = start_sandbox().await;
    let (proxy, _dir) = proxy(user_config(&sandbox)).await;
    sandbox.fail_api("/api/me", 1, ApiFault::Status(401));
    sandbox.fail_api("/api/me", 1, ApiFault::Throttled { retry_after: Some(30) });
    let http = client();
    let response = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 429, "the replay's answer");
    assert_eq!(sandbox.count("GET", "/api/me"), 2, "sent, then replayed once");
    let metrics = scrape(proxy.admin_addr()).await;
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_token_replays_total{credential="user"}"#), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, r#"tallyfy_proxy_upstream_429_total{credential="user"}"#), 1.0, "{metrics}");
    let next = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(next.status(), 429, "held back by the proxy");
    assert!(next.headers()["retry-after"].to_str().expect("text").parse::<u64>().expect("seconds") <= 30);
    assert_eq!(sandbox.count("GET", "/api/me"), 2, "Tallyfy did not see it");
}

/// An upstream whose first answer is a 429 (`Retry-After: 30`) that promises
/// 100 bytes and sends none; it counts the requests it gets.
async fn stalling_429_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            if matches!(stream.read(&mut head).await, Ok(n) if n > 0) {
                count.fetch_add(1, Ordering::SeqCst);
                let answer =
                    "HTTP/1.1 429 Too Many Requests\r\nretry-after: 30\r\ncontent-length: 100\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
            }
            held.push(stream);
        }
    });
    (addr, requests)
}

/// A 429 whose body stalls is still remembered (as a burst throttle: its
/// body could not tell an hourly cap), and passed on, empty, once the request
/// timeout ends the wait for its body.
#[tokio::test]
async fn a_429_whose_body_stalls_is_remembered_all_the_same() {
    let (upstream, requests) = stalling_429_upstream().await;
    let config = config(&format!("http://{upstream}"), |id| id).set("upstream", "request_timeout_ms", 300);
    let (proxy, _dir) = proxy(config).await;
    let http = client();
    let first = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["content-length"], "0", "its body could not be read");
    let next = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(next.status(), 429, "remembered");
    let body: serde_json::Value = next.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "the second never reached Tallyfy");
}

/// An API that holds each request until `together` have come, then answers
/// them all 429 without `Retry-After` (Tallyfy throttling a burst that was in
/// flight at once); the requests it got are counted.
async fn throttling_all_at_once(together: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let received = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(together));
    let count = received.clone();
    let addr = support::api(move |_request| {
        let (count, barrier) = (count.clone(), barrier.clone());
        async move {
            if count.fetch_add(1, Ordering::SeqCst) < together {
                barrier.wait().await;
            }
            support::answer(429, b"{}")
        }
    })
    .await;
    (addr, received)
}

/// Seven requests in flight when Tallyfy began throttling, answered 429
/// without `Retry-After`, are one episode: the credential is held back the
/// first wait (1 s), not doubled for each (they held it back for 60 s).
#[tokio::test]
async fn the_429s_of_requests_in_flight_together_hold_back_for_one_wait() {
    let (upstream, received) = throttling_all_at_once(7).await;
    let (proxy, _dir) = proxy(config(&format!("http://{upstream}"), |id| id)).await;
    let http = client();
    let burst = (0..7).map(|n| {
        let (http, url) = (http.clone(), url(&proxy, &format!("/api/organizations/{ORG_ID}/runs?n={n}")));
        tokio::spawn(async move { http.get(url).send().await.expect("answered").status() })
    });
    for sent in futures_util::future::join_all(burst).await {
        assert_eq!(sent.expect("task"), 429, "Tallyfy's 429, passed on");
    }
    assert_eq!(received.load(Ordering::SeqCst), 7);
    let after = http.get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(after.status(), 429, "held back by the proxy");
    assert_eq!(after.headers()["retry-after"], "1", "the first wait, not one doubled per request");
    assert_eq!(received.load(Ordering::SeqCst), 7, "nothing sent meanwhile");
}

/// Two requests open under `max_in_flight = 2`, a reload that lifts the
/// limit, one that sets it again: the two still count, and a third is
/// refused. The limit set again counted from zero: four were open at once.
#[tokio::test]
async fn max_in_flight_set_again_by_a_reload_counts_the_requests_still_open() {
    let (upstream, accepted) = silent_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("proxy.toml");
    std::fs::write(dir.path().join("token"), PERSONAL_TOKEN).expect("write");
    let text = |max: Option<i64>, comment: &str| {
        let identity = Identity::new("billing", "ops", Match::Any);
        let identity = match max {
            Some(max) => identity.with("max_in_flight", max),
            None => identity,
        };
        let config = TestConfig::new(&format!("http://{upstream}"))
            .set("upstream", "request_timeout_ms", 30_000)
            .credential(Credential::personal("ops", Secret::File("token")))
            .identity(identity);
        format!("# {comment}\n{}", config.text())
    };
    std::fs::write(&file, text(Some(2), "v0")).expect("write");
    let loaded =
        tallyfy_proxy::config::Config::parse(&text(Some(2), "v0"), &file, &support::env).expect("valid");
    let proxy = start_proxy(&loaded).await;
    let applied = || {
        let label = tallyfy_proxy::metrics::OutcomeLabel { outcome: "applied".to_owned() };
        proxy.metrics().config_reloads.get_or_create(&label).get()
    };
    let wait_until = async |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(client().get(url(&proxy, "/api/me")).send())).collect();
    wait_until("both requests reached the upstream", &|| accepted.load(Ordering::SeqCst) == 2).await;

    std::fs::write(&file, text(None, "v1: no limit")).expect("write");
    wait_until("the limit is lifted", &|| applied() >= 1).await;
    std::fs::write(&file, text(Some(2), "v2: the limit again")).expect("write");
    wait_until("the limit is set again", &|| applied() >= 2).await;

    let refused = client().get(url(&proxy, "/api/me")).send().await.expect("answered");
    assert_eq!(refused.status(), 503, "the two still open fill the limit");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "nothing more reached the upstream");
    held.iter().for_each(tokio::task::JoinHandle::abort);
}
