//! Running it like infrastructure: Prometheus metrics after a scripted session,
//! and request ids kept, generated, sent upstream and returned.

mod support;

use std::time::Duration;

use support::{Credential, Identity, Match, Stack, TestConfig, client, start_proxy, start_sandbox_with};
use tallyfy_sandbox::SandboxConfig;
use tallyfy_sandbox::fixtures::ORG_ID;

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_a_scripted_session() {
    let stack = Stack::start().await;
    let http = &stack.client;
    for _ in 0..3 {
        assert_eq!(http.get(stack.url("/api/me")).send().await.expect("answered").status(), 200);
    }
    assert_eq!(http.get(stack.url("/nope")).send().await.expect("answered").status(), 404);
    let created = http
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/tasks")))
        .json(&serde_json::json!({"title": "t", "deadline": "not a date"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(created.status(), 422, "Tallyfy's own 4xx passes through");
    let dated = http
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/tasks")))
        .json(&serde_json::json!({"title": "t", "deadline": "2025-09-30T17:00:00Z", "started_at": "2025-09-01"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(dated.status(), 201);
    let page = http
        .get(stack.url(&format!("/api/organizations/{ORG_ID}/runs?per_page=5")))
        .send()
        .await
        .expect("answered");
    assert_eq!(page.status(), 200);
    page.bytes().await.expect("body");

    let text = support::scrape(stack.proxy.admin_addr()).await;
    let requests = |labels: &str| sample(&text, &format!("tallyfy_proxy_requests_total{{{labels}}}"));
    assert_eq!(requests(r#"identity="local-app",method="GET",status_class="2xx""#), Some(4.0), "{text}");
    assert_eq!(requests(r#"identity="local-app",method="POST",status_class="4xx""#), Some(1.0), "{text}");
    assert_eq!(requests(r#"identity="local-app",method="POST",status_class="2xx""#), Some(1.0), "{text}");
    assert_eq!(sample(&text, "tallyfy_proxy_dates_rewritten_total"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "tallyfy_proxy_links_rewritten_total"),
        Some(1.0),
        "next only on page 1: {text}"
    );
    assert_eq!(requests(r#"identity="-",method="GET",status_class="4xx""#), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, r#"tallyfy_proxy_local_rejections_total{reason="not_proxied"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"tallyfy_proxy_upstream_duration_seconds_count{identity="local-app"}"#),
        Some(6.0),
        "{text}"
    );
    assert_eq!(sample(&text, "tallyfy_proxy_requests_in_flight"), Some(0.0), "{text}");
    assert!(!text.contains("/api/me"), "no paths in labels");
}

#[tokio::test]
async fn the_token_expiry_gauge_is_exported_and_refreshes_and_replays_are_counted() {
    let sandbox = start_sandbox_with(SandboxConfig {
        token_lifetime: Duration::from_secs(600),
        ..SandboxConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::new(&sandbox.base_url())
        .credential(Credential::fixture_app())
        .credential(Credential::fixture_user())
        .identity(Identity::new("all", "user", Match::Any));
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let scrape = || support::scrape(proxy.admin_addr());
    let first = scrape().await;
    let gauge = r#"tallyfy_proxy_token_expiry_seconds{credential="user"}"#;
    let before = sample(&first, gauge).expect("the gauge is exported");
    // Read at scrape time (how it moves with the clock: metrics' unit test).
    assert!(before > 590.0 && before <= 600.0, "{before}");
    assert_eq!(
        sample(&first, r#"tallyfy_proxy_token_refresh_attempts_total{credential="user"}"#),
        Some(1.0),
        "{first}"
    );

    sandbox.revoke_all_tokens();
    assert_eq!(
        client()
            .get(format!("http://{}/api/me", proxy.proxy_addr()))
            .send()
            .await
            .expect("answered")
            .status(),
        200
    );
    let text = scrape().await;
    assert_eq!(sample(&text, r#"tallyfy_proxy_token_replays_total{credential="user"}"#), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, r#"tallyfy_proxy_token_refresh_attempts_total{credential="user"}"#),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_sent_upstream_and_returned() {
    let stack = Stack::start().await;
    let kept = stack
        .client
        .get(stack.url("/api/me"))
        .header("x-request-id", "legacy-42")
        .send()
        .await
        .expect("answered");
    assert_eq!(kept.headers()["x-request-id"], "legacy-42");
    assert_eq!(stack.sandbox.received().last().expect("forwarded").headers["x-request-id"], "legacy-42");

    let generated = stack.client.get(stack.url("/api/me")).send().await.expect("answered");
    let id = generated.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let (prefix, counter) = id.split_once('-').expect("prefix-counter");
    assert!(prefix.len() == 16 && !counter.is_empty(), "a process prefix and a counter: {id}");
    assert_eq!(stack.sandbox.received().last().expect("forwarded").headers["x-request-id"], id.as_str());

    let refused = stack.client.get(stack.url("/nope")).send().await.expect("answered");
    assert!(refused.headers().contains_key("x-request-id"), "local errors carry one too");
}
