//! Accepting connections: HTTP/1.1 and HTTP/2 (h2c or over TLS) on one listener,
//! the timers that keep silent peers from holding sockets, a cap on open
//! connections, and a graceful drain on shutdown.
//!
//! Every connection is on a clock from its first moment:
//! - the TLS handshake, and then the protocol sniff (the first bytes: HTTP/1 or
//!   the h2 preface), must finish within `header_read_timeout`;
//! - HTTP/1: each request head must arrive within `header_read_timeout` of the
//!   connection's start or the previous response's end, or the connection is cut
//!   (so a kept-alive connection whose next request does not come is closed too).
//!   The deadline is watched lazily, like the idle timeout: a check every quarter
//!   of it, no timer per request (hyper's own header timer, armed and dropped
//!   for every request, cost about 0.3 µs of user time per request, 4 %);
//! - any connection with no request in flight for `idle_timeout` is closed
//!   gracefully (HTTP/2: GOAWAY), and HTTP/2 peers are pinged so a dead one is
//!   noticed even mid-request.
//!
//! These watchers are polled only when one of them fires (`watch.rs`), not each
//! time the connection's task wakes for its requests.
//!
//! `serve` takes its listener and shutdown token as parameters (as mini-redis does),
//! so tests bind `127.0.0.1:0` and decide when to stop.

mod activity;
mod caller_body;
mod conn_io;
mod connection;
mod head_tap;
mod peers;
mod sniff;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::metrics::ConnectionCounters;
pub use activity::Guarded;
pub use caller_body::CallerBody;
use connection::{Listener, OpenConnection, connection};

pub use crate::error::BoxError;

/// Per-listener protocol settings.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// The TLS handshake, the first bytes, and every request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// A connection whose responses make no progress for this long is cut.
    pub send_timeout: Duration,
    /// Places for connections open at once; more are accepted and closed at once.
    pub slots: ConnectionSlots,
    /// Hard ceiling for a request head in bytes. The pipeline answers a friendlier
    /// JSON 431 below it; above it hyper closes with a bare 431.
    pub max_head_bytes: usize,
    /// Hard ceiling for the number of header fields (same split as above).
    pub max_header_fields: usize,
    /// The most connections one peer address may hold open (the admin port);
    /// `None`: no cap but `slots`.
    pub per_peer: Option<usize>,
    /// What HTTP/1 heads longer than the usual are counted against
    /// (`head_tap.rs`); `None`: not counted (the admin port, whose heads and
    /// connections are few and small).
    pub head_budget: Option<HeadBudget>,
}

/// Where long unfinished HTTP/1 heads are counted: the budget current when a
/// connection opens (`server.max_buffered_bytes` of the config generation
/// then), and the count of connections cut for want of room in it.
#[derive(Clone)]
pub struct HeadBudget {
    pub current: Arc<dyn Fn() -> crate::body::Budget + Send + Sync>,
    pub over: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for HeadBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadBudget").field("current", &(self.current)()).finish_non_exhaustive()
    }
}

/// The places for open connections under a listener's `max_connections`: one
/// pool, shared by every socket the listener is served on (the proxy port has
/// one per CPU), so the limit holds for the port, not for each of its threads.
#[derive(Debug, Clone)]
pub struct ConnectionSlots(Arc<Semaphore>);

impl ConnectionSlots {
    pub fn new(max_connections: usize) -> ConnectionSlots {
        ConnectionSlots(Arc::new(Semaphore::new(max_connections)))
    }
}

/// What the proxy knows about a connection before any request arrives.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// The address the peer reached (the proxy's end of the connection): where
    /// a caller that named no host is pointed back to.
    pub local: SocketAddr,
    /// Names of the verified client certificate (URI SANs, DNS SANs, CN); empty
    /// for plain HTTP or a TLS client without a certificate.
    pub cert_names: Arc<[String]>,
}

/// TLS on a listener: its rustls config, and what its client CAs say about
/// the names they vouch for.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    pub anchors: crate::client_cert::Anchors,
}

/// Serves connections from `listener` (over TLS when `tls` is given) until
/// `shutdown` fires, then stops accepting (the listener is closed, so new
/// connections are refused), lets in-flight requests finish for at most `grace`,
/// and returns.
pub async fn serve<M, S, F, B>(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: ConnectionLimits,
    counters: ConnectionCounters,
    make_service: M,
    shutdown: CancellationToken,
    grace: Duration,
) where
    M: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: Fn(Request<CallerBody>) -> F + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut http1 = http1::Builder::new();
    // No hyper timer: the head deadline is the connection's (`connection::run`).
    http1.max_buf_size(limits.max_head_bytes.max(8192)).max_headers(limits.max_header_fields);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    let ping = (limits.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(20));
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(ping)
        .keep_alive_timeout(ping);
    let permits = limits.slots.0.clone();
    let peers = limits.per_peer.map(peers::PeerPlaces::new);
    let anchors = tls.as_ref().map(|tls| tls.anchors.clone()).unwrap_or_default();
    let shared = Arc::new(Listener {
        tls: tls.map(|tls| TlsAcceptor::from(tls.config)),
        anchors,
        limits,
        http1,
        http2,
        make_service,
        shutdown: shutdown.clone(),
    });
    // Every connection task, so the ones still open when the grace period ends
    // can be cut (dropping a connection closes its socket).
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            Some(_finished) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let peer_place = match &peers {
                        None => None,
                        Some(peers) => match peers.take(peer.ip()) {
                            Some(place) => Some(place),
                            None => {
                                counters.refused.inc();
                                tracing::debug!(%peer, "this peer's connections are at their cap; connection closed");
                                continue;
                            }
                        },
                    };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        counters.refused.inc();
                        tracing::debug!(%peer, "max_connections reached; connection closed");
                        continue;
                    };
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %error, "set_nodelay failed");
                    }
                    let open = OpenConnection::new(&counters.open, permit, peer_place);
                    connections.spawn(connection(shared.clone(), stream, peer, open));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            connections = connections.len(),
            "drain grace period elapsed; closing remaining connections"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}
