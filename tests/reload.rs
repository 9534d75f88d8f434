//! Live reload against real files: a rotated secret file, a broken config, and a
//! Kubernetes-style `..data` symlink swap.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{
    Credential, Identity, Match, Secret, TestConfig, client, env, ready_within, start_proxy,
    start_proxy_unready, start_sandbox,
};
use tallyfy_proxy::config::Config;
use tallyfy_proxy::metrics::OutcomeLabel;
use tallyfy_sandbox::fixtures::{APP_CLIENT_ID, APP_CLIENT_SECRET, APP_USER_EMAIL, ORG_ID};

/// A client_credentials credential reading its secret from `secrets/app_secret`,
/// and one identity with API key `key`.
fn config(base_url: &str, key: &'static str) -> TestConfig {
    TestConfig::new(base_url)
        .set("tokens", "retry_min_ms", 50)
        .set("tokens", "retry_max_ms", 200)
        .credential(Credential::client_credentials("app", APP_CLIENT_ID, Secret::File("secrets/app_secret")))
        .identity(Identity::new("caller", "app", Match::ApiKey(key)))
}

/// A directory holding `proxy.toml` ([`config`] with key `k1`) and
/// `secrets/app_secret` holding `secret`.
fn config_dir(base_url: &str, secret: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir(dir.path().join("secrets")).expect("mkdir");
    std::fs::write(dir.path().join("secrets/app_secret"), secret).expect("write");
    config(base_url, "k1").write(&dir.path().join("proxy.toml"));
    dir
}

fn load(path: &Path) -> Config {
    Config::parse(&std::fs::read_to_string(path).expect("read"), path, &env).expect("valid")
}

/// Polls `done` until it holds, at most 10 s (reloads are driven by file events).
async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn reloads(proxy: &tallyfy_proxy::app::Running, outcome: &str) -> u64 {
    proxy.metrics().config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).get()
}

async fn mint_status(proxy: &tallyfy_proxy::app::Running, key: &str) -> u16 {
    let url = format!(
        "http://{}/api/applications/{ORG_ID}/users/{}/token",
        proxy.proxy_addr(),
        APP_USER_EMAIL.replace('@', "%40")
    );
    client().post(url).header("x-api-key", key).send().await.expect("answered").status().as_u16()
}

#[tokio::test]
async fn a_rotated_secret_file_is_used_without_a_restart() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), "an-old-secret\n");
    let proxy = start_proxy_unready(&load(&dir.path().join("proxy.toml"))).await;

    let refused =
        || sandbox.token_requests().iter().any(|t| t.grant == "client_credentials" && t.answered == 401);
    wait_for("the old secret is refused", async || refused()).await;
    assert_eq!(mint_status(&proxy, "k1").await, 503, "no token yet");

    std::fs::write(dir.path().join("secrets/app_secret"), format!("{APP_CLIENT_SECRET}\n")).expect("rotate");
    ready_within(&proxy, Duration::from_secs(10)).await;
    assert_eq!(mint_status(&proxy, "k1").await, 200);
    assert!(reloads(&proxy, "applied") >= 1);
}

#[tokio::test]
async fn a_broken_config_is_refused_and_the_old_one_keeps_serving() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), APP_CLIENT_SECRET);
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    assert_eq!(mint_status(&proxy, "k1").await, 200);

    std::fs::write(dir.path().join("proxy.toml"), "[listen]\nproxy = \"nonsense\"\n").expect("break it");
    wait_for("the reload is refused", async || reloads(&proxy, "invalid") >= 1).await;
    assert_eq!(reloads(&proxy, "applied"), 0);
    assert_eq!(mint_status(&proxy, "k1").await, 200, "the running config still serves");
}

/// A ConfigMap naming a new secret file lands before the Secret volume that
/// holds it: the reload is refused (the file is missing), and the file's later
/// arrival is no event the watcher listens for (its name is in no config that
/// loaded). The refused load is tried again until it succeeds.
#[tokio::test]
async fn a_refused_reload_is_tried_again_until_the_file_it_missed_arrives() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), APP_CLIENT_SECRET);
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;

    config(&sandbox.base_url(), "k1")
        .credential(Credential::personal("ops", Secret::File("secrets/ops_token")))
        .identity(Identity::new("second", "ops", Match::ApiKey("k2")))
        .write(&dir.path().join("proxy.toml"));
    wait_for("the reload is refused", async || reloads(&proxy, "invalid") >= 1).await;
    std::fs::write(dir.path().join("secrets/ops_token"), tallyfy_sandbox::fixtures::PERSONAL_TOKEN)
        .expect("the Secret lands");
    let me = format!("http://{}/api/me", proxy.proxy_addr());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client().get(&me).header("x-api-key", "k2").send().await.expect("answered").status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the new identity never served: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reloads(&proxy, "invalid"), 1, "the retries that failed alike were not counted again");
    assert_eq!(reloads(&proxy, "applied"), 1);
}

/// A secret rotated after the config was read but before the proxy watched its
/// files (the start can take seconds: Redis, the listeners) is seen at once.
#[tokio::test]
async fn a_file_changed_while_the_proxy_was_starting_is_a_change() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), "an-old-secret\n");
    let loaded = Config::load(&dir.path().join("proxy.toml")).expect("valid");
    std::fs::write(dir.path().join("secrets/app_secret"), format!("{APP_CLIENT_SECRET}\n")).expect("rotate");
    let proxy = start_proxy_unready(&loaded).await;
    ready_within(&proxy, Duration::from_secs(10)).await;
    assert_eq!(mint_status(&proxy, "k1").await, 200);
    assert_eq!(reloads(&proxy, "applied"), 1);
}

#[tokio::test]
async fn a_kubernetes_symlink_swap_is_detected_and_unchanged_credentials_keep_their_tokens() {
    let sandbox = start_sandbox().await;
    let mount = tempfile::tempdir().expect("dir");
    let m = mount.path();
    // What the kubelet makes of a ConfigMap: files behind a `..data` symlink.
    std::fs::create_dir_all(m.join("..2026_01/secrets")).expect("mkdir");
    config(&sandbox.base_url(), "old-key").write(&m.join("..2026_01/proxy.toml"));
    std::fs::write(m.join("..2026_01/secrets/app_secret"), APP_CLIENT_SECRET).expect("write");
    std::os::unix::fs::symlink("..2026_01", m.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/proxy.toml", m.join("proxy.toml")).expect("symlink");
    std::os::unix::fs::symlink("..data/secrets", m.join("secrets")).expect("symlink");
    let proxy = start_proxy(&load(&m.join("proxy.toml"))).await;
    assert_eq!(mint_status(&proxy, "old-key").await, 200);
    let fetched = || sandbox.token_requests().iter().filter(|t| t.grant == "client_credentials").count();
    assert_eq!(fetched(), 1);

    // The kubelet's update: a new timestamped directory, then an atomic rename of the link.
    std::fs::create_dir_all(m.join("..2026_02/secrets")).expect("mkdir");
    config(&sandbox.base_url(), "new-key").write(&m.join("..2026_02/proxy.toml"));
    std::fs::write(m.join("..2026_02/secrets/app_secret"), APP_CLIENT_SECRET).expect("write");
    std::os::unix::fs::symlink("..2026_02", m.join("..data_tmp")).expect("symlink");
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).expect("swap");

    wait_for("the new key works", async || mint_status(&proxy, "new-key").await == 200).await;
    assert_eq!(mint_status(&proxy, "old-key").await, 401, "the old key is gone with the old config");
    assert_eq!(fetched(), 1, "the unchanged credential kept its token: no token-endpoint call");
}

#[tokio::test]
async fn in_flight_requests_finish_on_the_config_they_started_with() {
    let (upstream, mut arrived) = support::slow_upstream(Duration::from_millis(600)).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = |key: &'static str| {
        TestConfig::new(&format!("http://{upstream}"))
            .credential(Credential::personal("ops", Secret::File("token")))
            .identity(Identity::new("caller", "ops", Match::ApiKey(key)))
    };
    std::fs::write(dir.path().join("token"), "a-personal-token").expect("write");
    config("k1").write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    let url = format!("http://{}/api/slow", proxy.proxy_addr());
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { client().get(url).header("x-api-key", "k1").send().await }
    });
    arrived.recv().await.expect("the request reached the upstream");

    config("k2").write(&dir.path().join("proxy.toml"));
    wait_for("the reload is applied", async || reloads(&proxy, "applied") >= 1).await;
    let response = in_flight.await.expect("task").expect("not cut by the reload");
    assert_eq!(response.status(), 200, "finished on the config it started with");
    let status = |key: &'static str| {
        let url = url.clone();
        async move { client().get(url).header("x-api-key", key).send().await.expect("answered").status() }
    };
    assert_eq!(status("k1").await, 401, "new requests see the new config");
}

/// A reload that removes an identity applies at once, even while another
/// credential still has no token (reloads once waited up to 10 s for such
/// tokens, the removed key working all along).
#[tokio::test]
async fn a_removed_key_stops_at_once_while_another_credential_has_no_token() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), "not-the-app-secret");
    std::fs::write(dir.path().join("secrets/ops_token"), tallyfy_sandbox::fixtures::PERSONAL_TOKEN)
        .expect("write");
    let both = |keys: &[(&'static str, &'static str)]| {
        keys.iter().fold(
            config(&sandbox.base_url(), "k-app")
                .credential(Credential::personal("ops", Secret::File("secrets/ops_token"))),
            |config, (name, key)| config.identity(Identity::new(name, "ops", Match::ApiKey(key))),
        )
    };
    both(&[("one", "k1"), ("two", "k2")]).write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy_unready(&load(&dir.path().join("proxy.toml"))).await;
    let me = format!("http://{}/api/me", proxy.proxy_addr());
    let status =
        async |key: &str| client().get(&me).header("x-api-key", key).send().await.expect("answered").status();
    assert_eq!(status("k2").await, 200, "served with the ops token; the app credential has none");

    both(&[("one", "k1")]).write(&dir.path().join("proxy.toml"));
    let written = Instant::now();
    wait_for("the reload applies", async || reloads(&proxy, "applied") >= 1).await;
    assert!(written.elapsed() < Duration::from_secs(5), "applied after {:?}", written.elapsed());
    assert_ne!(status("k2").await, 200, "the removed key no longer serves");
    assert_eq!(status("k1").await, 200);
}

/// A renewed `listen.tls` certificate (cert-manager rewriting its Secret) is
/// noticed: the reload runs, and says the certificate takes effect after a
/// restart. Its files were not watched, so nothing noticed until a SIGHUP.
#[tokio::test]
async fn a_renewed_listen_certificate_is_noticed() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), APP_CLIENT_SECRET);
    let write_cert = |dir: &Path| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
    };
    write_cert(dir.path());
    let tls = support::table([("cert", "server.pem".into()), ("key", "server.key".into())]);
    config(&sandbox.base_url(), "k1").set("listen", "tls", tls).write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    write_cert(dir.path());
    wait_for("the renewed certificate is noticed", async || reloads(&proxy, "applied") >= 1).await;
}

/// A secret file that is a symlink into another directory (a vault agent's
/// output, say) is watched where it lives: rotating it there reloads. Only the
/// link's own directory was watched, so the rotation waited for a SIGHUP.
#[tokio::test]
async fn a_secret_linked_into_another_directory_is_watched_there() {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let (conf, vault) = (dir.path().join("conf"), dir.path().join("vault"));
    std::fs::create_dir_all(conf.join("secrets")).expect("mkdir");
    std::fs::create_dir(&vault).expect("mkdir");
    std::fs::write(vault.join("app_secret"), "an-old-secret").expect("write");
    std::os::unix::fs::symlink("../../vault/app_secret", conf.join("secrets/app_secret")).expect("link");
    config(&sandbox.base_url(), "k1").write(&conf.join("proxy.toml"));
    let proxy = start_proxy_unready(&load(&conf.join("proxy.toml"))).await;
    // Rotated as agents do: a new file renamed over the old one.
    std::fs::write(vault.join("app_secret.new"), APP_CLIENT_SECRET).expect("write");
    std::fs::rename(vault.join("app_secret.new"), vault.join("app_secret")).expect("rename");
    wait_for("the rotated secret is reloaded", async || reloads(&proxy, "applied") >= 1).await;
    ready_within(&proxy, Duration::from_secs(10)).await;
    assert_eq!(mint_status(&proxy, "k1").await, 200);
}

/// The same when the credential without a token is new in the reloaded file:
/// the reload applies at once, and the new credential's callers get 503 once
/// its first fetch is refused.
#[tokio::test]
async fn a_removed_key_stops_at_once_beside_a_new_credential_without_a_token() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), "not-the-app-secret");
    std::fs::write(dir.path().join("secrets/ops_token"), tallyfy_sandbox::fixtures::PERSONAL_TOKEN)
        .expect("write");
    let ops = || {
        TestConfig::new(&sandbox.base_url())
            .credential(Credential::personal("ops", Secret::File("secrets/ops_token")))
    };
    ops()
        .identity(Identity::new("one", "ops", Match::ApiKey("k1")))
        .identity(Identity::new("two", "ops", Match::ApiKey("k2")))
        .write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    let me = format!("http://{}/api/me", proxy.proxy_addr());
    let status =
        async |key: &str| client().get(&me).header("x-api-key", key).send().await.expect("answered").status();
    assert_eq!(status("k2").await, 200);

    ops()
        .credential(Credential::client_credentials("app", APP_CLIENT_ID, Secret::File("secrets/app_secret")))
        .identity(Identity::new("one", "ops", Match::ApiKey("k1")))
        .identity(Identity::new("new", "app", Match::ApiKey("k3")))
        .write(&dir.path().join("proxy.toml"));
    let written = Instant::now();
    wait_for("the reload applies", async || reloads(&proxy, "applied") >= 1).await;
    assert!(written.elapsed() < Duration::from_secs(5), "applied after {:?}", written.elapsed());
    assert_ne!(status("k2").await, 200, "the removed key no longer serves");
    assert_eq!(status("k3").await, 503, "the new credential's callers wait for its token");
}

/// A rotated secret Tallyfy refuses, in the same reload as a removed API key:
/// the removed key stops at once, and the credential goes on with the token it
/// had, however often the new secret is refused. The reload used to wait
/// 10 s for the new secret's token (the removed key serving all along), then
/// answer the credential's callers 503 with a valid token in hand.
#[tokio::test]
async fn a_mistyped_secret_rotation_keeps_the_old_token_serving_and_the_rest_applies_at_once() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), APP_CLIENT_SECRET);
    let two_keys =
        config(&sandbox.base_url(), "k1").identity(Identity::new("second", "app", Match::ApiKey("k2")));
    two_keys.write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    assert_eq!((mint_status(&proxy, "k1").await, mint_status(&proxy, "k2").await), (200, 200));
    let refusals = || {
        sandbox
            .token_requests()
            .iter()
            .filter(|t| t.grant == "client_credentials" && t.answered == 401)
            .count()
    };
    assert_eq!(refusals(), 0);

    std::fs::write(dir.path().join("secrets/app_secret"), "mistyped").expect("rotate");
    config(&sandbox.base_url(), "k1").write(&dir.path().join("proxy.toml"));
    let written = Instant::now();
    wait_for("the reload applies", async || mint_status(&proxy, "k2").await == 401).await;
    assert!(written.elapsed() < Duration::from_secs(5), "applied after {:?}", written.elapsed());
    wait_for("the new secret is refused twice", async || refusals() >= 2).await;
    assert_eq!(mint_status(&proxy, "k1").await, 200, "the previous token still serves");
    let ready = client().get(format!("http://{}/readyz", proxy.admin_addr())).send().await.expect("answered");
    assert_eq!(ready.status(), 200, "and the proxy stays ready");
}

/// A credential changed to act as another user (a personal token replaced by
/// a user token the application mints for sam): its callers wait for the
/// first token of the new settings, slow as it is here, and are served as the
/// new user; never as the old one, never a 503 while the fetch runs.
#[tokio::test]
async fn a_credential_acting_as_another_user_is_waited_for_never_served_as_the_old_one() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), APP_CLIENT_SECRET);
    std::fs::write(dir.path().join("secrets/ops_token"), tallyfy_sandbox::fixtures::PERSONAL_TOKEN)
        .expect("write");
    let with_user = |user: Credential| {
        config(&sandbox.base_url(), "k-app").credential(user).identity(Identity::new(
            "one",
            "user",
            Match::ApiKey("k1"),
        ))
    };
    with_user(Credential::personal("user", Secret::File("secrets/ops_token")))
        .write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    let me = format!("http://{}/api/me", proxy.proxy_addr());
    let whom = async || {
        let response = client().get(&me).header("x-api-key", "k1").send().await.expect("answered");
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        (status, body["data"]["email"].as_str().unwrap_or_default().to_owned())
    };
    let (status, before) = whom().await;
    assert_eq!(status, 200);
    assert_ne!(before, APP_USER_EMAIL);

    sandbox.set_token_fault(Some(tallyfy_sandbox::TokenFault::Slow(Duration::from_millis(1500))));
    with_user(Credential::application_user("user", "app", ORG_ID, APP_USER_EMAIL))
        .write(&dir.path().join("proxy.toml"));
    wait_for("the reload applies", async || reloads(&proxy, "applied") >= 1).await;
    let applied = Instant::now();
    let answers = futures_util::future::join_all((0..5).map(|_| whom())).await;
    assert!(applied.elapsed() >= Duration::from_millis(200), "the first mint was still under way");
    for (status, email) in answers {
        assert_eq!(
            (status, email.as_str()),
            (200, APP_USER_EMAIL),
            "waited for, and served as, the new user"
        );
    }
    assert_eq!(
        sandbox.token_requests().iter().filter(|t| t.grant == "user_token").count(),
        1,
        "one mint for all of them"
    );
}

/// Tallyfy's 429 is about whom a credential acts as. A reload that leaves the
/// credential the same principal keeps the remembered 429 (its callers are
/// still held back); one that makes it act as another user drops it: that
/// user's calls go to Tallyfy, which never throttled them.
#[tokio::test]
async fn a_remembered_429_is_kept_for_the_same_principal_and_dropped_for_another() {
    let sandbox = start_sandbox().await;
    let dir = config_dir(&sandbox.base_url(), APP_CLIENT_SECRET);
    std::fs::write(dir.path().join("secrets/ops_token"), tallyfy_sandbox::fixtures::PERSONAL_TOKEN)
        .expect("write");
    let with_user = |user: Credential, key: &'static str| {
        config(&sandbox.base_url(), key).credential(user).identity(Identity::new(
            "one",
            "user",
            Match::ApiKey("k1"),
        ))
    };
    let personal = || Credential::personal("user", Secret::File("secrets/ops_token"));
    with_user(personal(), "k-app").write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    let me = format!("http://{}/api/me", proxy.proxy_addr());
    let status =
        async || client().get(&me).header("x-api-key", "k1").send().await.expect("answered").status();
    sandbox.fail_api("/api/me", 1, tallyfy_sandbox::ApiFault::Throttled { retry_after: Some(120) });
    assert_eq!(status().await, 429, "Tallyfy's");
    assert_eq!(status().await, 429, "remembered");
    assert_eq!(sandbox.count("GET", "/api/me"), 1);

    // Another identity's key: the credential is the same principal.
    with_user(personal(), "k-other").write(&dir.path().join("proxy.toml"));
    wait_for("the first reload applies", async || reloads(&proxy, "applied") >= 1).await;
    assert_eq!(status().await, 429, "still remembered");
    assert_eq!(sandbox.count("GET", "/api/me"), 1);

    // The credential now acts as sam, minted by the application.
    with_user(Credential::application_user("user", "app", ORG_ID, APP_USER_EMAIL), "k-other")
        .write(&dir.path().join("proxy.toml"));
    wait_for("the second reload applies", async || reloads(&proxy, "applied") >= 2).await;
    assert_eq!(status().await, 200, "sam was never throttled");
    assert_eq!(sandbox.count("GET", "/api/me"), 2);
}

/// An API that reports each request's `Authorization` on the returned channel;
/// the first request is held until `release` fires, then answered 401 (its
/// token dead), every later one 200.
async fn api_rejecting_the_first_token_once_released()
-> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>, tokio::sync::oneshot::Sender<()>) {
    let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = std::sync::Arc::new(tokio::sync::Mutex::new(Some(released)));
    let addr = support::api(move |request| {
        let authorization = request.headers().get("authorization").map(|v| v.to_str().unwrap_or("?"));
        let _ = seen.send(authorization.unwrap_or("none").to_owned());
        let released = released.clone();
        async move {
            let first = released.lock().await.take();
            match first {
                Some(wait) => {
                    let _ = wait.await;
                    support::answer(401, b"{}")
                }
                None => support::answer(200, b"{}"),
            }
        }
    })
    .await;
    (addr, rx, release)
}

/// A request in flight when a reload removes its credential, whose token
/// Tallyfy then rejects, gets that 401: the removed credential's secret makes
/// no grant after the reload (it refreshed the token and sent the request
/// again with it).
#[tokio::test]
async fn a_credential_a_reload_removed_makes_no_grant_for_its_requests_in_flight() {
    let sandbox = start_sandbox().await;
    let (api, mut seen, release) = api_rejecting_the_first_token_once_released().await;
    let dir = config_dir(&format!("http://{api}"), APP_CLIENT_SECRET);
    std::fs::write(dir.path().join("secrets/ops_token"), "a-personal-token").expect("write");
    let with = |app: bool| {
        let config = TestConfig::new(&format!("http://{api}"))
            .set("upstream", "token_url", sandbox.token_url())
            .credential(Credential::personal("ops", Secret::File("secrets/ops_token")))
            .identity(Identity::new("ops", "ops", Match::ApiKey("k-ops")));
        if app {
            config
                .credential(Credential::client_credentials(
                    "app",
                    APP_CLIENT_ID,
                    Secret::File("secrets/app_secret"),
                ))
                .identity(Identity::new("caller", "app", Match::ApiKey("k1")))
        } else {
            config
        }
    };
    with(true).write(&dir.path().join("proxy.toml"));
    let proxy = start_proxy(&load(&dir.path().join("proxy.toml"))).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { client().get(url).header("x-api-key", "k1").send().await }
    });
    let first = seen.recv().await.expect("the request reached the API");
    assert_ne!(first, "none", "sent with the app's token");
    let granted = sandbox.token_requests().len();

    with(false).write(&dir.path().join("proxy.toml"));
    wait_for("the reload is applied", async || reloads(&proxy, "applied") >= 1).await;
    release.send(()).expect("released");
    let response = in_flight.await.expect("task").expect("answered");
    assert_eq!(response.status(), 401, "Tallyfy's answer, not a replay with a new token");
    assert_eq!(sandbox.token_requests().len(), granted, "no grant after the removal");
    assert!(seen.try_recv().is_err(), "sent once");
}
