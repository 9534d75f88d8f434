//! The proxy's own HTTP/1.1 client against a scripted upstream on loopback: each
//! way RFC 9112 lets a response body end, interim answers, what makes a
//! connection unfit for another exchange, broken answers, and request bodies
//! as they arrive on the wire.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{TestConfig, client, start_proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream answers to one request.
#[derive(Clone)]
struct Reply {
    bytes: &'static [u8],
    /// Close the connection after the answer.
    close: bool,
    /// Bytes written unasked on the same connection, after the answer.
    then: Option<&'static [u8]>,
}

/// A plain keep-alive `200` whose body is `ok`.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

fn reply(bytes: &'static [u8]) -> Reply {
    Reply { bytes, close: false, then: None }
}

/// An upstream answering the n-th request it reads with `replies[n]` (the
/// last one over again), recording every request's bytes.
#[derive(Clone)]
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Unasked bytes written so far.
    unasked: Arc<AtomicUsize>,
}

async fn scripted(replies: Vec<Reply>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = Scripted {
        addr: listener.local_addr().expect("addr"),
        accepted: Arc::default(),
        requests: Arc::default(),
        unasked: Arc::default(),
    };
    let shared = upstream.clone();
    let replies = Arc::new(replies);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, shared.clone(), replies.clone()));
        }
    });
    upstream
}

async fn serve(mut stream: TcpStream, upstream: Scripted, replies: Arc<Vec<Reply>>) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer).await else { return };
        let index = {
            let mut requests = upstream.requests.lock().expect("requests");
            requests.push(request);
            requests.len() - 1
        };
        let reply = replies[index.min(replies.len() - 1)].clone();
        if stream.write_all(reply.bytes).await.is_err() || reply.close {
            return;
        }
        if let Some(unasked) = reply.then {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = stream.write_all(unasked).await;
            upstream.unasked.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// One request's head and body (by `Content-Length`, or chunked up to the
/// last chunk), as the bytes that came.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().expect("length"));
    let chunked = head.contains("transfer-encoding: chunked");
    let end = loop {
        match length {
            Some(length) if buffer.len() >= head_end + length => break head_end + length,
            None if !chunked => break head_end,
            None if buffer[head_end..].windows(5).any(|w| w == b"0\r\n\r\n") => {
                break head_end
                    + buffer[head_end..].windows(5).position(|w| w == b"0\r\n\r\n").expect("end")
                    + 5;
            }
            _ => {}
        }
        let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    };
    Some(buffer.drain(..end).collect())
}

async fn proxy_to(upstream: &Scripted) -> (tallyfy_proxy::app::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{}", upstream.addr)).parse(dir.path());
    (start_proxy(&config).await, dir)
}

/// Status and body of a GET through the proxy.
async fn get(proxy: &tallyfy_proxy::app::Running, path: &str) -> (u16, String) {
    let response =
        client().get(format!("http://{}{path}", proxy.proxy_addr())).send().await.expect("answered");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_else(|e| format!("<body cut off: {e}>")))
}

#[tokio::test]
async fn a_chunked_body_arrives_whole_and_its_connection_is_used_again() {
    let upstream = scripted(vec![reply(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
    )])
    .await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    for _ in 0..3 {
        assert_eq!(get(&proxy, "/api/me").await, (200, "hello world".to_owned()));
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1, "one connection for all three");
}

#[tokio::test]
async fn a_body_read_until_close_arrives_whole_and_its_connection_is_not_used_again() {
    let upstream = scripted(vec![Reply {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
        close: true,
        then: None,
    }])
    .await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    for _ in 0..2 {
        assert_eq!(get(&proxy, "/api/me").await, (200, "until the end".to_owned()));
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn interim_answers_are_passed_over() {
    let upstream = scripted(vec![reply(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok",
    )])
    .await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connection_close_and_http_1_0_answers_end_their_connection() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"[..],
        b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let upstream = scripted(vec![reply(answer)]).await;
        let (proxy, _dir) = proxy_to(&upstream).await;
        for _ in 0..2 {
            assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2, "{}", String::from_utf8_lossy(answer));
    }
}

#[tokio::test]
async fn bytes_beyond_an_answer_are_never_read_as_the_next_answer() {
    // More than the stated length, then (unasked, while idle) a whole second
    // answer: neither may reach the next request.
    let upstream = scripted(vec![
        reply(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nokSMUGGLED"),
        Reply {
            bytes: OK,
            close: false,
            then: Some(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nUNASKED!"),
        },
    ])
    .await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    for _ in 0..500 {
        if upstream.unasked.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.unasked.load(Ordering::SeqCst), 1, "the unasked answer was written");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3, "neither connection was used again");
}

#[tokio::test]
async fn answers_that_break_framing_are_a_502() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2, 3\r\n\r\n{}"[..],
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{}",
    ] {
        let upstream = scripted(vec![Reply { bytes: answer, close: true, then: None }]).await;
        let (proxy, _dir) = proxy_to(&upstream).await;
        let (status, body) = get(&proxy, "/api/me").await;
        assert_eq!(status, 502, "{}: {body}", String::from_utf8_lossy(answer));
        assert!(body.contains("upstream"), "{body}");
    }
}

#[tokio::test]
async fn head_and_no_content_answers_have_no_body_and_keep_the_connection() {
    let upstream = scripted(vec![
        // Not JSON: a JSON answer's length is left out of a HEAD's (its GET's
        // body may be rewritten), and this one's must pass on with no body after it.
        reply(b"HTTP/1.1 200 OK\r\ncontent-type: application/pdf\r\ncontent-length: 700\r\n\r\n"),
        reply(b"HTTP/1.1 204 No Content\r\n\r\n"),
        reply(OK),
    ])
    .await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    let response =
        client().head(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], "700");
    assert_eq!(get(&proxy, "/api/me").await, (204, String::new()));
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn request_bodies_go_with_a_length_or_chunked_as_the_caller_sent_them() {
    let upstream = scripted(vec![reply(OK)]).await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    let url = format!("http://{}/api/upload", proxy.proxy_addr());
    let sized = vec![b'a'; 40_000];
    let response = client()
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(sized.clone())
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(b"first,".to_vec()), Ok(b"second".to_vec())];
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let response = client()
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(streamed)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);

    let requests = upstream.requests.lock().expect("requests").clone();
    let (head, body) = split(&requests[0]);
    assert!(head.starts_with("POST /api/upload HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 40000\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    assert_eq!(body, sized);
    let (head, body) = split(&requests[1]);
    assert!(head.contains("\r\ntransfer-encoding: chunked\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("content-length"), "{head}");
    assert_eq!(dechunk(&body), b"first,second");
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

fn split(request: &[u8]) -> (String, Vec<u8>) {
    let end = request.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    (String::from_utf8_lossy(&request[..end]).into_owned(), request[end..].to_vec())
}

fn dechunk(mut wire: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let line = wire.windows(2).position(|w| w == b"\r\n").expect("size line");
        let size = usize::from_str_radix(std::str::from_utf8(&wire[..line]).expect("hex"), 16).expect("size");
        wire = &wire[line + 2..];
        if size == 0 {
            assert_eq!(wire, b"\r\n", "the last chunk ends the body");
            return data;
        }
        data.extend_from_slice(&wire[..size]);
        assert_eq!(&wire[size..size + 2], b"\r\n");
        wire = &wire[size + 2..];
    }
}

#[tokio::test]
async fn a_request_whose_body_failed_is_never_sent_again() {
    let upstream = scripted(vec![reply(OK)]).await;
    let (proxy, _dir) = proxy_to(&upstream).await;
    // A connection is pooled, so the upload below goes on a reused one.
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    // The caller sends one chunk and stops: the body fails before the proxy
    // has written anything of the request.
    let mut caller = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    caller
        .write_all(
            b"POST /api/upload HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/octet-stream\r\n\
              transfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        )
        .await
        .expect("write");
    caller.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    let _ = caller.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
    // Once the proxy has given up on it, Tallyfy holds no complete second request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(&proxy, "/api/me").await, (200, "ok".to_owned()));
    let requests = upstream.requests.lock().expect("requests").clone();
    let heads: Vec<String> =
        requests.iter().map(|r| split(r).0.lines().next().unwrap_or_default().to_owned()).collect();
    assert_eq!(
        heads,
        ["GET /api/me HTTP/1.1", "GET /api/me HTTP/1.1"],
        "the failed upload never reached Tallyfy whole"
    );
}

/// An upstream that refuses every upload from its head (a 413 that closes),
/// then neither reads nor closes for a while.
async fn refusing_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let refusal =
                    b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-type: text/plain\r\n\
                                content-length: 8\r\n\r\ntoo big!";
                let _ = stream.write_all(refusal).await;
                tokio::time::sleep(Duration::from_secs(20)).await;
            });
        }
    });
    addr
}

async fn proxy_for_uploads(addr: SocketAddr) -> (tallyfy_proxy::app::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{addr}"))
        .set("server", "max_request_body_bytes", 256 * 1024 * 1024)
        .set("upstream", "request_timeout_ms", 15_000)
        .parse(dir.path());
    (start_proxy(&config).await, dir)
}

#[tokio::test]
async fn a_refusal_reaches_a_slow_uploader_before_its_upload_ends() {
    let (proxy, _dir) = proxy_for_uploads(refusing_upstream().await).await;
    let mut caller = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    caller
        .write_all(
            b"POST /api/upload HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/octet-stream\r\n\
              content-length: 1000000\r\n\r\nthe first bytes of a long upload",
        )
        .await
        .expect("write");
    // The caller sends nothing more; the refusal comes anyway.
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), caller.read(&mut answer)).await;
    let n = read.expect("answered while the upload was still open").expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn an_answer_given_before_tallyfy_takes_the_upload_is_the_response() {
    // Tallyfy refuses the upload from its head, then neither reads nor closes.
    let (proxy, _dir) = proxy_for_uploads(refusing_upstream().await).await;
    let upload = vec![b'x'; 64 * 1024 * 1024];
    let response = client()
        .post(format!("http://{}/api/upload", proxy.proxy_addr()))
        .header("content-type", "application/octet-stream")
        .body(upload)
        .send()
        .await;
    // The caller may still be writing when the answer comes; either way it is
    // the refusal, not a timeout.
    let response = response.expect("answered");
    assert_eq!(response.status(), 413);
    assert_eq!(response.text().await.expect("body"), "too big!");
}
