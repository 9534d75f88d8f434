//! Tallyfy's official Python SDK (`tallyfy==3.1.0`), pointed at the proxy with an
//! internal API key, works unchanged, configured either way Tallyfy documents
//! its host: `.../api` (go.tallyfy.com style) or without `/api` (api.tallyfy.com
//! style, with `listen.unprefixed`). `./scripts/test` installs the SDK into a
//! virtualenv and sets `TALLYFY_SDK_PYTHON` to its interpreter.

mod support;

use std::process::Command;

use support::{Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, start_proxy, start_sandbox};
use tallyfy_sandbox::fixtures::ORG_ID;

#[tokio::test]
async fn the_official_python_sdk_works_through_an_api_key_identity() {
    let Some(python) = std::env::var_os("TALLYFY_SDK_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: run it through ./scripts/test");
        eprintln!("skipped: TALLYFY_SDK_PYTHON is not set (./scripts/test installs the SDK and sets it)");
        return;
    };
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::new(&sandbox.base_url())
        .set("listen", "unprefixed", true)
        .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
        .identity(Identity::new("python-app", "ops", Match::ApiKey("legacy-sdk-key")));
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/sdk_through_proxy.py");

    for base_url in [format!("http://{}/api", proxy.proxy_addr()), format!("http://{}", proxy.proxy_addr())] {
        sandbox.clear_received();
        let output = tokio::process::Command::from(Command::new(&python))
            .args([script, &base_url, "legacy-sdk-key", ORG_ID])
            .output()
            .await
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{base_url}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the script prints JSON");
        assert_eq!(seen["orgs"], 1, "{base_url}: {seen}");
        assert_eq!(seen["tasks"], 5, "{base_url}: {seen}");
        assert_eq!(seen["runs"], 5, "{base_url}: {seen}");
        assert_eq!(seen["refused_status"], 401, "an unknown key is refused by the proxy: {seen}");

        let received = sandbox.received();
        assert!(received.len() >= 3);
        for request in &received {
            assert!(request.uri.starts_with("/api/"), "{base_url}: Tallyfy sees /api paths: {}", request.uri);
            let client = request.headers["x-tallyfy-client"].to_str().expect("ascii");
            assert_eq!(client, "APIClient", "the SDK's TallyfySDK value was replaced");
            assert!(request.headers.get("authorization").is_some_and(|v| v != "Bearer legacy-sdk-key"));
        }
    }
}
