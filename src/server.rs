//! Accepting connections: HTTP/1.1 and HTTP/2 (h2c or over TLS) on one listener,
//! header-read timeouts, header limits, and a graceful drain on shutdown.
//!
//! `serve` takes its listener and shutdown token as parameters (as mini-redis does),
//! so tests bind `127.0.0.1:0` and decide when to stop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::client_cert;
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Per-connection protocol settings.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A client must deliver a complete request head within this time.
    pub header_read_timeout: Duration,
    /// Hard ceiling for a request head in bytes. The pipeline answers a friendlier
    /// JSON 431 below it; above it hyper closes with a bare 431.
    pub max_head_bytes: usize,
    /// Hard ceiling for the number of header fields (same split as above).
    pub max_header_fields: usize,
}

impl ConnectionLimits {
    /// Hyper's hard limits at twice the configured ones, so the pipeline's JSON
    /// 431 answers every request between the two.
    pub fn for_proxy(server: &crate::config::Server) -> Self {
        ConnectionLimits {
            header_read_timeout: server.header_read_timeout,
            max_head_bytes: (server.max_header_bytes * 2).max(16 * 1024),
            max_header_fields: server.max_headers * 2,
        }
    }
}

/// What the proxy knows about a connection before any request arrives.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// Names of the verified client certificate (URI SANs, DNS SANs, CN); empty
    /// for plain HTTP or a TLS client without a certificate.
    pub cert_names: Arc<[String]>,
}

/// Serves connections from `listener` (over TLS when `tls` is given) until
/// `shutdown` fires, then stops accepting (the listener is closed, so new
/// connections are refused), lets in-flight requests finish for at most `grace`,
/// and returns.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    make_service: M,
    shutdown: CancellationToken,
    grace: Duration,
) where
    M: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .max_headers(limits.max_header_fields);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    let acceptor = tls.map(TlsAcceptor::from);
    let make_service = Arc::new(make_service);
    let graceful = GracefulShutdown::new();
    // Every connection task, so the ones still open when the grace period ends
    // can be cut (dropping a connection closes its socket).
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            Some(_finished) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %error, "set_nodelay failed");
                    }
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    let make_service = make_service.clone();
                    let acceptor = acceptor.clone();
                    let handshake_timeout = limits.header_read_timeout;
                    connections.spawn(async move {
                        let Some(acceptor) = acceptor else {
                            let service = make_service(ConnectionInfo { peer, cert_names: Arc::from([]) });
                            return serve_io(&builder, TokioIo::new(stream), service, watcher, peer).await;
                        };
                        let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                        let cert_names = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(client_cert::names)
                            .unwrap_or_default();
                        let service = make_service(ConnectionInfo { peer, cert_names: cert_names.into() });
                        serve_io(&builder, TokioIo::new(stream), service, watcher, peer).await
                    });
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
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            connections = connections.len(),
            "drain grace period elapsed; closing remaining connections"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

async fn serve_io<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: Watcher,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connection = builder.serve_connection(io, TowerToHyperService::new(service));
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, error = %error, "connection ended with an error");
    }
}
