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
pub(super) async fn h2c(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
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

/// HPACK for `POST http://a/api/me` with this `content-type`, and no length.
fn post_me_of(content_type: &str) -> Vec<u8> {
    post_of("/api/me", content_type)
}

/// HPACK for `POST http://a{path}` (under 127 bytes) with this `content-type`,
/// and no length.
fn post_of(path: &str, content_type: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'a', 0x00, 12]);
    block.extend_from_slice(b"content-type");
    block.push(content_type.len() as u8);
    block.extend_from_slice(content_type.as_bytes());
    block
}

/// A caller that streams part of a body of no announced length and resets its
/// stream with NO_ERROR: HEADERS without END_STREAM, DATA `hello` without
/// END_STREAM, and 200 ms later RST_STREAM(NO_ERROR). hyper reads the reset as
/// the body's end; the proxy used to write the chunked body's last chunk (or,
/// for a body read whole, send it with its length on a pooled connection), and
/// Tallyfy got a request the caller abandoned as a complete one. It must not be
/// finished upstream, whether the body streams (Tallyfy over HTTP/1.1 or
/// HTTP/2) or is read whole to judge a `_method` (a narrow identity's form). A
/// body the caller does end goes whole, as the control after each shows.
#[tokio::test]
async fn a_body_of_no_length_reset_mid_way_is_never_finished_upstream() {
    use crate::support::{Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, start_proxy};
    const DATA: u8 = 0x0;
    let narrow = Identity::new("narrow", "ops", Match::Any).with("methods", vec!["GET", "POST"]);
    let caller = Identity::new("caller", "ops", Match::Any);
    let cases = [
        ("streamed to Tallyfy over HTTP/1.1", "text/plain", false, caller.clone()),
        ("streamed to Tallyfy over HTTP/2", "text/plain", true, caller),
        ("read whole to judge _method", "application/x-www-form-urlencoded", false, narrow),
    ];
    for (name, content_type, h2_upstream, identity) in cases {
        // Tallyfy over HTTP/1.1: a server of the test's own, which sees every
        // request as its bytes arrive (the sandbox drops a request whose
        // connection closes). Over HTTP/2: the sandbox, which records a stream
        // reset before its end as an incomplete body.
        let (upstream, dir, base) = if h2_upstream {
            let (sandbox, dir, base) = crate::support::tls_sandbox(&[b"h2"]).await;
            (Upstream::Sandbox(sandbox), dir, base)
        } else {
            let (base, requests) = answering_recorder().await;
            (Upstream::Recorder(requests), tempfile::tempdir().expect("dir"), base)
        };
        let mut config =
            TestConfig::new(&base).credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)));
        if h2_upstream {
            config = config.set("upstream", "ca_file", "ca.pem");
        }
        let proxy = start_proxy(&config.identity(identity).parse(dir.path())).await;
        // A connection to Tallyfy is pooled, as on a busy proxy.
        let warm = client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await;
        assert!(warm.expect("answered").status().as_u16() < 500, "{name}");

        let mut tcp = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
        let mut attack = H2_PREFACE_AND_SETTINGS.to_vec();
        attack.extend(frame(HEADERS, END_HEADERS, 1, &post_me_of(content_type)));
        attack.extend(frame(DATA, 0, 1, b"hello"));
        tcp.write_all(&attack).await.expect("sent");
        // The part reaches Tallyfy before the reset, as a slow upload's would
        // (the recorder shows it under way; the others give it the time).
        let streamed = content_type == "text/plain";
        if streamed && matches!(upstream, Upstream::Recorder(_)) {
            for _ in 0..80 {
                if upstream.posts() == [None] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert_eq!(upstream.posts(), [None], "{name}: the upload is under way at Tallyfy");
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tcp.write_all(&frame(RST_STREAM, 0, 1, &0u32.to_be_bytes())).await.expect("reset");
        // Once the proxy has answered another caller after the reset, the
        // abandoned request's upstream connection or stream is gone: a request
        // begun upstream is recorded by then, complete or not.
        let after = client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await;
        assert!(after.expect("answered").status().as_u16() < 500, "{name}: the proxy serves on");
        if !streamed {
            // Nothing was under way: give a request wrongly sent the time to show.
            for _ in 0..20 {
                if !upstream.posts().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        let settled = upstream.posts_settled().await;
        assert!(settled.iter().all(|complete| !complete), "{name}: finished upstream: {settled:?}");
        drop(tcp);

        // The control: the same body, ended by the caller, goes whole.
        let mut sender = h2c(proxy.proxy_addr()).await;
        let mut request = http::Request::post("http://a/api/me").body(()).expect("request");
        request.headers_mut().insert("content-type", http::HeaderValue::from_static(content_type));
        let (response, mut body) = sender.send_request(request, false).expect("sent");
        body.send_data(bytes::Bytes::from_static(b"hello"), false).expect("data");
        tokio::time::sleep(Duration::from_millis(200)).await;
        body.send_data(bytes::Bytes::new(), true).expect("end");
        let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("answered");
        assert_eq!(response.expect("answered").status(), 404, "{name}: Tallyfy's answer (no POST /api/me)");
        let settled = upstream.posts_settled().await;
        assert_eq!(settled.iter().filter(|complete| **complete).count(), 1, "{name}: the ended body went");
    }
}

/// Where the test sees what reached Tallyfy.
enum Upstream {
    Sandbox(tallyfy_sandbox::Sandbox),
    Recorder(Recorded),
}

impl Upstream {
    /// Each `POST` that reached Tallyfy: whether it came whole, `None` while
    /// it is arriving (the sandbox shows a request only once it settled).
    fn posts(&self) -> Vec<Option<bool>> {
        match self {
            Upstream::Sandbox(sandbox) => sandbox
                .received()
                .into_iter()
                .filter(|r| r.method == http::Method::POST)
                .map(|r| Some(r.body_complete))
                .collect(),
            Upstream::Recorder(requests) => requests
                .lock()
                .expect("not poisoned")
                .iter()
                .filter(|(head, _)| head.starts_with(b"POST"))
                .map(|(_, complete)| *complete)
                .collect(),
        }
    }

    /// Whether each `POST` that reached Tallyfy came whole, once none is still
    /// arriving (waiting up to a second for one in flight to settle).
    async fn posts_settled(&self) -> Vec<bool> {
        for _ in 0..40 {
            let posts = self.posts();
            if posts.iter().all(Option::is_some) {
                return posts.into_iter().flatten().collect();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("a request to Tallyfy never settled");
    }
}

/// An HTTP/1.1 upstream that answers every whole request `404` with an empty
/// body, and records each request's head as it arrives, then whether its body
/// (chunked, or of a `content-length`) came whole before its connection closed.
async fn answering_recorder() -> (String, Recorded) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let requests = Recorded::default();
    let record = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut current: Option<usize> = None;
                loop {
                    let whole = buffer.windows(4).position(|w| w == b"\r\n\r\n").and_then(|end| {
                        let mut requests = record.lock().expect("not poisoned");
                        let at = *current.get_or_insert_with(|| {
                            requests.push((buffer[..end].to_vec(), None));
                            requests.len() - 1
                        });
                        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                        let body = &buffer[end + 4..];
                        let done = if head.contains("transfer-encoding: chunked") {
                            body.windows(5).position(|w| w == b"0\r\n\r\n").map(|at| at + 5)
                        } else {
                            let length = head
                                .lines()
                                .find_map(|line| line.strip_prefix("content-length:"))
                                .map_or(0, |n| n.trim().parse::<usize>().expect("a length"));
                            (body.len() >= length).then_some(length)
                        }?;
                        requests[at].1 = Some(true);
                        Some(end + 4 + done)
                    });
                    if let Some(used) = whole {
                        buffer.drain(..used);
                        current = None;
                        let answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(n) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
                        _ => {
                            if let Some(at) = current {
                                record.lock().expect("not poisoned")[at].1 = Some(false);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    (base, requests)
}

/// The heads an [`answering_recorder`] saw, each with whether its body came
/// whole (`None` while it is still arriving).
type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(Vec<u8>, Option<bool>)>>>;

/// An upload its caller abandons with RST_STREAM(NO_ERROR) while the proxy
/// reads it (a narrow identity's form, read to judge its `_method`) never
/// reaches Tallyfy, and spends nothing of a `[[limits]]` cap: hyper drops the
/// request when it finds the reset, and what the limits counted goes back. One
/// abandoned once it was under way at Tallyfy (a streamed body) keeps its count:
/// it was sent.
#[tokio::test]
async fn an_upload_abandoned_while_it_is_read_spends_no_limit() {
    use crate::support::{
        Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, start_proxy, start_sandbox, table,
    };
    const DATA: u8 = 0x0;
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let guests = format!("/api/organizations/{}/guests", tallyfy_sandbox::fixtures::ORG_ID);
    let cap = table([
        ("name", "guest-invites".into()),
        ("methods", toml::Value::from(vec!["POST"])),
        ("path", "/api/organizations/{org}/guests".into()),
        ("max", 2.into()),
        ("per_seconds", 3600.into()),
    ]);
    let config = TestConfig::new(&sandbox.base_url())
        .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
        .identity(Identity::new("narrow", "ops", Match::Any).with("methods", vec!["GET", "POST"]))
        .limit(cap);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let abandoned = format!("path=\"{guests}\" status=499");
    let lines = || {
        let log = super::access_log().lock().expect("not poisoned").clone();
        String::from_utf8_lossy(&log).matches(abandoned.as_str()).count()
    };
    let before = lines();
    // Read whole (a form), then streamed (an opaque body): each abandoned.
    for (content_type, nth) in [("application/x-www-form-urlencoded", 1), ("text/plain", 2)] {
        let mut tcp = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
        let mut attack = H2_PREFACE_AND_SETTINGS.to_vec();
        attack.extend(frame(HEADERS, END_HEADERS, 1, &post_of(&guests, content_type)));
        attack.extend(frame(DATA, 0, 1, b"email=a"));
        tcp.write_all(&attack).await.expect("sent");
        tokio::time::sleep(Duration::from_millis(200)).await;
        tcp.write_all(&frame(RST_STREAM, 0, 1, &0u32.to_be_bytes())).await.expect("reset");
        // The abandoned request's line: it is over.
        for _ in 0..200 {
            if lines() >= before + nth {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(lines(), before + nth, "{content_type}: abandoned");
    }
    let body = serde_json::json!({ "email": "guest@example.com" });
    let post = || client().post(format!("http://{}{guests}", proxy.proxy_addr())).json(&body).send();
    assert_eq!(post().await.expect("answered").status(), 201, "the read one spent nothing");
    let over = post().await.expect("answered");
    assert_eq!(over.status(), 429, "the streamed one and this one spent the cap");
    let refusal: serde_json::Value = over.json().await.expect("JSON");
    assert_eq!(refusal["error"]["code"], "rate_limited", "{refusal}");
}
