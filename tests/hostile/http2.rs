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
