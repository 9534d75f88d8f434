//! The upstream connection pool against a real HTTP/1.1 server on loopback that
//! counts its connections: reuse, `Host`, connections Tallyfy closes while
//! idle, `pool_idle_timeout_ms` and `pool_max_idle_per_host`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, client, start_proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// A keep-alive JSON server that counts what the proxy does to it.
#[derive(Clone, Default)]
struct Counts {
    accepted: Arc<AtomicUsize>,
    /// Connections the proxy closed (EOF seen by the server).
    closed_by_proxy: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    hosts: Arc<Mutex<Vec<String>>>,
    /// The method of every request, in order.
    methods: Arc<Mutex<Vec<String>>>,
}

struct Behaviour {
    /// Close each connection right after its first response, without saying
    /// so (as a server whose keep-alive timeout just ran out).
    close_after_response: bool,
    /// Answer only once this many requests have arrived (they are then in
    /// flight at once, on separate connections).
    hold_until: usize,
    /// Read this request of each connection (1 for the first), then close
    /// without a byte of answer (on a kept connection: a keep-alive timeout
    /// that ran out as the request arrived).
    close_unanswered_at: Option<usize>,
}

async fn upstream(behaviour: Behaviour) -> (SocketAddr, Counts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counts = Counts::default();
    let gate = Arc::new(Semaphore::new(0));
    let behaviour = Arc::new(behaviour);
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, shared.clone(), behaviour.clone(), gate.clone()));
        }
    });
    (addr, counts)
}

async fn serve(mut stream: TcpStream, counts: Counts, behaviour: Arc<Behaviour>, gate: Arc<Semaphore>) {
    let mut buffer = Vec::new();
    let mut on_this_connection = 0;
    loop {
        let head = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break buffer.drain(..end + 4).collect::<Vec<u8>>();
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    counts.closed_by_proxy.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let host = head.lines().find_map(|line| line.strip_prefix("host: ").or(line.strip_prefix("Host: ")));
        counts.hosts.lock().expect("hosts").push(host.unwrap_or_default().to_owned());
        let arrived = counts.requests.fetch_add(1, Ordering::SeqCst) + 1;
        counts.methods.lock().expect("methods").push(head.split(' ').next().unwrap_or_default().to_owned());
        on_this_connection += 1;
        if behaviour.close_unanswered_at == Some(on_this_connection) {
            return;
        }
        if arrived <= behaviour.hold_until {
            if arrived == behaviour.hold_until {
                gate.add_permits(behaviour.hold_until);
            }
            gate.acquire().await.expect("gate").forget();
        }
        let response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if stream.write_all(response).await.is_err() {
            return;
        }
        if behaviour.close_after_response {
            return;
        }
    }
}

/// Waits (bounded) for `condition`, checking every 10 ms.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s: {what}");
}

async fn get(proxy: SocketAddr) -> reqwest::StatusCode {
    let response = client().get(format!("http://{proxy}/api/me")).send().await.expect("answered");
    let status = response.status();
    response.bytes().await.expect("body");
    status
}

/// The proxy in front of `addr`, its config changed by `change`; the directory
/// holding the config lives as long as the proxy is used.
async fn proxy_to(
    addr: SocketAddr,
    change: impl FnOnce(TestConfig) -> TestConfig,
) -> (tallyfy_proxy::app::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let config = change(TestConfig::personal_any(&format!("http://{addr}"))).parse(dir.path());
    (start_proxy(&config).await, dir)
}

#[tokio::test]
async fn requests_one_after_another_share_one_connection_and_name_the_host() {
    let (addr, counts) =
        upstream(Behaviour { close_after_response: false, hold_until: 0, close_unanswered_at: None }).await;
    let (proxy, _dir) = proxy_to(addr, |config| config).await;
    for _ in 0..20 {
        assert_eq!(get(proxy.proxy_addr()).await, 200);
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1, "every request went over the first connection");
    let hosts = counts.hosts.lock().expect("hosts").clone();
    assert_eq!(hosts.len(), 20);
    assert!(hosts.iter().all(|host| *host == addr.to_string()), "Host is the upstream's: {hosts:?}");
}

#[tokio::test]
async fn a_connection_tallyfy_closed_while_idle_is_not_a_failure() {
    let (addr, counts) =
        upstream(Behaviour { close_after_response: true, hold_until: 0, close_unanswered_at: None }).await;
    let (proxy, _dir) = proxy_to(addr, |config| config).await;
    for round in 1..=10 {
        assert_eq!(get(proxy.proxy_addr()).await, 200, "request {round}");
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 10, "a new connection for each closed one");
}

#[tokio::test]
async fn idle_connections_close_after_the_pool_idle_timeout() {
    let (addr, counts) =
        upstream(Behaviour { close_after_response: false, hold_until: 0, close_unanswered_at: None }).await;
    let (proxy, _dir) = proxy_to(addr, |config| config.set("upstream", "pool_idle_timeout_ms", 300)).await;
    assert_eq!(get(proxy.proxy_addr()).await, 200);
    eventually("the idle connection is closed by the proxy", || {
        counts.closed_by_proxy.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(get(proxy.proxy_addr()).await, 200, "and the next request opens another");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn no_more_idle_connections_are_kept_than_pool_max_idle_per_host() {
    let (addr, counts) =
        upstream(Behaviour { close_after_response: false, hold_until: 3, close_unanswered_at: None }).await;
    let (proxy, _dir) = proxy_to(addr, |config| config.set("upstream", "pool_max_idle_per_host", 1)).await;
    let at_once = tokio::join!(get(proxy.proxy_addr()), get(proxy.proxy_addr()), get(proxy.proxy_addr()));
    let statuses = [at_once.0, at_once.1, at_once.2];
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        3,
        "three requests in flight at once, three connections"
    );
    eventually("two of the three are closed once idle", || {
        counts.closed_by_proxy.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(get(proxy.proxy_addr()).await, 200);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 3, "the one kept is reused");
}

#[tokio::test]
async fn a_safe_request_a_reused_connection_closes_unanswered_goes_again_on_another() {
    let (addr, counts) =
        upstream(Behaviour { close_after_response: false, hold_until: 0, close_unanswered_at: Some(2) })
            .await;
    let (proxy, _dir) = proxy_to(addr, |config| config).await;
    assert_eq!(get(proxy.proxy_addr()).await, 200);
    assert_eq!(get(proxy.proxy_addr()).await, 200, "sent again when the kept connection closed unanswered");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(*counts.methods.lock().expect("methods"), ["GET", "GET", "GET"]);
}

#[tokio::test]
async fn an_unsafe_request_a_reused_connection_closes_unanswered_is_never_sent_again() {
    let (addr, counts) =
        upstream(Behaviour { close_after_response: false, hold_until: 0, close_unanswered_at: Some(2) })
            .await;
    let (proxy, _dir) = proxy_to(addr, |config| config).await;
    assert_eq!(get(proxy.proxy_addr()).await, 200);
    // No body: only its method keeps it from going again.
    let response = client()
        .post(format!("http://{}/api/me", proxy.proxy_addr()))
        .header("content-length", "0")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 502, "Tallyfy may have acted on it");
    assert_eq!(*counts.methods.lock().expect("methods"), ["GET", "POST"], "the POST went once");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_safe_request_a_new_connection_closes_unanswered_is_a_502_sent_once() {
    let behaviour = Behaviour { close_after_response: false, hold_until: 0, close_unanswered_at: Some(1) };
    let (addr, counts) = upstream(behaviour).await;
    let (proxy, _dir) = proxy_to(addr, |config| config).await;
    assert_eq!(get(proxy.proxy_addr()).await, 502, "a new connection's close is Tallyfy's answer");
    assert_eq!(*counts.methods.lock().expect("methods"), ["GET"]);
}

#[tokio::test]
async fn a_safe_request_goes_again_once_however_many_kept_connections_close_unanswered() {
    // Three connections kept (three requests at once), each of which closes
    // its second request unanswered.
    let behaviour = Behaviour { close_after_response: false, hold_until: 3, close_unanswered_at: Some(2) };
    let (addr, counts) = upstream(behaviour).await;
    let (proxy, _dir) = proxy_to(addr, |config| config).await;
    let at_once = tokio::join!(get(proxy.proxy_addr()), get(proxy.proxy_addr()), get(proxy.proxy_addr()));
    assert_eq!([at_once.0, at_once.1, at_once.2], [200, 200, 200]);
    assert_eq!(get(proxy.proxy_addr()).await, 502, "sent on two kept connections, then given up");
    assert_eq!(counts.requests.load(Ordering::SeqCst), 5, "three, then the one request twice");
}

/// An upstream that answers each connection's first request, and meets every
/// later one on the same connection with an answer it did not ask for (as
/// bytes an earlier answer left on the wire, arriving just after the
/// connection was picked again): it counts the connections it accepted.
async fn upstream_that_smuggles() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut buffer, mut answered) = (Vec::new(), 0);
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                    buffer.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        buffer.drain(..end + 4);
                        answered += 1;
                        let answer: &[u8] = if answered == 1 {
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-smuggled: yes\r\ncontent-length: 9\r\n\r\n\"not you\""
                        };
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// An HTTP/1.1 connection carries one credential's requests only: whatever
/// Tallyfy's side gets wrong about where an answer ends, the bytes can only
/// reach a caller of the same credential, never another tenant's.
#[tokio::test]
async fn a_connection_never_carries_two_credentials_requests() {
    let (addr, accepted) = upstream_that_smuggles().await;
    let (proxy, _dir) = proxy_to(addr, |_| {
        TestConfig::new(&format!("http://{addr}"))
            .credential(Credential::personal("alice", Secret::Env(TOKEN_ENV)))
            .credential(Credential::personal("bob", Secret::Env(TOKEN_ENV)))
            .identity(Identity::new("alice-app", "alice", Match::ApiKey("alice-key")))
            .identity(Identity::new("bob-app", "bob", Match::ApiKey("bob-key")))
    })
    .await;
    let at = proxy.proxy_addr();
    let get_as = |key: &'static str| async move {
        let response = client()
            .get(format!("http://{at}/api/me"))
            .header("x-api-key", key)
            .send()
            .await
            .expect("answered");
        let smuggled = response.headers().contains_key("x-smuggled");
        response.bytes().await.expect("body");
        smuggled
    };
    assert!(!get_as("alice-key").await);
    assert!(!get_as("bob-key").await, "bob's request went on a connection of its own");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert!(get_as("alice-key").await, "alice's own connection, reused (what the upstream gets wrong)");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
