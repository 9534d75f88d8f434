//! Accepting connections: plain HTTP/1.1 + h2c, or TLS with ALPN, each
//! connection served by hyper-util's auto builder in its own task. Aborting the
//! accept task drops the `JoinSet` and with it every connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderValue;
use http::header::CONNECTION;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::router;
use super::state::Shared;

/// Starts the accept loop; the listener is already bound, so it is ready now.
pub(super) fn spawn(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> JoinHandle<()> {
    let acceptor = tls.map(|config| TlsAcceptor::from(with_default_alpn(config)));
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tracing::debug!(%peer, "sandbox: connection");
                        let _ = stream.set_nodelay(true);
                        let shared = Arc::clone(&shared);
                        match acceptor.clone() {
                            None => connections.spawn(serve(stream, shared)),
                            Some(acceptor) => connections.spawn(async move {
                                match acceptor.accept(stream).await {
                                    Ok(stream) => serve(stream, shared).await,
                                    Err(error) => tracing::debug!(%error, "sandbox: TLS handshake failed"),
                                }
                            }),
                        };
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::debug!(%error, "sandbox: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

/// `h2` and `http/1.1` when the caller configured no ALPN protocols.
fn with_default_alpn(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if !config.alpn_protocols.is_empty() {
        return config;
    }
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn serve<S>(stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let born = shared.restarts.load(Ordering::Relaxed);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move {
            let mut response = router::handle(Arc::clone(&shared), request).await?;
            if shared.restarts.load(Ordering::Relaxed) != born {
                // A rolling restart: this connection's instance is going away.
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, router::Dropped>(response)
        }
    });
    if let Err(error) =
        auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await
    {
        tracing::debug!(%error, "sandbox: connection ended with an error");
    }
}
