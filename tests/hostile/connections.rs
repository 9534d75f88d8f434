//! Connections that hold a socket without asking for anything.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{SERVER, exchange, read_response, read_until_closed, stack};
use crate::support::{Stack, scrape};

/// The HTTP/2 client preface and an empty SETTINGS frame.
pub const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn peers_that_send_nothing_or_stall_in_the_preface_are_cut_at_the_header_timeout() {
    let stack = stack().await;
    for start in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        let began = Instant::now();
        let answer = exchange(stack.proxy.proxy_addr(), start, Duration::from_secs(5)).await;
        assert!(answer.closed, "{start:?}: still open after 5 s");
        assert!(answer.bytes.is_empty(), "{start:?}: nothing to answer, {:?}", answer.text());
        let took = began.elapsed();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "{start:?}: closed after {took:?}"
        );
    }
    assert!(stack.sandbox.received().is_empty(), "nothing reached Tallyfy");
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let stack = stack().await;
    // A polite client (it answers pings): the idle timeout (600 ms, checked every
    // quarter) closes it with a graceful GOAWAY.
    let tcp = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    let (_client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let began = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("closed by the proxy")
        .expect("gracefully");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1000),
        "closed after {took:?}"
    );

    // A peer that never answers pings is dropped when a ping goes unanswered
    // (every half idle timeout, at least 1 s, and as long to answer).
    let began = Instant::now();
    let answer = exchange(stack.proxy.proxy_addr(), H2_PREFACE_AND_SETTINGS, Duration::from_secs(5)).await;
    assert!(answer.closed && began.elapsed() < Duration::from_secs(3), "closed after {:?}", began.elapsed());
    assert!(crate::http2::goaway_code(&answer.bytes).is_some(), "with a GOAWAY");
    assert!(stack.sandbox.received().is_empty());
}

#[tokio::test]
async fn a_slowloris_head_is_cut_and_never_forwarded() {
    let stack = stack().await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    stream.write_all(b"GET /api/me HTTP/1.1\r\nHost: a\r\n").await.expect("write");
    let began = Instant::now();
    let cut = trickle(&mut stream, 40, Duration::from_millis(100)).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(cut || answer.closed, "the trickling head was cut");
    assert!(began.elapsed() < Duration::from_secs(4));
    assert!(stack.sandbox.received().is_empty());
}

#[tokio::test]
async fn a_kept_alive_http1_connection_does_not_stay_open_forever() {
    let stack = stack().await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    stream.write_all(b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.text().starts_with("HTTP/1.1 200"), "{}", answer.text());
    assert!(answer.closed, "closed once idle for the header read timeout");
}

#[tokio::test]
async fn an_http1_idle_timeout_shorter_than_the_head_deadline_closes_first() {
    // The head deadline far away: only the idle timeout can close it.
    let stack = stack_with_timers(30_000, 300).await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    stream.write_all(b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.text().starts_with("HTTP/1.1 200"), "{}", answer.text());
    assert!(answer.closed, "closed within 5 s, once idle for the idle timeout");
}

#[tokio::test]
async fn a_kept_alive_connection_whose_next_head_trickles_is_cut() {
    // The idle timeout far away, so only the head deadline can cut it.
    let stack = stack_with_timers(400, 30_000).await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    stream.write_all(b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
    let first = read_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The next head starts at once and then trickles: its deadline runs from the
    // first response's end (400 ms, checked every quarter).
    stream.write_all(b"GET /api/me HTTP/1.1\r\nHost: a\r\n").await.expect("write");
    let began = Instant::now();
    let cut = trickle(&mut stream, 30, Duration::from_millis(50)).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(cut || answer.closed, "the trickling head was cut");
    assert!(answer.bytes.is_empty(), "a cut head gets no answer: {:?}", answer.text());
    assert!(began.elapsed() < Duration::from_millis(1500), "cut after {:?}", began.elapsed());
    assert_eq!(stack.sandbox.received().len(), 1, "only the first request reached Tallyfy");
}

#[tokio::test]
async fn requests_in_steady_succession_outlive_the_head_deadline() {
    let stack = stack().await;
    let mut stream = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    let began = Instant::now();
    // Eight requests 150 ms apart: 1.2 s on one connection, three times the head
    // deadline, and each head well within it of the response before.
    for n in 0..8 {
        stream.write_all(b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
        let answer = read_response(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {n}: {answer}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(began.elapsed() > Duration::from_secs(1));
    assert_eq!(stack.sandbox.received().len(), 8);
}

/// The sandbox and a proxy with an `any` identity, this head deadline and idle timeout.
async fn stack_with_timers(header_read_timeout_ms: i64, idle_timeout_ms: i64) -> Stack {
    Stack::start_with(|c| {
        c.set("server", "header_read_timeout_ms", header_read_timeout_ms).set(
            "server",
            "idle_timeout_ms",
            idle_timeout_ms,
        )
    })
    .await
}

/// Writes one more byte of a head every `every`, `times` times; whether a write
/// failed because the proxy cut the connection.
async fn trickle(stream: &mut TcpStream, times: usize, every: Duration) -> bool {
    for _ in 0..times {
        tokio::time::sleep(every).await;
        if stream.write_all(b"X").await.is_err() {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once_and_counted() {
    let stack = Stack::start_with(|c| {
        c.set("server", "header_read_timeout_ms", 5000).set("server", "max_connections", 3)
    })
    .await;
    let addr = stack.proxy.proxy_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Let the accept loop take the three before the fourth arrives.
    let admin = stack.proxy.admin_addr();
    let open = r#"tallyfy_proxy_connections_open{listener="proxy"} 3"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !scrape(admin).await.contains(open) {
        assert!(Instant::now() < deadline, "three connections open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let began = Instant::now();
    let fourth = exchange(addr, b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n", Duration::from_secs(3)).await;
    assert!(fourth.closed && fourth.bytes.is_empty(), "the fourth is closed unanswered: {:?}", fourth.text());
    assert!(began.elapsed() < Duration::from_secs(1), "at once, not at a timeout");
    let metrics = scrape(admin).await;
    assert!(metrics.contains(r#"tallyfy_proxy_connections_refused_total{listener="proxy"} 1"#), "{metrics}");

    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = exchange(
            addr,
            b"GET /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        if !answer.bytes.is_empty() {
            assert_eq!(answer.status(), 200, "a freed place serves again");
            break;
        }
        assert!(Instant::now() < deadline, "the closed connection's place is freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_admin_listener_cuts_silent_peers_too() {
    let stack = stack().await;
    assert!(SERVER.contains(&("header_read_timeout_ms", 400)));
    for start in [&b""[..], b"P"] {
        let answer = exchange(stack.proxy.admin_addr(), start, Duration::from_secs(5)).await;
        assert!(answer.closed && answer.bytes.is_empty(), "{start:?}");
    }
}
