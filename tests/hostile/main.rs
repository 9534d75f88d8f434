//! The hostile suite: every probe of the hardening review, as the exact bytes an
//! attacker sends, against the proxy with a recording upstream on loopback. Each
//! test asserts what the caller got and what (usually nothing) reached Tallyfy.
//!
//! - `connections`: silent peers, stalled prefaces, idle HTTP/2, slowloris, caps
//! - `paths`: encoded slashes, traversal, OAuth in any spelling, case, target forms
//! - `overrides`: method-override headers, `_method` in query, form, JSON, multipart
//! - `framing`: request smuggling variants, `Transfer-Encoding`, `Host`
//! - `responses`: Tallyfy's `Content-Length` + `Transfer-Encoding`, 101, request ids
//! - `headers`: forwarding claims and underscore aliases, the access log
//! - `http2`: rapid reset and CONTINUATION floods, bounded
//! - `reloads`: unrelated files, bursts, and dead tokens while reloading
//! - `upstream_h2`: Tallyfy over HTTP/2: callers that never read, its trailers

#[path = "../support/mod.rs"]
mod support;

mod budget;
mod connections;
mod framing;
mod headers;
mod http2;
mod overrides;
mod paths;
mod reloads;
mod responses;
mod upstream_h2;

use std::net::SocketAddr;
use std::time::Duration;

use support::{
    Credential, Identity, Match, Secret, Stack, TOKEN_ENV, TestConfig, start_proxy, start_sandbox,
};
use tallyfy_proxy::app::Running;
use tallyfy_sandbox::Sandbox;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short timers, so silent peers are cut quickly: `[server]` keys and values.
const SERVER: [(&str, i64); 2] = [("header_read_timeout_ms", 400), ("idle_timeout_ms", 600)];

/// `config` with [`SERVER`]'s timers.
fn short_timers(config: TestConfig) -> TestConfig {
    SERVER.into_iter().fold(config, |config, (key, value)| config.set("server", key, value))
}

/// The sandbox and a proxy with an `any` identity and [`SERVER`]'s timers.
async fn stack() -> Stack {
    Stack::start_with(short_timers).await
}

/// The sandbox and a proxy with [`SERVER`]'s timers whose identities are
/// `identities` (a personal-token credential `ops` exists).
async fn stack_with_identities(
    identities: impl IntoIterator<Item = Identity>,
) -> (Sandbox, Running, tempfile::TempDir) {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = short_timers(TestConfig::new(&sandbox.base_url()))
        .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)));
    let config = identities.into_iter().fold(config, TestConfig::identity);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    (sandbox, proxy, dir)
}

/// An identity matched by API key `key`, mapped to `ops`.
fn keyed_identity(name: &str, key: &'static str) -> Identity {
    Identity::new(name, "ops", Match::ApiKey(key))
}

/// What came back on a raw connection.
#[derive(Debug)]
struct Exchange {
    bytes: Vec<u8>,
    /// The proxy closed the connection (EOF or reset) within the wait.
    closed: bool,
}

impl Exchange {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status of the first response.
    fn status(&self) -> u16 {
        let text = self.text();
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status: {text:?}"))
    }

    /// How many responses came back.
    fn responses(&self) -> usize {
        self.text().matches("HTTP/1.1 ").count()
    }
}

/// Writes `bytes`, then reads until the proxy closes or `wait` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_until_closed(&mut stream, wait).await
}

/// Reads one response with a `Content-Length` body.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().expect("a length"));
            if bytes.len() >= end + 4 + length {
                return String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        let mut buf = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .expect("read");
        assert!(n > 0, "closed mid-response: {:?}", String::from_utf8_lossy(&bytes));
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// Reads until EOF, a reset, or `wait` passes.
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Exchange {
    let mut bytes = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut buf = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Exchange { bytes, closed: true },
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => return Exchange { bytes, closed: false },
        }
    }
}

/// The access lines every test in this binary writes, captured in memory (one
/// capture per process; the tracing filter lets access lines through).
fn access_log() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    static CAPTURED: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("tallyfy_proxy::access=info")
            .with_writer(std::io::sink)
            .try_init();
        tallyfy_proxy::access_log::capture()
    })
}

/// The captured access line holding `needle`, waiting briefly for it (lines are
/// written when the response body ends).
async fn access_line(needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&access_log().lock().expect("not poisoned")).into_owned();
        if let Some(line) = text.lines().find(|line| line.contains(needle)) {
            return line.to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no access line holds {needle:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
