//! HTTP/2 floods, written as raw frames and bounded to a few thousand.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::connections::H2_PREFACE_AND_SETTINGS;
use super::read_until_closed;
use crate::support::{Stack, client, scrape};

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK for `GET http://a/api/me`: static-table method and scheme, literal
/// path and authority (never indexed: no dynamic table state to track).
fn get_me() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 7];
    block.extend_from_slice(b"/api/me");
    block.extend_from_slice(&[0x01, 1, b'a']);
    block
}

/// The error code of the first GOAWAY among `bytes` (the server's frames).
pub fn goaway_code(bytes: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len =
            (usize::from(bytes[at]) << 16) | (usize::from(bytes[at + 1]) << 8) | usize::from(bytes[at + 2]);
        if bytes[at + 3] == GOAWAY && at + 17 <= bytes.len() {
            let code = &bytes[at + 13..at + 17];
            return Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
        }
        at += 9 + len;
    }
    None
}

/// The sandbox and a proxy whose idle timeout (60 s) cannot end a flood's connection.
async fn flood_stack() -> Stack {
    Stack::start_with(|c| c.set("server", "header_read_timeout_ms", 400)).await
}

async fn in_flight_drops_to_zero(admin: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(admin).await;
        if text.contains("tallyfy_proxy_requests_in_flight 0") {
            return;
        }
        assert!(Instant::now() < deadline, "requests stayed in flight: {text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_rapid_reset_flood_is_bounded_and_leaves_nothing_behind() {
    let stack = flood_stack().await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    stream.write_all(H2_PREFACE_AND_SETTINGS).await.expect("preface");
    const STREAMS: u32 = 2000;
    let mut burst = Vec::new();
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get_me()));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
    }
    let began = Instant::now();
    let _ = stream.write_all(&burst).await; // the proxy may hang up midway
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let forwarded = stack.sandbox.received().len();
    assert!(
        answer.closed && began.elapsed() < Duration::from_secs(2),
        "the flood ended the connection at once"
    );
    let code = goaway_code(&answer.bytes).expect("a GOAWAY");
    assert_ne!(code, 0, "an error GOAWAY (ENHANCE_YOUR_CALM), not the idle one");
    assert!(forwarded <= 20, "cancelled streams were not forwarded ({forwarded} of {STREAMS})");
    in_flight_drops_to_zero(stack.proxy.admin_addr()).await;
    let after = client().get(stack.url("/api/me")).send().await.expect("answered");
    assert_eq!(after.status(), 200, "the proxy serves on");
}

#[tokio::test]
async fn a_continuation_flood_is_cut_before_it_ends_and_nothing_is_forwarded() {
    let stack = flood_stack().await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    stream.write_all(H2_PREFACE_AND_SETTINGS).await.expect("preface");
    stream.write_all(&frame(HEADERS, END_STREAM, 1, &get_me())).await.expect("headers");
    const FRAMES: usize = 3000;
    let mut sent = 0;
    let began = Instant::now();
    for i in 0..FRAMES {
        // A literal header, never indexed: `x-flood-<i>: <100 bytes>`.
        let name = format!("x-flood-{i}");
        let mut payload = vec![0x10, name.len() as u8];
        payload.extend_from_slice(name.as_bytes());
        payload.push(100);
        payload.extend_from_slice(&[b'v'; 100]);
        if stream.write_all(&frame(CONTINUATION, 0, 1, &payload)).await.is_err() {
            break;
        }
        sent += 1;
    }
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.closed && began.elapsed() < Duration::from_secs(2), "closed at once");
    assert!(sent < FRAMES, "cut mid-flood, after {sent} of {FRAMES} frames");
    assert_ne!(goaway_code(&answer.bytes), Some(0), "an error GOAWAY, if any, not the idle one");
    assert!(stack.sandbox.received().is_empty(), "the never-ending header block was never forwarded");
    let after = client().get(stack.url("/api/me")).send().await.expect("answered");
    assert_eq!(after.status(), 200);
}

/// An h2c connection to `addr`, driven in the background.
async fn h2c(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(connection);
    client.ready().await.expect("ready")
}

/// `POST /api/me` with these `content-length` fields.
fn post_me(lengths: &[&'static str]) -> http::Request<()> {
    let mut request = http::Request::post("http://a/api/me").body(()).expect("request");
    for length in lengths {
        request.headers_mut().append("content-length", http::HeaderValue::from_static(length));
    }
    request
}

/// HTTP/2 lets an empty `content-length`, or two that parse alike, through;
/// HTTP/1 would refuse them. The proxy refuses them too, instead of writing
/// them into an HTTP/1.1 head for Tallyfy.
#[tokio::test]
async fn a_content_length_that_is_not_one_number_is_refused_over_http2() {
    let stack = Stack::start().await;
    let mut sender = h2c(stack.proxy.proxy_addr()).await;
    for lengths in [&[""][..], &["0", "00"], &["0", ""]] {
        let (response, _) = sender.send_request(post_me(lengths), true).expect("sent");
        let response = response.await.expect("answered");
        assert_eq!(response.status(), 400, "{lengths:?}");
        sender = sender.ready().await.expect("the connection serves on");
    }
    assert!(stack.sandbox.received().is_empty(), "{:?}", stack.sandbox.received());
}

/// A caller that announces 100 bytes and resets its stream with NO_ERROR:
/// hyper reads that as the body's end. The proxy holds the body to its length
/// and writes nothing upstream, whether the body streams (a personal token) or
/// is kept for replay (an OAuth credential). hyper also drops the request once
/// it sees the reset, which hid the head the replay path used to write (it kept
/// the length and sent no body): `request_framing`'s unit test holds that case.
#[tokio::test]
async fn a_body_reset_before_its_announced_length_is_never_sent() {
    use crate::support::{Credential, Identity, Match, TestConfig, start_proxy, start_sandbox};
    for credential in [
        Credential::personal("ops", crate::support::Secret::Env(crate::support::TOKEN_ENV)),
        Credential::fixture_user(),
    ] {
        let sandbox = start_sandbox().await;
        let dir = tempfile::tempdir().expect("dir");
        let name = credential.name();
        let config = TestConfig::new(&sandbox.base_url()).credential(credential).identity(Identity::new(
            "caller",
            &name,
            Match::Any,
        ));
        let proxy = start_proxy(&config.parse(dir.path())).await;
        let mut sender = h2c(proxy.proxy_addr()).await;
        let mut request = post_me(&["100"]);
        request.headers_mut().insert("content-type", http::HeaderValue::from_static("text/plain"));
        let (response, mut body) = sender.send_request(request, false).expect("sent");
        body.send_reset(h2::Reason::NO_ERROR);
        // Answered or reset, the proxy never sends the announced bytes it did not get.
        let _ = tokio::time::timeout(Duration::from_secs(5), response).await.expect("settled");
        let url = format!("http://{}/api/me", proxy.proxy_addr());
        let after = client().get(url).send().await.expect("answered");
        assert_eq!(after.status(), 200, "{name}: the proxy serves on");
        let received = sandbox.received();
        let api: Vec<_> = received.iter().filter(|r| !r.uri.to_string().starts_with("/api/oauth/")).collect();
        assert_eq!(api.len(), 1, "{name}: only the GET reached Tallyfy's API: {received:?}");
        assert_eq!(api[0].method, http::Method::GET);
    }
}
