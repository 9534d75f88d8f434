//! Reloads that should not happen, and reloads that must not cost a request.

use std::path::Path;
use std::time::{Duration, Instant};

use tallyfy_proxy::app::Running;
use tallyfy_proxy::config::Config;
use tallyfy_proxy::metrics::OutcomeLabel;
use tallyfy_sandbox::fixtures::{PASSWORD, PERSONAL_TOKEN, USER_CLIENT_ID, USER_CLIENT_SECRET, USERNAME};

use crate::support::{
    Credential, Identity, Match, Secret, TestConfig, client, env, start_proxy, start_sandbox,
};

fn reloads(proxy: &Running, outcome: &str) -> u64 {
    proxy.metrics().config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).get()
}

fn load(path: &Path) -> Config {
    Config::parse(&std::fs::read_to_string(path).expect("read"), path, &env).expect("valid")
}

/// A personal-token credential reading `token`, and an `any` identity. The
/// `comment` line changes the file's bytes, never its meaning.
fn personal_config(base_url: &str, comment: &str) -> String {
    let config = TestConfig::new(base_url)
        .credential(Credential::personal("ops", Secret::File("token")))
        .identity(Identity::new("app", "ops", Match::Any));
    format!("# {comment}\n{}", config.text())
}

#[tokio::test]
async fn unrelated_files_and_untouched_contents_never_reload_and_a_burst_reloads_once() {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(dir.path().join("token"), PERSONAL_TOKEN).expect("write");
    std::fs::write(&config, personal_config(&sandbox.base_url(), "v0")).expect("write");
    let proxy = start_proxy(&load(&config)).await;

    // The proxy's own log beside its config, an editor's swap file, a rewrite
    // of the config with the very same bytes: none of them is a change.
    for i in 0..20 {
        std::fs::write(dir.path().join("proxy.log"), format!("line {i}\n")).expect("write");
        std::fs::write(dir.path().join(".proxy.toml.swp"), format!("{i}")).expect("write");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    std::fs::write(&config, personal_config(&sandbox.base_url(), "v0")).expect("same bytes");
    tokio::time::sleep(Duration::from_millis(600)).await; // four debounces: nothing may come
    assert_eq!((reloads(&proxy, "applied"), reloads(&proxy, "invalid")), (0, 0));

    // An editor saving in ten quick writes: one reload.
    for i in 1..=10 {
        std::fs::write(&config, personal_config(&sandbox.base_url(), &format!("v{i}"))).expect("write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&proxy, "applied") == 0 {
        assert!(Instant::now() < deadline, "the burst was reloaded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    // One reload; two when the machine stalled one 10 ms pause past the
    // 150 ms debounce. A reload per write would be ten.
    let applied = reloads(&proxy, "applied");
    assert!((1..=2).contains(&applied), "one reload for the burst, not {applied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_tokens_while_reloads_run_back_to_back_fail_no_request() {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(dir.path().join("client_secret"), USER_CLIENT_SECRET).expect("write");
    std::fs::write(dir.path().join("password"), PASSWORD).expect("write");
    TestConfig::new(&sandbox.base_url())
        .set("tokens", "min_forced_refresh_interval_ms", 100)
        .credential(Credential::password(
            "user",
            USER_CLIENT_ID,
            Secret::File("client_secret"),
            USERNAME,
            Secret::File("password"),
        ))
        .identity(Identity::new("app", "user", Match::Any))
        .write(&config);
    let proxy = start_proxy(&load(&config)).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    let until = Instant::now() + Duration::from_millis(2500);

    let reloading = {
        let handle = proxy.reload_handle();
        tokio::spawn(async move {
            while Instant::now() < until {
                handle.request();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (client(), url.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while Instant::now() < until {
                    let status = http.get(&url).send().await.expect("answered").status();
                    if status.is_success() { ok += 1 } else { failed.push(status.as_u16()) }
                }
                (ok, failed)
            })
        })
        .collect();
    // Revoked 700 ms apart: a revoke that came within the forced-refresh
    // interval (100 ms) of the last refresh would be answered 401 by design,
    // and on a loaded machine a refresh can take most of 400 ms.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        sandbox.revoke_all_tokens();
    }
    reloading.await.expect("reloads");
    let (mut ok, mut failed) = (0, Vec::new());
    for caller in callers {
        let (o, f) = caller.await.expect("caller");
        ok += o;
        failed.extend(f);
    }
    assert!(reloads(&proxy, "applied") >= 15, "reloads ran back to back: {}", reloads(&proxy, "applied"));
    assert!(ok > 100, "traffic flowed: {ok}");
    assert_eq!(failed, Vec::<u16>::new(), "no request failed ({ok} succeeded)");
    let fetches = sandbox.token_requests().len();
    assert!(fetches <= 1 + 3 * 2, "unchanged credentials were not fetched per reload: {fetches}");
}
