//! Shared test helpers: start the sandbox Tallyfy and the proxy on 127.0.0.1:0,
//! speak raw HTTP/1.1 where byte-exactness matters.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use tallyfy_proxy::app::{self, Listeners, Running};
use tallyfy_proxy::config::Config;
use tallyfy_sandbox::{Sandbox, SandboxConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod config;

#[allow(unused_imports)] // each test binary uses a different subset
pub use config::{Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, env, sha256_hex, table};

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
    /// The usual stack: [`TestConfig::personal_any`].
    pub async fn start() -> Stack {
        Self::start_with(|config| config).await
    }

    /// The usual stack with changes, e.g. `|c| c.set("server", "max_headers", 20)`.
    pub async fn start_with(change: impl FnOnce(TestConfig) -> TestConfig) -> Stack {
        let sandbox = start_sandbox().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = change(TestConfig::personal_any(&sandbox.base_url())).parse(dir.path());
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

/// An address nothing listens on, kept so while the guard lives: its socket is
/// bound (no other process can take the port) but never listens, so every
/// connection to it is refused.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _bound: tokio::net::TcpSocket,
}

pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    ClosedPort { addr: socket.local_addr().expect("addr"), _bound: socket }
}

/// An HTTP/1.1 and HTTP/2 server on a loopback port, answering every request
/// with `answer`; its address. For the tests' own stand-ins for Tallyfy.
pub async fn api<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let answered = answer(request);
                    async move { Ok::<_, std::convert::Infallible>(answered.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A response with `status` and a JSON body of `{}`-like `body`.
pub fn answer(status: u16, body: &'static [u8]) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    response
}

/// An upstream that reports each request on the returned channel, then answers
/// `{"ok":true}` after `delay`. For drains and in-flight tests.
pub async fn slow_upstream(
    delay: std::time::Duration,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (arrived, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = api(move |_request| {
        let _ = arrived.send(());
        async move {
            tokio::time::sleep(delay).await;
            answer(200, b"{\"ok\":true}")
        }
    })
    .await;
    (addr, rx)
}

/// The Prometheus text the admin listener at `admin` serves.
pub async fn scrape(admin: SocketAddr) -> String {
    client().get(format!("http://{admin}/metrics")).send().await.expect("scraped").text().await.expect("text")
}

/// A CA and a server certificate for 127.0.0.1, made fresh for the test; the
/// server offers `alpn`.
pub fn local_pki(alpn: &[&[u8]]) -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tallyfy-proxy test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("leaf params");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf cert");
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key der");
    let mut server =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .expect("server cert");
    server.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    (ca.pem(), server)
}

/// The sandbox behind TLS offering `alpn`, a directory holding its CA as
/// `ca.pem`, and its base URL.
pub async fn tls_sandbox(alpn: &[&[u8]]) -> (Sandbox, tempfile::TempDir, String) {
    let (ca_pem, server_tls) = local_pki(alpn);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sandbox = Sandbox::start_tls(listener, SandboxConfig::default(), Arc::new(server_tls))
        .await
        .expect("TLS sandbox");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write CA");
    let base = format!("https://127.0.0.1:{}", sandbox.addr().port());
    (sandbox, dir, base)
}
