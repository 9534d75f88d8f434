//! A whole session at the most verbose log level (every crate at TRACE): token
//! fetches of every kind, refreshes, a rejected token and its replay, callers with
//! API keys and Basic passwords. Not one secret may appear in the output.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use support::{
    Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, client, start_proxy, start_sandbox_with,
};
use tallyfy_sandbox::SandboxConfig;
use tallyfy_sandbox::fixtures::{
    APP_CLIENT_SECRET, APP_USER_EMAIL, ORG_ID, PASSWORD, PERSONAL_TOKEN, USER_CLIENT_SECRET,
};

/// Everything logged, in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const API_KEY: &str = "legacy-api-key-5f1e9a";
/// Letters and digits only, as a Passport client secret is.
const ECHOED_SECRET: &str = "EchoedSecret7Kq2Xw9Lm4Np6Rt8Vz1Bc3Df5Gh0Jk";

/// A token endpoint answering every call `400 {"error":"<the client_secret
/// the call sent>"}`, and how many calls it answered.
async fn echoing_token_endpoint() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/oauth/token", listener.local_addr().expect("addr"));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head and the form (it is small): read until the secret's field is whole.
                let secret = loop {
                    match tcp.read(&mut chunk).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                    let text = String::from_utf8_lossy(&request);
                    if let Some(at) = text.find("client_secret=") {
                        let value: String =
                            text[at + 14..].chars().take_while(char::is_ascii_alphanumeric).collect();
                        if value.len() == ECHOED_SECRET.len() {
                            break value;
                        }
                    }
                };
                let body = format!(r#"{{"error":"{secret}"}}"#);
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    (url, answered)
}
const BASIC_PASSWORD: &str = "basic-password-8c2d";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_at_trace_level() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let access = tallyfy_proxy::access_log::capture();

    // Four seconds: a refresh logged at trace level still has most of a second
    // to finish on a loaded machine before the token it replaces expires.
    let lifetime = Duration::from_secs(4);
    let sandbox = start_sandbox_with(SandboxConfig {
        token_lifetime: lifetime,
        user_token_lifetime: lifetime,
        ..SandboxConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::new(&sandbox.base_url())
        .credential(Credential::fixture_app())
        .credential(Credential::fixture_user())
        .credential(Credential::personal("pat", Secret::Env(TOKEN_ENV)))
        .credential(Credential::application_user("minted", "app", ORG_ID, APP_USER_EMAIL))
        .identity(Identity::new("keyed", "user", Match::ApiKey(API_KEY)))
        .identity(Identity::new(
            "basic",
            "minted",
            Match::Basic { user: "reports", password: BASIC_PASSWORD },
        ))
        .identity(Identity::new("sidecar", "pat", Match::Source(vec!["127.0.0.1/32"])));
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let base = format!("http://{}", proxy.proxy_addr());
    let http = client();

    // Rounds of traffic until the tokens were refreshed in the background and
    // once after a rejection, so every token path has logged.
    let refreshed = || sandbox.token_requests().iter().filter(|t| t.grant == "refresh_token").count() >= 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    while round <= 3 || !refreshed() {
        assert!(Instant::now() < deadline, "refreshes within 30 s: {:?}", sandbox.token_requests().len());
        if round == 3 {
            sandbox.revoke_all_tokens(); // forces a rejected token, a refresh and a replay
        }
        let keyed = http.get(format!("{base}/api/me")).bearer_auth(API_KEY).send().await.expect("answered");
        assert_eq!(keyed.status(), 200);
        let basic = http
            .get(format!("{base}/api/organizations/{ORG_ID}/me/tasks"))
            .basic_auth("reports", Some(BASIC_PASSWORD))
            .send()
            .await
            .expect("answered");
        assert_eq!(basic.status(), 200);
        let sidecar = http
            .get(format!("{base}/api/me"))
            .header("cookie", "session=c00k1e-value")
            .send()
            .await
            .expect("answered");
        assert_eq!(sidecar.status(), 200);
        round += 1;
    }
    let download = http
        .get(format!("{base}/api/organizations/{ORG_ID}/file/f1/dl?bytes=100000"))
        .send()
        .await
        .expect("answered");
    assert_eq!(download.bytes().await.expect("body").len(), 100_000);
    let upload =
        http.post(format!("{base}/api/organizations/{ORG_ID}/file")).body(vec![b'u'; 4321]).send().await;
    assert_eq!(upload.expect("answered").status(), 201);
    proxy.shutdown().await;

    // A token endpoint that echoes the client secret it got as its error code
    // (a shape a secret shares with OAuth's codes): refused, retried, logged.
    let (echo_url, echoed) = echoing_token_endpoint().await;
    std::fs::write(dir.path().join("echoed_secret"), ECHOED_SECRET).expect("write");
    let config = TestConfig::new(&sandbox.base_url())
        .set("upstream", "token_url", echo_url.as_str())
        .set("tokens", "retry_min_ms", 50)
        .set("tokens", "retry_max_ms", 100)
        .credential(Credential::client_credentials("echoed", "1001", Secret::File("echoed_secret")))
        .identity(Identity::new("any", "echoed", Match::Any));
    let echoing = support::start_proxy_unready(&config.parse(dir.path())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while echoed.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the echoing endpoint was asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echoing.shutdown().await;

    let mut log = String::from_utf8_lossy(&captured.0.lock().expect("not poisoned")).into_owned();
    log.push_str(&String::from_utf8_lossy(&access.lock().expect("not poisoned")));
    assert!(
        log.contains("token obtained") && log.contains("Tallyfy rejected the token"),
        "the session exercised refreshes"
    );
    assert!(log.lines().count() > 100, "TRACE output was captured");
    let access = |path_end: &str| {
        log.lines()
            .find(|l| l.contains("tallyfy_proxy::access") && l.contains(path_end))
            .unwrap_or_else(|| panic!("an access line for {path_end}"))
            .to_owned()
    };
    let download_line = access("/dl\"");
    assert!(
        download_line.contains("bytes_sent=100000") && download_line.contains("complete=true"),
        "{download_line}"
    );
    let upload_line = access("/file\"");
    assert!(
        upload_line.contains("bytes_received=4321") && upload_line.contains("status=201"),
        "{upload_line}"
    );
    let basic_header = base64::engine::general_purpose::STANDARD.encode(format!("reports:{BASIC_PASSWORD}"));
    assert!(log.contains("token fetch failed credential=echoed"), "the echoed refusal was logged");
    let forbidden = [
        ECHOED_SECRET,
        PERSONAL_TOKEN,
        APP_CLIENT_SECRET,
        USER_CLIENT_SECRET,
        PASSWORD,
        API_KEY,
        BASIC_PASSWORD,
        &basic_header,
        "c00k1e-value",
        "eyJ",      // every access token the sandbox issues is a JWT starting with this
        "def50200", // every refresh token it issues starts with this
    ];
    for secret in forbidden {
        if let Some(at) = log.find(secret) {
            let line = log[..at].rsplit('\n').next().unwrap_or_default();
            panic!("{secret:?} appears in the log: ...{line}{secret}...");
        }
    }
}
