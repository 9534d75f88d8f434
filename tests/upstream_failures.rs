//! When Tallyfy is down, silent, or behind TLS; and a drain that finishes what it started.

mod support;

use std::time::Duration;

use support::{TestConfig, client, closed_port, start_proxy, tls_sandbox};
use tokio::net::{TcpListener, TcpStream};

async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    body["error"]["code"].as_str().expect("error.code").to_owned()
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    let down = closed_port();
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{}", down.addr))
        .set("upstream", "connect_timeout_ms", 500)
        .parse(dir.path());
    let proxy = start_proxy(&config).await;
    let response =
        client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
    assert_eq!(response.status(), 502);
    assert_eq!(error_code(response).await, "upstream_unreachable");
}

/// A TLS handshake Tallyfy's side never answers is a failed connect, within
/// `connect_timeout_ms` (502 `upstream_unreachable`, and retryable as one),
/// not a request timeout: the TCP connect alone used to be bounded.
#[tokio::test]
async fn a_tls_handshake_that_stalls_is_a_502_within_the_connect_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("https://{addr}"))
        .set("upstream", "connect_timeout_ms", 300)
        .set("upstream", "request_timeout_ms", 10_000)
        .parse(dir.path());
    let proxy = start_proxy(&config).await;
    let began = std::time::Instant::now();
    let asked = client().get(format!("http://{}/api/me", proxy.proxy_addr())).send();
    let response =
        tokio::time::timeout(Duration::from_secs(8), asked).await.expect("in time").expect("answered");
    assert_eq!(response.status(), 502);
    assert_eq!(error_code(response).await, "upstream_unreachable");
    assert!(began.elapsed() < Duration::from_secs(5), "not the request timeout: {:?}", began.elapsed());
    holder.abort();
}

#[tokio::test]
async fn a_silent_upstream_is_a_504() {
    // Accepts connections and reads requests, but never answers.
    let (upstream, holder) = holding_upstream(b"").await;
    answers_504_after_the_300_ms_timeout(upstream).await;
    holder.abort();
}

#[tokio::test]
async fn a_json_answer_that_stalls_mid_body_is_a_504() {
    // Answers with a JSON head and the start of its body, then holds the rest:
    // the body is read for links, within the request timeout.
    let answer =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"data\":[";
    let (upstream, holder) = holding_upstream(answer).await;
    answers_504_after_the_300_ms_timeout(upstream).await;
    holder.abort();
}

/// A JSON answer read for its links that keeps coming, slower in all than
/// the request timeout, streams on from then as it is, its links as Tallyfy
/// wrote them, as an answer too large to hold does (it used to be a 504 at
/// 300 ms, Tallyfy's answer lost).
#[tokio::test]
async fn a_json_answer_that_arrives_slowly_but_steadily_is_passed_on_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let body =
        format!(r#"{{"data":[],"links":{{"next":"http://{upstream}/api/organizations/org/runs?page=2"}}}}"#);
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let _ = read_head(&mut stream).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await.expect("head");
        // 100 ms between pieces, about 1.2 s in all against a 300 ms timeout.
        for piece in body.as_bytes().chunks(body.len().div_ceil(12)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::io::AsyncWriteExt::write_all(&mut stream, piece).await.expect("piece");
        }
        stream
    });
    let (response, _proxy, began) = get_me_with_a_300_ms_timeout(upstream).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("the body");
    assert!(began.elapsed() > Duration::from_millis(900), "the body came slowly: {:?}", began.elapsed());
    let tallyfy_link = format!("http://{upstream}/api/organizations/org/runs?page=2");
    assert_eq!(text, format!(r#"{{"data":[],"links":{{"next":"{tallyfy_link}"}}}}"#), "whole, as it came");
    drop(server.await.expect("upstream"));
}

/// An upstream that reads each request head, writes `first` (nothing: it
/// never answers) and holds the connection open.
async fn holding_upstream(first: &'static [u8]) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = read_head(&mut stream).await;
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, first).await;
            held.push(stream);
        }
    });
    (addr, holder)
}

/// `GET /api/me` through a proxy with a 300 ms request timeout in front of
/// `upstream`, answered within 10 s: the answer, the proxy (and its
/// config's directory), and when it was asked.
async fn get_me_with_a_300_ms_timeout(
    upstream: std::net::SocketAddr,
) -> (reqwest::Response, (tallyfy_proxy::app::Running, tempfile::TempDir), std::time::Instant) {
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{upstream}"))
        .set("upstream", "request_timeout_ms", 300)
        .parse(dir.path());
    let proxy = start_proxy(&config).await;
    let began = std::time::Instant::now();
    let asked = client().get(format!("http://{}/api/me", proxy.proxy_addr())).send();
    let response =
        tokio::time::timeout(Duration::from_secs(10), asked).await.expect("in time").expect("answered");
    (response, (proxy, dir), began)
}

/// [`get_me_with_a_300_ms_timeout`]: a 504 `upstream_timeout`, neither early nor late.
async fn answers_504_after_the_300_ms_timeout(upstream: std::net::SocketAddr) {
    let (response, _proxy, began) = get_me_with_a_300_ms_timeout(upstream).await;
    assert_eq!(response.status(), 504);
    assert_eq!(error_code(response).await, "upstream_timeout");
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "504 after {took:?}");
}

#[tokio::test]
async fn a_caller_body_that_stalls_while_it_is_read_is_a_408_and_nothing_is_forwarded() {
    let down = closed_port();
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{}", down.addr))
        .set("upstream", "request_timeout_ms", 300)
        .parse(dir.path());
    let proxy = start_proxy(&config).await;
    let mut caller = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    let began = std::time::Instant::now();
    let head = b"POST /api/organizations/org/runs HTTP/1.1\r\nHost: proxy\r\nX-Api-Key: any\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"deadline\":";
    tokio::io::AsyncWriteExt::write_all(&mut caller, head).await.expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut caller))
        .await
        .expect("answered in time");
    let took = began.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "408 after {took:?}");
}

/// Reads up to the end of a head (or the peer's close), as text.
async fn read_head(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    while !bytes.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads one answer with a `Content-Length`, head and body, as text.
async fn read_answer(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = read_head(stream).await;
    let length: usize = text
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
        })
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("a length: {text}"));
    let have = text.split_once("\r\n\r\n").map_or(0, |(_, body)| body.len());
    let mut rest = vec![0u8; length.saturating_sub(have)];
    stream.read_exact(&mut rest).await.expect("the body");
    text.push_str(&String::from_utf8_lossy(&rest));
    text
}

#[tokio::test]
async fn exchanges_each_within_the_timeout_pass_however_long_the_connection_lives() {
    // Each answer takes 400 ms against a 1.5 s timeout, on one pooled
    // connection: the silence is measured per exchange, not per connection
    // (the five together last longer than the timeout).
    let (upstream, _arrived) = support::slow_upstream(Duration::from_millis(400)).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{upstream}"))
        .set("upstream", "request_timeout_ms", 1500)
        .parse(dir.path());
    let proxy = start_proxy(&config).await;
    let client = client();
    for n in 0..5 {
        let response =
            client.get(format!("http://{}/api/slow", proxy.proxy_addr())).send().await.expect("answered");
        assert_eq!(response.status(), 200, "request {n}");
        assert_eq!(response.text().await.expect("body"), "{\"ok\":true}");
    }
}

#[tokio::test]
async fn tls_upstreams_are_verified_against_the_configured_ca_and_speak_h2() {
    let (sandbox, dir, base) = tls_sandbox(&[b"h2", b"http/1.1"]).await;

    let trusting = TestConfig::personal_any(&base).set("upstream", "ca_file", "ca.pem").parse(dir.path());
    let proxy = start_proxy(&trusting).await;
    let response =
        client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    let received = sandbox.received();
    assert_eq!(received.last().expect("forwarded").version, http::Version::HTTP_2, "ALPN chose h2");

    let untrusting = TestConfig::personal_any(&base).parse(dir.path());
    let proxy = start_proxy(&untrusting).await;
    let response =
        client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
    assert_eq!(response.status(), 502, "an unknown CA is never trusted");
    assert_eq!(received.len(), sandbox.received().len(), "nothing was delivered");
}

#[tokio::test]
async fn tls_upstreams_that_speak_only_http_1_1_are_answered_over_http_1_1() {
    let (sandbox, dir, base) = tls_sandbox(&[b"http/1.1"]).await;
    let config = TestConfig::personal_any(&base).set("upstream", "ca_file", "ca.pem").parse(dir.path());
    let proxy = start_proxy(&config).await;
    for n in 0..3 {
        let response =
            client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
        assert_eq!(response.status(), 200, "request {n}");
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert!(body.get("data").is_some(), "{body}");
    }
    let received = sandbox.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.version == http::Version::HTTP_11), "ALPN chose HTTP/1.1");
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_refuses_new_connections() {
    let (upstream, mut arrived) = support::slow_upstream(Duration::from_millis(400)).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = TestConfig::personal_any(&format!("http://{upstream}"))
        .set("server", "shutdown_grace_ms", 5000)
        .parse(dir.path());
    let mut proxy = start_proxy(&config).await;
    let addr = proxy.proxy_addr();

    let in_flight = tokio::spawn(async move { client().get(format!("http://{addr}/api/slow")).send().await });
    arrived.recv().await.expect("the request reached the upstream");
    proxy.begin_shutdown();

    let response = in_flight.await.expect("task").expect("the in-flight request was not cut");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "{\"ok\":true}");
    proxy.stopped().await;
    assert!(TcpStream::connect(addr).await.is_err(), "new connections are refused");
}
