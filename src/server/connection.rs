//! One connection's life: the TLS handshake, the protocol sniff, hyper serving
//! it, and the graceful close on shutdown or idleness.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulConnection;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::activity::{Activity, Counted};
use super::conn_io::ConnIo;
use super::head_tap::{Counting, HeadTap};
use super::peers::PeerPlace;
use super::sniff::{Protocol, sniff};
use super::watch::Watched;
use super::{BoxError, CallerBody, ConnectionInfo, ConnectionLimits};
use crate::client_cert;

/// Everything a connection task needs, shared by all of a listener's connections.
pub(super) struct Listener<M> {
    pub tls: Option<TlsAcceptor>,
    pub anchors: client_cert::Anchors,
    pub limits: ConnectionLimits,
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
    pub make_service: M,
    pub shutdown: CancellationToken,
}

/// Holds a connection's place under `max_connections`, under its peer's cap
/// (if the listener has one) and in the open gauge.
pub(super) struct OpenConnection {
    open: Gauge,
    _permit: OwnedSemaphorePermit,
    _peer_place: Option<PeerPlace>,
}

impl OpenConnection {
    pub fn new(open: &Gauge, permit: OwnedSemaphorePermit, peer_place: Option<PeerPlace>) -> Self {
        open.inc();
        OpenConnection { open: open.clone(), _permit: permit, _peer_place: peer_place }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// One connection, from the handshake to its close.
pub(super) async fn connection<M, S, F, B>(
    shared: Arc<Listener<M>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    _open: OpenConnection,
) where
    M: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: Fn(Request<CallerBody>) -> F + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let deadline = shared.limits.header_read_timeout;
    if let Some(acceptor) = shared.tls.clone() {
        // Boxed: the handshake's state is large, and plain connections (the
        // many idle keep-alive ones among them) should not carry room for it.
        return Box::pin(tls_connection(shared, acceptor, stream, peer)).await;
    }
    let Some((protocol, prefix)) = sniff(&mut stream, deadline).await else {
        return tracing::debug!(%peer, "no request within the header read timeout");
    };
    let Ok(local) = stream.local_addr() else { return };
    let info = ConnectionInfo { peer, local, cert_names: Arc::from([]) };
    serve_io(&shared, stream, protocol, prefix, info).await
}

/// A TLS connection, from the handshake to its close.
async fn tls_connection<M, S, F, B>(
    shared: Arc<Listener<M>>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) where
    M: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: Fn(Request<CallerBody>) -> F + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let deadline = shared.limits.header_read_timeout;
    let Ok(local) = stream.local_addr() else { return };
    let mut stream = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    let session = stream.get_ref().1;
    let cert_names = session
        .peer_certificates()
        .map(|chain| client_cert::names(chain, &shared.anchors))
        .unwrap_or_default();
    let (protocol, prefix) = match session.alpn_protocol() {
        // The preface must still come within the deadline: a peer that agreed
        // on h2 and then says nothing holds no place for longer.
        Some(b"h2") => match sniff(&mut stream, deadline).await {
            Some((_, prefix)) => (Protocol::Http2, prefix),
            None => return tracing::debug!(%peer, "no HTTP/2 preface within the header read timeout"),
        },
        Some(_) => (Protocol::Http1, Bytes::new()),
        None => match sniff(&mut stream, deadline).await {
            Some(sniffed) => sniffed,
            None => return tracing::debug!(%peer, "no request within the header read timeout"),
        },
    };
    let info = ConnectionInfo { peer, local, cert_names: cert_names.into() };
    serve_io(&shared, stream, protocol, prefix, info).await
}

async fn serve_io<M, S, F, B, I>(
    shared: &Listener<M>,
    io: I,
    protocol: Protocol,
    prefix: Bytes,
    info: ConnectionInfo,
) where
    M: Fn(ConnectionInfo) -> S,
    S: Fn(Request<CallerBody>) -> F + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let service = (shared.make_service)(info);
    let activity = Arc::new(Activity::default());
    let limits = &shared.limits;
    match protocol {
        Protocol::Http1 => {
            let counting = limits
                .head_budget
                .as_ref()
                .map(|heads| Counting { budget: (heads.current)(), over: heads.over.clone() });
            let tap = Arc::new(HeadTap::new(limits.max_head_bytes.max(8192), counting));
            let io = TokioIo::new(ConnIo::new(io, prefix, Some(tap.clone())));
            let service = Counted::new(service, activity.clone(), Some(tap));
            let connection = shared.http1.serve_connection(io, service);
            let timers = Timers {
                idle: limits.idle_timeout,
                head: Some(limits.header_read_timeout),
                send: limits.send_timeout,
                closing: limits.header_read_timeout,
            };
            run(connection, &activity, timers, &shared.shutdown, peer).await;
        }
        Protocol::Http2 => {
            let io = TokioIo::new(ConnIo::new(io, prefix, None));
            let service = Counted::new(service, activity.clone(), None);
            let connection = shared.http2.serve_connection(io, service);
            // Boxed: an HTTP/2 connection's state is larger than HTTP/1's, and every
            // connection task has room for the larger of the two (3.8 KiB against
            // 2.1 KiB), the many idle keep-alive HTTP/1 ones included.
            let timers = Timers {
                idle: limits.idle_timeout,
                head: None,
                send: limits.send_timeout,
                closing: limits.header_read_timeout,
            };
            Box::pin(run(connection, &activity, timers, &shared.shutdown, peer)).await;
        }
    }
}

/// The clocks a connection runs on once it is served.
#[derive(Clone, Copy)]
struct Timers {
    /// No request in flight for this long: closed gracefully.
    idle: Duration,
    /// HTTP/1: no request head completed this long after the connection was
    /// served or its last response ended: cut, like hyper's header read timeout
    /// (a head trickling in gets no answer). `None` for HTTP/2, whose peers are
    /// pinged instead.
    head: Option<Duration>,
    /// A response waiting to be sent that has not moved for this long: cut
    /// ([`Activity::stalled_for`]).
    send: Duration,
    /// Closed gracefully for idleness, and still open with no request in
    /// flight this long after: cut (an HTTP/2 peer that never acknowledges the
    /// GOAWAY's ping, an HTTP/1 one that never takes its last response). A
    /// close for shutdown is bounded by the drain's grace period instead.
    closing: Duration,
}

/// Drives a connection to its end; on shutdown or idleness, closes it gracefully
/// (in-flight requests finish, HTTP/2 peers get GOAWAY), and cuts it if it is
/// still open [`Timers::closing`] after; an HTTP/1 head that does not come in
/// time, or responses that stall for [`Timers::send`], cut it.
async fn run<C>(
    connection: C,
    activity: &Activity,
    timers: Timers,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    // Watched for the connection's whole life, drain included: a slow head
    // must not hold the drain open either.
    let head_overdue = Watched::new(async {
        match timers.head {
            Some(timeout) => activity.idle_for(timeout).await,
            None => std::future::pending().await,
        }
    });
    tokio::pin!(head_overdue);
    // Whether the close is for idleness (not for shutdown, whose drain has its
    // own grace period and may still be delivering responses).
    let close = Watched::new(async {
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = activity.idle_for(timers.idle) => {
                tracing::debug!(%peer, "idle connection closed");
                true
            }
        }
    });
    tokio::pin!(close);
    let stalled = Watched::new(activity.stalled_for(timers.send));
    tokio::pin!(stalled);
    let mut closed = false;
    // Made when a graceful close for idleness begins; rare, so boxed.
    let mut closing: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = &mut head_overdue => {
                return tracing::debug!(%peer, "no request head within the header read timeout");
            }
            () = &mut stalled => {
                return tracing::debug!(%peer, "a response made no progress within the send timeout; cut");
            }
            idle = &mut close, if !closed => {
                connection.as_mut().graceful_shutdown();
                closed = true;
                if idle {
                    closing = Some(Box::pin(activity.idle_for(timers.closing)));
                }
            }
            () = async {
                match closing.as_mut() {
                    Some(overdue) => overdue.await,
                    None => std::future::pending().await,
                }
            } => {
                return tracing::debug!(%peer, "closed gracefully but not ended by the peer; cut");
            }
        }
    }
}
