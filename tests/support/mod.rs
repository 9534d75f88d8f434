//! Shared test helpers: start the sandbox Tallyfy and the proxy on 127.0.0.1:0,
//! speak raw HTTP/1.1 where byte-exactness matters.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::Path;

use tallyfy_proxy::app::{self, Listeners, Running};
use tallyfy_proxy::config::Config;
use tallyfy_sandbox::{Sandbox, SandboxConfig, fixtures};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TOKEN_ENV: &str = "TEST_TALLYFY_TOKEN";

/// A proxy config pointed at `base_url`, with one personal-token credential and an
/// `any` identity. `extra` is appended verbatim (more tables or keys).
pub fn config_text(base_url: &str, upstream_extra: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[upstream]
base_url = "{base_url}"
{upstream_extra}

[[credentials]]
name = "ops"
kind = "personal_token"
token = {{ env = "{TOKEN_ENV}" }}

[[identities]]
name = "local-app"
credential = "ops"
match = {{ any = true }}
{extra}
"#
    )
}

/// The secrets tests reference as `{ env = "..." }`, looked up without touching
/// the process environment.
pub fn env(name: &str) -> Option<String> {
    let value = match name {
        TOKEN_ENV => fixtures::PERSONAL_TOKEN,
        "APP_SECRET" => fixtures::APP_CLIENT_SECRET,
        "USER_SECRET" => fixtures::USER_CLIENT_SECRET,
        "USER_PASSWORD" => fixtures::PASSWORD,
        _ => return None,
    };
    Some(value.to_owned())
}

/// `[listen]` on ephemeral ports and `[upstream]` at `base_url`, then `body`.
pub fn proxy_toml(base_url: &str, body: &str) -> String {
    format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[upstream]\nbase_url = \"{base_url}\"\n\n{body}"
    )
}

/// A `client_credentials` credential named `app` and a `password` one named
/// `user`, both against the sandbox's fixture clients.
pub fn oauth_credentials() -> String {
    format!(
        r#"
[[credentials]]
name = "app"
kind = "client_credentials"
client_id = "{app_id}"
client_secret = {{ env = "APP_SECRET" }}

[[credentials]]
name = "user"
kind = "password"
client_id = "{user_id}"
client_secret = {{ env = "USER_SECRET" }}
username = "{username}"
password = {{ env = "USER_PASSWORD" }}
"#,
        app_id = fixtures::APP_CLIENT_ID,
        user_id = fixtures::USER_CLIENT_ID,
        username = fixtures::USERNAME,
    )
}

/// Parses `text` as the proxy config, with secrets from [`env`]; `dir` anchors
/// relative paths.
pub fn parse_config(text: &str, dir: &Path) -> Config {
    Config::parse(text, &dir.join("proxy.toml"), &env)
        .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"))
}

/// Starts the proxy without waiting for readiness.
pub async fn start_proxy_unready(config: &Config) -> Running {
    let listeners = Listeners {
        proxy: TcpListener::bind("127.0.0.1:0").await.expect("bind proxy"),
        admin: TcpListener::bind("127.0.0.1:0").await.expect("bind admin"),
    };
    app::start(config, listeners).await.expect("proxy starts")
}

/// Waits for readiness, at most `limit` (a bound, not a sleep: it returns as soon
/// as the last token is published).
pub async fn ready_within(proxy: &Running, limit: std::time::Duration) {
    tokio::time::timeout(limit, proxy.ready()).await.expect("the proxy became ready in time");
}

/// Starts the proxy on ephemeral loopback ports and waits until it is ready.
pub async fn start_proxy(config: &Config) -> Running {
    let running = start_proxy_unready(config).await;
    ready_within(&running, std::time::Duration::from_secs(10)).await;
    running
}

pub async fn start_sandbox() -> Sandbox {
    start_sandbox_with(SandboxConfig::default()).await
}

pub async fn start_sandbox_with(config: SandboxConfig) -> Sandbox {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sandbox");
    Sandbox::start(listener, config).await.expect("sandbox starts")
}

/// The sandbox and a proxy in front of it.
pub struct Stack {
    pub sandbox: Sandbox,
    pub proxy: Running,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with("", "").await
    }

    pub async fn start_with(upstream_extra: &str, extra: &str) -> Stack {
        let sandbox = start_sandbox().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = parse_config(&config_text(&sandbox.base_url(), upstream_extra, extra), dir.path());
        let proxy = start_proxy(&config).await;
        Stack { sandbox, proxy, client: client(), _dir: dir }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.proxy.proxy_addr())
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().expect("reqwest client")
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("JSON body ({e}): {}", self.body))
    }
}

/// Writes `request` verbatim (it must ask for `Connection: close`) and reads the
/// whole response. For targets a normal client would normalise.
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read response");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    RawResponse { status, head: head.to_owned(), body: dechunk(head, body) }
}

fn dechunk(head: &str, body: &str) -> String {
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

/// An address nothing listens on: bound, then released.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// An upstream that reports each request on the returned channel, then answers
/// `{"ok":true}` after `delay`. For drains and in-flight tests.
pub async fn slow_upstream(
    delay: std::time::Duration,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (arrived, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let _ = arrived.send(());
                    async move {
                        tokio::time::sleep(delay).await;
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{\"ok\":true}"));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// The Prometheus text the admin listener at `admin` serves.
pub async fn scrape(admin: SocketAddr) -> String {
    client().get(format!("http://{admin}/metrics")).send().await.expect("scraped").text().await.expect("text")
}
