//! Each credential kind end to end, and the background refresher under stress:
//! short token lifetimes, a token endpoint that is down or answers garbage,
//! rotating refresh tokens, and many requests rejected at once.

mod support;

use std::time::{Duration, Instant};

use support::{
    Credential, Identity, Match, TestConfig, client, ready_within, start_proxy, start_proxy_unready,
    start_sandbox_with, table,
};
use tallyfy_proxy::app::Running;
use tallyfy_sandbox::fixtures::{APP_USER_EMAIL, NEW_USER_EMAIL, ORG_ID, OTHER_ORG_ID, USERNAME};
use tallyfy_sandbox::{Sandbox, SandboxConfig, TokenFault};

fn sandbox_config(lifetime: Duration) -> SandboxConfig {
    SandboxConfig { token_lifetime: lifetime, user_token_lifetime: lifetime, ..SandboxConfig::default() }
}

/// Fast retries, so recovery tests finish quickly.
fn fast_retries(config: TestConfig) -> TestConfig {
    let timers = [("retry_min_ms", 50), ("retry_max_ms", 400), ("fetch_timeout_ms", 2000)];
    timers.into_iter().fold(config, |config, (key, ms)| config.set("tokens", key, ms))
}

/// OAuth credentials plus an `application_user`, with one identity per credential
/// chosen by an `X-Api-Key` (the key is the identity's name).
fn config(base_url: &str, provision_email: Option<&str>) -> TestConfig {
    let minted = match provision_email {
        Some(email) => Credential::application_user("minted", "app", ORG_ID, email).with(
            "provision",
            table([("first_name", "New".into()), ("last_name", "User".into()), ("role", "light".into())]),
        ),
        None => Credential::application_user("minted", "app", ORG_ID, APP_USER_EMAIL),
    };
    let mut config = fast_retries(TestConfig::new(base_url))
        .credential(Credential::fixture_app())
        .credential(Credential::fixture_user())
        .credential(minted);
    for (identity, credential) in
        [("app-caller", "app"), ("user-caller", "user"), ("minted-caller", "minted")]
    {
        config = config.identity(Identity::new(identity, credential, Match::ApiKey(identity)));
    }
    config
}

struct Setup {
    sandbox: Sandbox,
    proxy: Running,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(lifetime: Duration, provision_email: Option<&str>, wait_ready: bool) -> Setup {
        let sandbox = start_sandbox_with(sandbox_config(lifetime)).await;
        Self::start_with(sandbox, provision_email, wait_ready).await
    }

    async fn start_with(sandbox: Sandbox, provision_email: Option<&str>, wait_ready: bool) -> Setup {
        let dir = tempfile::tempdir().expect("dir");
        let config = config(&sandbox.base_url(), provision_email).parse(dir.path());
        let proxy = if wait_ready { start_proxy(&config).await } else { start_proxy_unready(&config).await };
        Setup { sandbox, proxy, http: client(), _dir: dir }
    }

    async fn get(&self, caller: &str, path: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}{path}", self.proxy.proxy_addr()))
            .header("x-api-key", caller)
            .send()
            .await
            .expect("the proxy answers")
    }

    fn token_calls(&self) -> usize {
        self.sandbox.token_requests().len()
    }
}

const ME: &str = "/api/me";

fn my_tasks() -> String {
    format!("/api/organizations/{ORG_ID}/me/tasks")
}

#[tokio::test]
async fn each_credential_kind_works_end_to_end() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;

    let me = setup.get("user-caller", ME).await;
    assert_eq!(me.status(), 200);
    let body = me.text().await.expect("body");
    assert!(body.contains(USERNAME), "the password credential acts as its user: {body}");

    let minted = setup.get("minted-caller", &my_tasks()).await;
    assert_eq!(minted.status(), 200, "the application-minted user token works on user routes");

    // The application token is for /applications routes; the proxy mints with it itself.
    let grants: Vec<String> = setup.sandbox.token_requests().iter().map(|t| t.grant.clone()).collect();
    for grant in ["client_credentials", "password", "user_token"] {
        assert!(grants.iter().any(|g| g == grant), "{grant} in {grants:?}");
    }
    // Every call to Tallyfy carries the client header, the token endpoint's too.
    let received = setup.sandbox.received();
    let token_calls = received.iter().filter(|r| r.uri.ends_with("/oauth/token")).count();
    assert!(token_calls >= 2, "the grants were seen: {token_calls}");
    for request in &received {
        assert_eq!(
            request.headers.get("x-tallyfy-client").map(|v| v.as_bytes()),
            Some(&b"APIClient"[..]),
            "{}",
            request.uri
        );
    }
    let app = setup
        .http
        .post(format!(
            "http://{}/api/applications/{ORG_ID}/users/{}/token",
            setup.proxy.proxy_addr(),
            APP_USER_EMAIL.replace('@', "%40")
        ))
        .header("x-api-key", "app-caller")
        .send()
        .await
        .expect("answered");
    assert_eq!(app.status(), 200, "the application token reaches application routes");
}

#[tokio::test]
async fn a_missing_user_is_provisioned_then_minted() {
    let setup = Setup::start(Duration::from_secs(3600), Some(NEW_USER_EMAIL), true).await;
    assert_eq!(setup.get("minted-caller", ME).await.status(), 200);
    let created = setup
        .sandbox
        .received()
        .iter()
        .any(|r| r.method == http::Method::POST && r.uri == format!("/api/applications/{ORG_ID}/users"));
    assert!(created, "the proxy created the user before minting its token");
}

#[tokio::test]
async fn tokens_are_refreshed_before_expiry_under_continuous_traffic() {
    // Four-second tokens (a refresh has most of a second to finish on a loaded
    // machine), traffic until each kind was refreshed twice (about 7 s; the
    // schedule itself is tested on a paused clock in tokens::refresh).
    let setup = Setup::start(Duration::from_secs(4), None, true).await;
    let grants =
        || -> Vec<String> { setup.sandbox.token_requests().iter().map(|t| t.grant.clone()).collect() };
    let count = |grants: &[String], grant: &str| grants.iter().filter(|g| *g == grant).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut requests = 0;
    loop {
        let seen = grants();
        if count(&seen, "refresh_token") >= 2 && count(&seen, "user_token") >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "two refreshes of each token within 30 s: {seen:?}");
        for (caller, path) in [("user-caller", ME.to_owned()), ("minted-caller", my_tasks())] {
            let response = setup.get(caller, &path).await;
            assert_eq!(response.status(), 200, "request {requests} by {caller} failed");
            requests += 1;
        }
    }
    let grants = grants();
    assert_eq!(
        grants.iter().filter(|g| *g == "password").count(),
        1,
        "no fallback to the password grant was needed"
    );
    assert_eq!(setup.sandbox.double_redemptions(), 0, "no refresh token was redeemed twice");
    assert!(requests > 20, "traffic kept flowing ({requests} requests)");
}

#[tokio::test]
async fn a_token_endpoint_down_at_start_means_not_ready_then_ready() {
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3600))).await;
    sandbox.set_token_fault(Some(TokenFault::Maintenance));
    let setup = Setup::start_with(sandbox, None, false).await;
    let readyz = format!("http://{}/readyz", setup.proxy.admin_addr());

    // The proxy keeps trying; every attempt so far has been refused.
    wait_for(|| setup.token_calls() >= 3).await;
    let response = setup.http.get(&readyz).send().await.expect("answered");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert!(body["credentials"].as_array().expect("names").iter().any(|n| n == "user"), "{body}");

    let refused = setup.get("user-caller", ME).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "token_unavailable");

    setup.sandbox.set_token_fault(None);
    ready_within(&setup.proxy, Duration::from_secs(10)).await;
    assert_eq!(setup.http.get(&readyz).send().await.expect("answered").status(), 200);
    assert_eq!(setup.get("user-caller", ME).await.status(), 200);
}

#[tokio::test]
async fn mid_life_outage_serves_until_expiry_then_503_then_recovers() {
    let setup = Setup::start(Duration::from_secs(2), None, true).await;
    setup.sandbox.set_token_fault(Some(TokenFault::ServerError));
    let user = tallyfy_proxy::tokens::CredentialId::new(1);
    assert_eq!(&*setup.proxy.tokens().name(user), "user");
    let expires_at = setup.proxy.tokens().expires_at(user).expect("an OAuth token has an expiry").into_std();
    // The held token keeps serving while refreshes fail...
    assert_eq!(setup.get("user-caller", ME).await.status(), 200);
    // ...until it really expires; then callers get 503, never an expired token.
    let started = Instant::now();
    loop {
        let asked = Instant::now();
        let status = setup.get("user-caller", ME).await.status();
        if status == 503 {
            assert!(asked >= expires_at - Duration::from_millis(50), "503 only once the token has expired");
            break;
        }
        // A request that left the proxy just before the expiry can reach
        // Tallyfy just after it: Tallyfy's 401, for that one request only.
        let in_flight_at_expiry = status == 401 && asked + Duration::from_millis(500) >= expires_at;
        assert!(status == 200 || in_flight_at_expiry, "only 200 or, after expiry, 503: {status}");
        assert!(started.elapsed() < Duration::from_secs(10), "the token should have expired by now");
        tokio::time::sleep(Duration::from_millis(50)).await; // pacing the poll, not waiting for readiness
    }
    setup.sandbox.set_token_fault(None);
    ready_within(&setup.proxy, Duration::from_secs(10)).await;
    assert_eq!(setup.get("user-caller", ME).await.status(), 200);
}

#[tokio::test]
async fn garbage_empty_and_broken_token_responses_are_recovered_from() {
    for fault in [
        TokenFault::Garbage,
        TokenFault::Empty,
        TokenFault::MissingToken,
        TokenFault::Oversized,
        TokenFault::ServerError,
        TokenFault::Drop,
    ] {
        let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3600))).await;
        sandbox.set_token_fault(Some(fault.clone()));
        let setup = Setup::start_with(sandbox, None, false).await;
        wait_for(|| setup.token_calls() >= 2).await;
        assert_eq!(setup.get("user-caller", ME).await.status(), 503, "{fault:?}: nothing usable yet");
        setup.sandbox.set_token_fault(None);
        ready_within(&setup.proxy, Duration::from_secs(10)).await;
        assert_eq!(setup.get("user-caller", ME).await.status(), 200, "{fault:?}: recovered");
    }
}

/// `expires_in: 18446744073709551615` (and a JWT `exp` as far off): the
/// lifetime is read as ten years, so the refresher's clock arithmetic holds,
/// and it lives on to refresh a token Tallyfy then rejects.
#[tokio::test]
async fn an_endless_token_lifetime_is_capped_and_the_refresher_lives_on() {
    let setup = Setup::start(Duration::from_secs(u64::MAX), None, false).await;
    ready_within(&setup.proxy, Duration::from_secs(10)).await;
    assert_eq!(setup.get("user-caller", ME).await.status(), 200);
    let before = setup.token_calls();
    setup.sandbox.set_token_lifetime(Duration::from_secs(3600));
    setup.sandbox.revoke_all_tokens();
    assert_eq!(setup.get("user-caller", ME).await.status(), 200, "refreshed and replayed");
    assert!(setup.token_calls() > before, "the refresher fetched again");
}

#[tokio::test]
async fn a_hundred_rejected_requests_cause_one_refresh_and_all_succeed() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    let password_fetches = |s: &Setup| {
        s.sandbox
            .token_requests()
            .iter()
            .filter(|t| t.grant == "refresh_token" || t.grant == "password")
            .count()
    };
    let before = password_fetches(&setup);
    setup.sandbox.revoke_all_tokens();

    let requests = (0..100).map(|_| setup.get("user-caller", ME));
    let responses = futures_util::future::join_all(requests).await;
    for response in &responses {
        assert_eq!(response.status(), 200, "replayed with the fresh token");
    }
    assert_eq!(password_fetches(&setup) - before, 1, "exactly one refresh for 100 rejections");
    assert_eq!(setup.sandbox.double_redemptions(), 0);
}

#[tokio::test]
async fn a_streamed_body_is_not_replayed_and_the_401_goes_back() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    setup.sandbox.revoke_all_tokens();
    let chunks = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"chunk"))),
    );
    let response = setup
        .http
        .post(format!("http://{}/api/organizations/{ORG_ID}/file", setup.proxy.proxy_addr()))
        .header("x-api-key", "user-caller")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 401, "a body that was not kept cannot be sent twice");
    // The rejection still triggered a refresh, by itself.
    let refreshed =
        |s: &Setup| s.sandbox.token_requests().iter().filter(|t| t.grant == "refresh_token").count();
    wait_for(|| refreshed(&setup) == 1).await;
    let next = setup.get("user-caller", ME).await;
    assert_eq!(next.status(), 200);
}

#[tokio::test]
async fn a_refused_refresh_token_falls_back_to_the_password_grant() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    setup.sandbox.revoke_refresh_tokens();
    setup.sandbox.revoke_all_tokens();
    assert_eq!(setup.get("user-caller", ME).await.status(), 200, "replayed after the fallback");
    let user_grants: Vec<(String, u16)> = setup
        .sandbox
        .token_requests()
        .iter()
        .filter(|t| t.grant == "password" || t.grant == "refresh_token")
        .map(|t| (t.grant.clone(), t.answered))
        .collect();
    let expected =
        [("password", 200), ("refresh_token", 400), ("password", 200)].map(|(g, s)| (g.to_owned(), s));
    assert_eq!(user_grants, expected);
    assert_eq!(setup.sandbox.double_redemptions(), 0);
}

#[tokio::test]
async fn a_kept_json_body_is_replayed_byte_for_byte() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    setup.sandbox.revoke_all_tokens();
    let body = r#"{"title":"Replayed task", "deadline":"2025-30-09 17:00:00"}"#;
    let response = setup
        .http
        .post(format!("http://{}/api/organizations/{ORG_ID}/tasks", setup.proxy.proxy_addr()))
        .header("x-api-key", "user-caller")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 201);
    let posts: Vec<_> = setup.sandbox.received().into_iter().filter(|r| r.uri.ends_with("/tasks")).collect();
    assert_eq!(posts.len(), 2, "sent, rejected, sent again");
    assert_eq!(posts[0].body, body.as_bytes());
    assert_eq!(posts[1].body, body.as_bytes());
    assert_ne!(posts[0].headers["authorization"], posts[1].headers["authorization"], "with a new token");
}

#[tokio::test]
async fn a_403_is_a_business_rule_not_a_dead_token() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    let before = setup.token_calls();
    let response = setup.get("user-caller", &format!("/api/organizations/{OTHER_ORG_ID}/tasks")).await;
    assert_eq!(response.status(), 403);
    assert_eq!(setup.token_calls(), before, "no refresh for a 403");
    let sent = setup.sandbox.received().iter().filter(|r| r.uri.contains(OTHER_ORG_ID)).count();
    assert_eq!(sent, 1, "and no replay");
}

#[tokio::test]
async fn rejections_force_at_most_one_refresh_per_interval() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    let refreshes =
        |s: &Setup| s.sandbox.token_requests().iter().filter(|t| t.grant == "refresh_token").count();
    setup.sandbox.revoke_all_tokens();
    assert_eq!(setup.get("user-caller", ME).await.status(), 200, "the first rejection refreshes");
    assert_eq!(refreshes(&setup), 1);
    setup.sandbox.revoke_all_tokens();
    // A second rejection right after: declined (min_forced_refresh_interval), so
    // the caller gets Tallyfy's 401 at once rather than a refresh per request.
    assert_eq!(setup.get("user-caller", ME).await.status(), 401);
    assert_eq!(refreshes(&setup), 1, "no second forced refresh within the interval");
}

/// Polls `done` until it holds, at most 10 s. For conditions only the sandbox can
/// observe (how many token calls it has seen).
async fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_dead_application_token_is_renewed_and_the_user_re_minted() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    let before = setup.sandbox.token_requests().len();
    setup.sandbox.revoke_all_tokens();
    assert_eq!(
        setup.get("minted-caller", &my_tasks()).await.status(),
        200,
        "replayed with a re-minted token"
    );
    let calls: Vec<(String, u16)> =
        setup.sandbox.token_requests()[before..].iter().map(|t| (t.grant.clone(), t.answered)).collect();
    let expected = [("user_token", 401), ("client_credentials", 200), ("user_token", 200)]
        .map(|(g, s)| (g.to_owned(), s));
    assert_eq!(calls, expected);
}

#[tokio::test]
async fn a_date_rewritten_body_is_replayed_as_rewritten() {
    let setup = Setup::start(Duration::from_secs(3600), None, true).await;
    setup.sandbox.revoke_all_tokens();
    let response = setup
        .http
        .post(format!("http://{}/api/organizations/{ORG_ID}/tasks", setup.proxy.proxy_addr()))
        .header("x-api-key", "user-caller")
        .header("content-type", "application/json")
        .body(r#"{"title":"t","deadline":"2025-09-30T17:00:00Z"}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 201);
    let posts: Vec<_> = setup.sandbox.received().into_iter().filter(|r| r.uri.ends_with("/tasks")).collect();
    assert_eq!(posts.len(), 2);
    for post in &posts {
        assert_eq!(post.body, r#"{"title":"t","deadline":"2025-30-09 17:00:00"}"#.as_bytes());
        assert_eq!(post.headers["content-length"], post.body.len().to_string().as_str());
    }
}

/// Requests that arrive while the proxy fetches its first tokens wait for
/// them instead of a 503: here the token endpoint and the mint take 1.5 s each.
#[tokio::test]
async fn requests_before_the_first_tokens_wait_for_them() {
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3600))).await;
    sandbox.set_token_fault(Some(TokenFault::Slow(Duration::from_millis(1500))));
    let setup = Setup::start_with(sandbox, None, false).await;
    let began = Instant::now();
    let (user, minted) = tokio::join!(setup.get("user-caller", ME), setup.get("minted-caller", ME));
    assert_eq!((user.status().as_u16(), minted.status().as_u16()), (200, 200), "waited for, then served");
    assert!(began.elapsed() >= Duration::from_millis(1000), "they did wait: {:?}", began.elapsed());
    let waiters = |credential: &str| {
        let label = tallyfy_proxy::metrics::CredentialLabel { credential: credential.to_owned() };
        setup.proxy.metrics().single_flight_waiters.get_or_create(&label).get()
    };
    assert_eq!((waiters("user"), waiters("minted")), (1, 1));
}
