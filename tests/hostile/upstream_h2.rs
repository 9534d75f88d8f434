//! Tallyfy over HTTP/2, where one connection per thread carries every
//! caller's requests: what one caller's habits, or Tallyfy's answers, must not
//! do to another caller.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{access_line, access_log};
use crate::support::{self, TestConfig, start_proxy};

/// The sandbox behind TLS speaking only h2, and a proxy in front of it.
async fn h2_stack() -> (tallyfy_sandbox::Sandbox, tallyfy_proxy::app::Running, tempfile::TempDir) {
    let (sandbox, dir, base) = support::tls_sandbox(&[b"h2"]).await;
    let config = super::short_timers(TestConfig::personal_any(&base))
        .set("upstream", "ca_file", "ca.pem")
        .set("server", "idle_timeout_ms", 60_000);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    (sandbox, proxy, dir)
}

/// An h2 server of the test's own behind TLS, with a CA of its own: `serve`
/// gets each connection, numbered from 1. Its base URL, its CA's PEM, and how
/// many connections it accepted.
async fn h2_upstream<F, Fut>(serve: F) -> (String, String, Arc<AtomicUsize>)
where
    F: Fn(usize, h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, bytes::Bytes>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    h2_upstream_with(h2::server::Builder::new(), usize::MAX, serve).await
}

/// [`h2_upstream`] with the server's settings from `settings`, accepting
/// `accepting` connections (then refusing every other).
async fn h2_upstream_with<F, Fut>(
    settings: h2::server::Builder,
    accepting: usize,
    serve: F,
) -> (String, String, Arc<AtomicUsize>)
where
    F: Fn(usize, h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, bytes::Bytes>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (ca_pem, server_tls) = support::local_pki(&[b"h2"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("https://127.0.0.1:{}", listener.local_addr().expect("addr").port());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        for nth in 1..=accepting {
            let Ok((tcp, _)) = listener.accept().await else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let (acceptor, serve, settings) = (acceptor.clone(), serve.clone(), settings.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let Ok(connection) = settings.handshake(tls).await else { return };
                serve(nth, connection).await;
            });
        }
        // The listener closes with this task: any further dial is refused.
    });
    (base, ca_pem, accepted)
}

/// The proxy's config for an upstream at `base` with the short timers, and a
/// directory holding its CA (`ca_pem`) as `ca.pem`, which the config trusts.
fn trusting(base: &str, ca_pem: String) -> (TestConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write CA");
    (super::short_timers(TestConfig::personal_any(base)).set("upstream", "ca_file", "ca.pem"), dir)
}

fn download(file: &str, bytes: u64, extra: &str) -> String {
    let org = tallyfy_sandbox::fixtures::ORG_ID;
    format!("/api/organizations/{org}/file/{file}/dl?bytes={bytes}{extra}")
}

/// Callers that ask for downloads and never read them (an HTTP/2 window of
/// 0) hold their own streams' windows on the thread's connection to Tallyfy.
/// With hyper's windows (2 MiB a stream, 5 MiB the connection) three of them
/// used up the connection's, and every other caller's answer on it stopped.
#[tokio::test]
async fn callers_that_never_read_stall_no_other_callers_answer() {
    let (_sandbox, proxy, _dir) = h2_stack().await;
    let tcp = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2c handshake");
    tokio::spawn(connection);
    let mut unread = Vec::new();
    for n in 0..6 {
        let mut client = client.clone().ready().await.expect("ready");
        let path = download(&format!("unread{n}"), 8 * 1024 * 1024, "");
        let request = http::Request::get(format!("http://a{path}")).body(()).expect("request");
        let (response, _) = client.send_request(request, true).expect("sent");
        let head = tokio::time::timeout(Duration::from_secs(5), response).await.expect("head").expect("ok");
        assert_eq!(head.status(), 200);
        unread.push(head);
    }
    // Tallyfy fills the windows it is given within a moment: this wait is for
    // the stall to set in where it can, not for anything to be ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("http://{}{}", proxy.proxy_addr(), download("wanted", 1024 * 1024, ""));
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let response = support::client().get(url).send().await.expect("answered");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("the whole body")
    })
    .await
    .expect("another caller's download is not held up by the unread ones");
    assert_eq!(read.len(), 1024 * 1024);
    drop(unread);
}

/// Tallyfy's trailer fields are a field section the proxy does not clean: a
/// `Set-Cookie` (a session of the proxy's token) and Tallyfy's own
/// `X-Request-Id` ride in them here, and neither reaches the caller.
#[tokio::test]
async fn tallyfys_trailers_never_reach_the_caller() {
    let (_sandbox, proxy, _dir) = h2_stack().await;
    let tcp = TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let path = download("trailed", 1000, "&trailers=1");
    let request = http::Request::get(format!("http://a{path}")).body(()).expect("request");
    let (response, _) = client.send_request(request, true).expect("sent");
    let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("head").expect("ok");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let collected = tokio::time::timeout(Duration::from_secs(5), async {
        let mut bytes = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            bytes += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        (bytes, body.trailers().await.expect("the stream ends cleanly"))
    })
    .await
    .expect("the body within 5 s");
    assert_eq!(collected.0, 1000);
    assert!(
        collected.1.is_none(),
        "Tallyfy's trailers reached the caller: {:?}",
        collected.1.map(|t| t.len())
    );
}

/// An answer whose length has all come is complete in the access log, though
/// HTTP/2's end of stream comes in a frame of its own here.
#[tokio::test]
async fn an_answer_delivered_whole_is_logged_complete() {
    let _capture = access_log();
    let (_sandbox, proxy, _dir) = h2_stack().await;
    let url = format!("http://{}{}", proxy.proxy_addr(), download("logged-whole", 9, "&late_end=1"));
    let response = support::client().get(url).send().await.expect("answered");
    assert_eq!(response.bytes().await.expect("body").len(), 9);
    let line = access_line("logged-whole").await;
    assert!(line.contains("complete=true"), "{line}");
}

/// A Tallyfy connection whose far end stops answering (a hung process keeps
/// its TCP connection open, so no close ever comes) is found by a PING left
/// unanswered and replaced. Without the PINGs, every request of the thread
/// went on it and waited for its timeout, for as long as traffic came.
#[tokio::test]
async fn a_connection_whose_far_end_hangs_is_found_and_replaced() {
    let (base, ca_pem, accepted) = h2_upstream(|nth, mut connection| async move {
        let mut requests = 0;
        while let Some(Ok((_, mut respond))) = connection.accept().await {
            requests += 1;
            if nth == 1 && requests == 2 {
                // Hung: the connection is held open and never read or
                // written again (no answer, no PING reply).
                let _held = connection;
                std::future::pending::<()>().await;
                return;
            }
            let _ = respond.send_response(http::Response::new(()), true);
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let config =
        config.set("upstream", "request_timeout_ms", 120_000).set("server", "idle_timeout_ms", 120_000);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    let status =
        |url: String| async move { support::client().get(url).send().await.expect("answered").status() };

    assert_eq!(status(url.clone()).await, 200);
    let began = tokio::time::Instant::now();
    let hung = tokio::time::timeout(Duration::from_secs(60), status(url.clone()))
        .await
        .expect("the hung connection is given up long before the request timeout");
    assert_eq!(hung, 502, "the request on the hung connection fails as Tallyfy's");
    assert!(began.elapsed() < Duration::from_secs(40), "found by PING: {:?}", began.elapsed());
    assert_eq!(status(url).await, 200, "the next request dials a new connection");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A caller's upload that runs past `server.max_request_body_bytes` is the
/// caller's 413, over HTTP/2 as over HTTP/1.1. hyper's HTTP/2 client only
/// resets the stream and says why nowhere: it was a 502, Tallyfy's failure.
#[tokio::test]
async fn an_upload_past_the_limit_is_the_callers_413_over_http2_too() {
    let (sandbox, dir, base) = support::tls_sandbox(&[b"h2"]).await;
    let config = super::short_timers(TestConfig::personal_any(&base))
        .set("upstream", "ca_file", "ca.pem")
        .set("server", "max_request_body_bytes", 100_000);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let chunk = "a".repeat(50_000);
    let mut request = String::from(
        "POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..6 {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    let answer = super::exchange(proxy.proxy_addr(), request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(answer.status(), 413, "{}", answer.text());
    assert!(answer.text().contains("body_too_large"), "{}", answer.text());
    assert!(sandbox.received().iter().all(|r| r.body_len <= 100_000), "no more than the limit went on");
}

/// A stream Tallyfy refuses unprocessed (`REFUSED_STREAM`, RFC 9113 §8.7) is
/// sent again, once, whatever its method, when its body is held whole; one
/// whose body streamed cannot be, and is Tallyfy's 502. Each was a 502.
#[tokio::test]
async fn a_stream_tallyfy_refused_unprocessed_goes_again() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let (base, ca_pem, _) = h2_upstream(move |_, mut connection| {
        let log = log.clone();
        async move {
            let mut refused = HashSet::new();
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let line = format!("{} {}", request.method(), request.uri().path());
                log.lock().expect("log").push(line.clone());
                if request.headers().contains_key("x-refuse") && refused.insert(line) {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                let _ = respond.send_response(http::Response::new(()), true);
            }
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = |path: &str| format!("http://{}{path}", proxy.proxy_addr());
    let http = support::client();

    let get = http.get(url("/api/me")).header("x-refuse", "1").send().await.expect("answered");
    assert_eq!(get.status(), 200, "a GET refused unprocessed went again");
    let kept = http
        .post(url("/api/runs"))
        .header("x-refuse", "1")
        .header("content-type", "application/json")
        .body(r#"{"name":"x"}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(kept.status(), 200, "a POST whose body is held whole went again: Tallyfy never saw it");
    let streamed = http
        .post(url("/api/upload"))
        .header("x-refuse", "1")
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
            bytes::Bytes::from_static(b"raw bytes"),
        )])))
        .send()
        .await
        .expect("answered");
    assert_eq!(streamed.status(), 502, "a streamed body cannot go twice");
    assert_eq!(
        *seen.lock().expect("log"),
        ["GET /api/me", "GET /api/me", "POST /api/runs", "POST /api/runs", "POST /api/upload"]
    );
}

/// The thread's HTTP/2 connection, once unused for `pool_idle_timeout_ms`, is
/// closed like an idle HTTP/1.1 one: it was kept (and PINGed) for ever.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_pool_idle_timeout() {
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    let (base, ca_pem, accepted) = h2_upstream(move |_, mut connection| {
        let counted = counted.clone();
        async move {
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                let _ = respond.send_response(http::Response::new(()), true);
            }
            counted.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let config = config.set("upstream", "pool_idle_timeout_ms", 300);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    assert_eq!(support::client().get(&url).send().await.expect("answered").status(), 200);
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while closed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the idle connection was closed");
    assert_eq!(support::client().get(&url).send().await.expect("answered").status(), 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "and the next request dialled another");
}

/// Tallyfy's answer heads may be as large over HTTP/2 as over HTTP/1.1: h2's
/// own 16 KiB limit made a 20 KiB one a 502.
#[tokio::test]
async fn a_large_answer_head_passes_over_http2_as_over_http1() {
    let (base, ca_pem, _) = h2_upstream(|_, mut connection| async move {
        while let Some(Ok((_, mut respond))) = connection.accept().await {
            let mut response = http::Response::new(());
            let value = http::HeaderValue::from_str(&"v".repeat(20 * 1024)).expect("value");
            response.headers_mut().insert("x-large", value);
            let _ = respond.send_response(response, true);
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let response = support::client()
        .get(format!("http://{}/api/me", proxy.proxy_addr()))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-large"].len(), 20 * 1024);
}

/// A server for the stream-cap tests: it holds each `/api/hold` stream until
/// `release` (counting them in `held`), and answers every other at once.
fn holding<C>(
    held: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
) -> impl Fn(usize, h2::server::Connection<C, bytes::Bytes>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
+ Send
+ Sync
+ 'static
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    move |_, mut connection| {
        let (held, release) = (held.clone(), release.clone());
        Box::pin(async move {
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let (held, release) = (held.clone(), release.clone());
                tokio::spawn(async move {
                    if request.uri().path() == "/api/hold" {
                        let waiting = release.notified();
                        held.fetch_add(1, Ordering::SeqCst);
                        let _ = tokio::time::timeout(Duration::from_secs(20), waiting).await;
                    }
                    let _ = respond.send_response(http::Response::new(()), true);
                });
            }
        })
    }
}

/// A proxy in front of `base` (its CA `ca_pem`), and `HELD` requests to
/// `/api/hold` sent through it once a first request has opened the thread's
/// connection; returns when Tallyfy holds them all.
async fn hold_streams(
    base: &str,
    ca_pem: &str,
    held: &AtomicUsize,
) -> (
    tallyfy_proxy::app::Running,
    tempfile::TempDir,
    Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>>,
) {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write CA");
    let config = TestConfig::personal_any(base).set("upstream", "ca_file", "ca.pem").set(
        "upstream",
        "request_timeout_ms",
        20_000,
    );
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let http = support::client();
    let first = http.get(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
    assert_eq!(first.status(), 200);
    first.bytes().await.expect("the first answer, whole: its stream's place given up");
    let hold = format!("http://{}/api/hold", proxy.proxy_addr());
    let holding: Vec<_> = (0..HELD).map(|_| tokio::spawn(http.get(&hold).send())).collect();
    let all_held = tokio::time::timeout(Duration::from_secs(10), async {
        while held.load(Ordering::SeqCst) < HELD {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(all_held.is_ok(), "Tallyfy holds {HELD} streams");
    (proxy, dir, holding)
}

/// Streams the proxy keeps open on one HTTP/2 connection of a thread.
const HELD: usize = 100;

/// Streams one thread keeps open on an HTTP/2 connection stop at 100 (what
/// RFC 9113 asks every server to allow): the next request dials another
/// connection. Before, it queued in hyper behind the streams holding Tallyfy's
/// limit (one caller's slow requests), its timeout running, whoever sent it.
#[tokio::test]
async fn requests_beyond_a_connections_streams_go_on_another_connection() {
    let (held, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
    let mut settings = h2::server::Builder::new();
    settings.max_concurrent_streams(HELD as u32);
    let server = holding(held.clone(), release.clone());
    let (base, ca_pem, accepted) = h2_upstream_with(settings, usize::MAX, server).await;
    let (proxy, _dir, holding) = hold_streams(&base, &ca_pem, &held).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "all on the thread's one connection");
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    let http = support::client();
    let answered = tokio::time::timeout(Duration::from_secs(5), http.get(&url).send()).await;
    let status = answered.expect("answered while the streams are held").expect("answered").status();
    assert_eq!(status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "on a connection of its own");
    release.notify_waiters();
    for request in holding {
        assert_eq!(request.await.expect("joined").expect("answered").status(), 200);
    }
    // Every place was given back: more requests than a connection's streams,
    // one after another, all go on the newest connection.
    for _ in 0..HELD + 20 {
        let answer = http.get(&url).send().await.expect("answered");
        assert_eq!(answer.status(), 200);
        answer.bytes().await.expect("whole");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "no stream's place was kept");
}

/// When the connection that would take over from a full one cannot be opened,
/// the request goes on the full one (still working, and here allowing more
/// streams): not a 502 for want of a second connection.
#[tokio::test]
async fn a_request_beyond_a_full_connection_goes_on_it_when_no_other_opens() {
    let (held, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
    let mut settings = h2::server::Builder::new();
    settings.max_concurrent_streams(2 * HELD as u32);
    let server = holding(held.clone(), release.clone());
    let (base, ca_pem, accepted) = h2_upstream_with(settings, 1, server).await;
    let (proxy, _dir, holding) = hold_streams(&base, &ca_pem, &held).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    let answered = tokio::time::timeout(Duration::from_secs(5), support::client().get(&url).send()).await;
    let status = answered.expect("answered while the streams are held").expect("answered").status();
    assert_eq!(status, 200, "on the full connection: the second was refused");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    release.notify_waiters();
    for request in holding {
        assert_eq!(request.await.expect("joined").expect("answered").status(), 200);
    }
}

/// When the thread's HTTP/2 connection closes (Tallyfy's GOAWAY on a deploy),
/// the requests that find none wait for the one request that dials the next:
/// 20 at once open one connection, not 20 TLS connections at once.
#[tokio::test]
async fn requests_that_find_no_connection_wait_for_the_one_being_dialled() {
    let (base, ca_pem, accepted) = h2_upstream(|nth, mut connection| async move {
        if nth == 1 {
            // One answer, then a graceful close.
            if let Some(Ok((_, mut respond))) = connection.accept().await {
                let _ = respond.send_response(http::Response::new(()), true);
            }
            connection.graceful_shutdown();
            while connection.accept().await.is_some() {}
            return;
        }
        while let Some(Ok((_, mut respond))) = connection.accept().await {
            tokio::spawn(async move {
                let _ = respond.send_response(http::Response::new(()), true);
            });
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let config = config.set("server", "idle_timeout_ms", 60_000);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    assert_eq!(support::client().get(&url).send().await.expect("answered").status(), 200);

    let burst: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { support::client().get(url).send().await.expect("answered").status() })
        })
        .collect();
    for answer in burst {
        assert_eq!(answer.await.expect("request"), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one connection dialled for the 20");
}

/// Tallyfy over HTTP/2 may answer before an upload ends (its head and a first
/// part at once, the rest once the upload is in). An HTTP/2 caller's body end
/// is confirmed by its response's polls then: the upload still ends whole at
/// Tallyfy (END_STREAM, not a reset), and the answer comes whole.
#[tokio::test]
async fn an_answer_begun_before_the_upload_ends_lets_both_end_whole() {
    let uploads = Arc::new(Mutex::new(Vec::new()));
    let record = uploads.clone();
    let (base, ca_pem, _) = h2_upstream(move |_, mut connection| {
        let record = record.clone();
        async move {
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(mut answer) = respond.send_response(http::Response::new(()), false) else {
                        return;
                    };
                    let _ = answer.send_data(bytes::Bytes::from_static(b"early "), false);
                    let mut body = request.into_body();
                    let mut got = Vec::new();
                    let outcome = loop {
                        match body.data().await {
                            Some(Ok(data)) => {
                                let _ = body.flow_control().release_capacity(data.len());
                                got.extend_from_slice(&data);
                            }
                            Some(Err(error)) => break format!("reset: {error}"),
                            None => break format!("ended: {}", String::from_utf8_lossy(&got)),
                        }
                    };
                    record.lock().expect("record").push(outcome);
                    let _ = answer.send_data(bytes::Bytes::from_static(b"done"), true);
                });
            }
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let mut sender = super::http2::h2c(proxy.proxy_addr()).await;
    let mut request = http::Request::post("http://a/api/me").body(()).expect("request");
    request.headers_mut().insert("content-type", http::HeaderValue::from_static("text/plain"));
    let (response, mut upload) = sender.send_request(request, false).expect("sent");
    upload.send_data(bytes::Bytes::from_static(b"hello "), false).expect("data");
    let response =
        tokio::time::timeout(Duration::from_secs(5), response).await.expect("head").expect("answered");
    assert_eq!(response.status(), 200);
    let mut answer = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), answer.data()).await.expect("first part");
    assert_eq!(&first.expect("data").expect("data")[..], b"early ");
    upload.send_data(bytes::Bytes::from_static(b"world"), true).expect("the upload's end");
    let mut rest = Vec::new();
    while let Some(data) =
        tokio::time::timeout(Duration::from_secs(5), answer.data()).await.expect("the rest")
    {
        rest.extend_from_slice(&data.expect("the answer streams on"));
    }
    assert_eq!(rest, b"done", "the answer came whole");
    assert_eq!(*uploads.lock().expect("record"), ["ended: hello world"], "the upload ended whole at Tallyfy");
}

/// Tallyfy's HTTP/2 answer cut short of its `Content-Length` by a
/// `RST_STREAM(NO_ERROR)`, which hyper reads as the body's end: never passed on
/// as whole. A JSON answer read for its links was restated with the length of
/// the 9 bytes that came (a clean 200 to HTTP/2 callers); one streamed on
/// ended cleanly where Tallyfy's stopped.
#[tokio::test]
async fn an_http2_answer_reset_short_of_its_length_is_never_whole() {
    let (base, ca_pem, _) = h2_upstream(|_, mut connection| async move {
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let json = request.uri().path().ends_with("/json");
            tokio::spawn(async move {
                let head = http::Response::builder()
                    .header(
                        "content-type",
                        if json { "application/json" } else { "application/octet-stream" },
                    )
                    .header("content-length", "100")
                    .body(())
                    .expect("head");
                let Ok(mut body) = respond.send_response(head, false) else { return };
                let part: &'static [u8] = if json { br#"{"part":""# } else { b"PARTIAL" };
                let _ = body.send_data(bytes::Bytes::from_static(part), false);
                tokio::time::sleep(Duration::from_millis(100)).await;
                body.send_reset(h2::Reason::NO_ERROR);
            });
        }
    })
    .await;
    let (config, dir) = trusting(&base, ca_pem);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = |path: &str| format!("http://{}{path}", proxy.proxy_addr());
    let http1 = support::client(); // (installs the TLS provider reqwest needs)
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    for (caller, http) in [("HTTP/1.1", http1), ("HTTP/2", h2c)] {
        let json = http.get(url("/api/json")).send().await.expect("answered");
        assert_eq!(json.status(), 502, "{caller}: a cut JSON answer is Tallyfy's failure");
        let body = json.text().await.expect("the proxy's error, whole");
        assert!(body.contains("upstream_"), "{caller}: {body}");

        match http.get(url("/api/octet")).send().await {
            Err(cut) => assert!(!cut.is_status(), "{caller}: {cut}"),
            Ok(streamed) => {
                assert_eq!(streamed.status(), 200, "{caller}: the head went before the cut");
                let read = streamed.bytes().await;
                assert!(read.is_err(), "{caller}: the cut shows to the caller, not a whole body: {read:?}");
            }
        }
    }
}
