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
    assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(3), "closed after {took:?}");

    // A peer that never answers pings is dropped when a ping goes unanswered
    // (every half idle timeout, at least 1 s, and as long to answer).
    let began = Instant::now();
    let answer = exchange(stack.proxy.proxy_addr(), H2_PREFACE_AND_SETTINGS, Duration::from_secs(5)).await;
    assert!(answer.closed && began.elapsed() < Duration::from_secs(5), "closed after {:?}", began.elapsed());
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
    // Another socket of the proxy port (the binary serves one per CPU) shares the places.
    let extra = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    extra.set_nonblocking(true).expect("nonblocking");
    let extra_addr = extra.local_addr().expect("addr");
    tokio::spawn(stack.proxy.proxy_server(extra));
    let other =
        exchange(extra_addr, b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n", Duration::from_secs(3)).await;
    assert!(
        other.closed && other.bytes.is_empty(),
        "closed unanswered on another socket: {:?}",
        other.text()
    );
    let metrics = scrape(admin).await;
    assert!(metrics.contains(r#"tallyfy_proxy_connections_refused_total{listener="proxy"} 2"#), "{metrics}");

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

/// The admin port's places go to probes: an HTTP/2 peer that answers pings
/// and asks nothing is let go after 5 s, however long `idle_timeout_ms` (60 s
/// here, the default). 256 such peers used to hold every place for a minute
/// at a time, and the kubelet's `/livez` found the port full.
#[tokio::test]
async fn the_admin_listener_lets_an_idle_http2_peer_go_within_5_seconds() {
    let stack = Stack::start_with(|config| config.set("server", "header_read_timeout_ms", 400)).await;
    let tcp = TcpStream::connect(stack.proxy.admin_addr()).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let (response, _) = client
        .send_request(http::Request::get("http://a/livez").body(()).expect("request"), true)
        .expect("sent");
    assert_eq!(response.await.expect("answered").status(), 200);
    let began = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(9), connection).await;
    assert!(ended.is_ok(), "let go within the admin cap, not the 60 s idle timeout");
    assert!(began.elapsed() >= Duration::from_secs(4), "at the cap: {:?}", began.elapsed());
}

/// One peer address keeping its admin connections busy (a `/livez` every few
/// seconds on each, so no timer ever fires) holds at most 16 of the port's 256
/// places: another address (the kubelet's) still has its probe answered. One
/// peer used to be able to take all 256 and fail the pod's liveness probe.
#[tokio::test]
async fn one_peer_cannot_take_every_admin_place() {
    // The default timers (the admin port's at 5 s): the held connections stay.
    let stack = Stack::start_with(|config| config).await;
    let admin = stack.proxy.admin_addr();
    let livez = b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        stream.write_all(livez).await.expect("write");
        assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"), "one of the peer's 16");
        held.push(stream);
    }
    let seventeenth = exchange(admin, livez, Duration::from_secs(5)).await;
    assert!(seventeenth.closed && seventeenth.bytes.is_empty(), "{:?}", seventeenth.text());
    // Another address on the loopback network: the kubelet's probe.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
    let mut kubelet = socket.connect(admin).await.expect("connect");
    kubelet.write_all(livez).await.expect("write");
    assert!(read_response(&mut kubelet).await.starts_with("HTTP/1.1 200"), "another peer is answered");
    // A place given back is the peer's again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = exchange(admin, livez, Duration::from_millis(300)).await;
        if answer.text().starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the place never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the admin listener at `admin` reports `line`, or fails naming `what`.
async fn metrics_show(admin: std::net::SocketAddr, line: &str, within: Duration, what: &str) -> Duration {
    let began = Instant::now();
    loop {
        if scrape(admin).await.contains(line) {
            return began.elapsed();
        }
        assert!(began.elapsed() < within, "{what}: no `{line}` within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const OPEN_ONE: &str = r#"tallyfy_proxy_connections_open{listener="proxy"} 1"#;
const OPEN_NONE: &str = r#"tallyfy_proxy_connections_open{listener="proxy"} 0"#;

/// The sandbox and a proxy that cuts a connection whose responses stop moving
/// for 600 ms, and keeps idle ones a minute (so only the stall can end them).
async fn send_timeout_stack() -> Stack {
    Stack::start_with(|c| c.set("server", "send_timeout_ms", 600).set("server", "idle_timeout_ms", 60_000))
        .await
}

/// A caller that asks for a 64 MiB download on a tiny receive buffer and
/// never reads: once the socket buffers are full the response stops moving,
/// and the connection (and with it the upstream one) is cut, where it used to
/// be held as long as the caller liked.
#[tokio::test]
async fn an_http1_caller_that_never_reads_its_response_is_cut_at_the_send_timeout() {
    let stack = send_timeout_stack().await;
    let admin = stack.proxy.admin_addr();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut stream = socket.connect(stack.proxy.proxy_addr()).await.expect("connect");
    let org = tallyfy_sandbox::fixtures::ORG_ID;
    let request =
        format!("GET /api/organizations/{org}/file/f1/dl?bytes=67108864 HTTP/1.1\r\nHost: a\r\n\r\n");
    // The stall cannot begin before the request is sent: whatever the
    // machine's speed, the cut comes at least the send timeout after this.
    let began = Instant::now();
    stream.write_all(request.as_bytes()).await.expect("request");
    metrics_show(admin, OPEN_ONE, Duration::from_secs(5), "the download's connection").await;
    metrics_show(admin, OPEN_NONE, Duration::from_secs(5), "the stalled connection is cut").await;
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(600), "not before the send timeout: {took:?}");
    drop(stream);
}

/// An HTTP/2 caller that sets its stream window to 0 and answers pings: every
/// response head goes out, no body can, and the connection is cut at the send
/// timeout instead of holding its streams forever.
#[tokio::test]
async fn an_http2_caller_that_never_opens_its_window_is_cut_at_the_send_timeout() {
    let stack = send_timeout_stack().await;
    let admin = stack.proxy.admin_addr();
    let tcp = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2c handshake");
    let connection = tokio::spawn(connection);
    // No body can move from the first request on: the cut comes at least the
    // send timeout after this, however slowly the heads arrive.
    let began = Instant::now();
    let mut heads = Vec::new();
    for _ in 0..3 {
        let mut client = client.clone().ready().await.expect("ready");
        let request = http::Request::get("http://a/api/me").body(()).expect("request");
        let (response, _) = client.send_request(request, true).expect("sent");
        heads.push(tokio::time::timeout(Duration::from_secs(5), response).await.expect("head").expect("ok"));
    }
    assert!(heads.iter().all(|head| head.status() == 200), "the heads went out");
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "the proxy ended the connection");
    assert!(
        began.elapsed() >= Duration::from_millis(600),
        "not before the send timeout: {:?}",
        began.elapsed()
    );
    metrics_show(admin, OPEN_NONE, Duration::from_secs(2), "and let go of it").await;
}

/// A peer that agrees on h2 by ALPN, completes the TLS handshake and says
/// nothing: the preface must come within the header read timeout (400 ms
/// here), as on a plain connection. It used to be held until the idle close,
/// which could not end a connection whose preface never came.
#[tokio::test]
async fn a_tls_peer_that_agrees_on_h2_and_sends_no_preface_is_cut_at_the_header_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(dir.path().join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).expect("write");
    let sandbox = crate::support::start_sandbox().await;
    let tls = crate::support::table([("cert", "server.pem".into()), ("key", "server.key".into())]);
    let config = super::short_timers(crate::support::TestConfig::personal_any(&sandbox.base_url()))
        .set("listen", "tls", tls);
    let proxy = crate::support::start_proxy(&config.parse(dir.path())).await;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("trusted");
    let mut client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 agreed");
    let began = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 1024];
        // Whatever the proxy writes (an early SETTINGS), until it closes.
        while tokio::io::AsyncReadExt::read(&mut tls, &mut buffer).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "the proxy ended the connection");
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(350) && took < Duration::from_secs(2), "cut after {took:?}");
    assert!(sandbox.received().is_empty());
}

/// An HTTP/2 caller that reads one download slowly and leaves another
/// unread: the unread one's stalled stream (and its upstream connection) is
/// not kept alive by its busy sibling; the connection is cut at the send
/// timeout, as a connection whose only response stalls would be.
#[tokio::test]
async fn one_stalled_http2_stream_is_found_however_busy_its_siblings() {
    let stack = send_timeout_stack().await;
    let tcp = TcpStream::connect(stack.proxy.proxy_addr()).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_connection_window_size(64 * 1024 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2c handshake");
    let connection = tokio::spawn(connection);
    let org = tallyfy_sandbox::fixtures::ORG_ID;
    let download = format!("http://a/api/organizations/{org}/file/f1/dl?bytes=67108864");
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let mut client = client.clone().ready().await.expect("ready");
        let request = http::Request::get(&download).body(()).expect("request");
        let (response, _) = client.send_request(request, true).expect("sent");
        let response =
            tokio::time::timeout(Duration::from_secs(5), response).await.expect("head").expect("ok");
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    let _unread = bodies.pop();
    let mut busy = bodies.pop().expect("the busy one");
    let began = Instant::now();
    let mut taken = 0;
    // About 300 KB/s: moving all along, far from done when the cut comes.
    let cut = loop {
        match tokio::time::timeout(Duration::from_secs(5), busy.data()).await {
            Ok(Some(Ok(chunk))) => {
                taken += chunk.len();
                let _ = busy.flow_control().release_capacity(chunk.len());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => break true,
            Err(_) => break false,
        }
        if began.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    assert!(cut, "the busy stream ended: the connection was cut ({taken} bytes taken)");
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(3), "cut after {took:?}");
    assert!(taken < 64 * 1024 * 1024, "before the busy download was done");
    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await.expect("the connection ended");
}
