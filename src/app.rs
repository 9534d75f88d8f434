//! Wiring: from a validated [`Config`] and two bound listeners to a running proxy.
//!
//! The binary, the sandbox command, the integration tests and the benches all start
//! the proxy through [`start`], so they run the very same code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::admin::Admin;
use crate::config::{Config, Listen};
use crate::headers::{CALLER_CREDENTIALS, X_REQUEST_ID};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::server::{self, ConnectionInfo, ConnectionLimits};
use crate::tokens::TokenStore;
use crate::tokens::issuer::{Issuer, IssuerSetupError};
use crate::tokens::refresh::Refresher;

/// The proxy and admin listeners, bound before anything starts, so a port
/// conflict is reported at once and tests can bind `127.0.0.1:0`.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(listen: &Listen) -> std::io::Result<Listeners> {
        Ok(Listeners {
            proxy: TcpListener::bind(listen.proxy).await?,
            admin: TcpListener::bind(listen.admin).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS setup for the upstream failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Issuer(#[from] IssuerSetupError),
    #[error("{0}")]
    Credential(String),
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
}

/// A running proxy. Dropping it does not stop it: call [`Running::shutdown`].
pub struct Running {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    tokens: Arc<TokenStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// The proxy and admin servers.
    tasks: JoinSet<()>,
    /// Stopped only after the servers have drained, so tokens stay fresh (and
    /// rejected ones are replaced) for the requests still finishing.
    refresher_stop: CancellationToken,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn tokens(&self) -> &Arc<TokenStore> {
        &self.tokens
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Resolves once every credential holds a valid token (what `/readyz` reports).
    pub async fn ready(&self) {
        self.tokens.ready().await
    }

    /// Starts the drain: listeners close at once, in-flight requests finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Drains and waits until everything has stopped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.stopped().await;
    }

    /// Waits until the servers have drained (after [`Running::begin_shutdown`]),
    /// then stops the refresher.
    pub async fn stopped(&mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.refresher_stop.cancel();
        if let Some(refresher) = self.refresher.take() {
            let _ = refresher.await;
        }
    }
}

/// Starts the refresher and the proxy and admin servers on `listeners`.
pub async fn start(config: &Config, listeners: Listeners) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let tokens = TokenStore::new(config.credentials.iter().map(|c| c.name.clone()).collect());
    let (refresher, refresh_handle) =
        Refresher::new(config, tokens.clone(), Issuer::new(config)?, metrics.clone())
            .map_err(StartError::Credential)?;
    let proxy = Proxy::new(config, tokens.clone(), refresh_handle, metrics.clone())?;
    let admin = Admin::new(tokens.clone(), metrics.clone());
    let shutdown = CancellationToken::new();
    let grace = config.server.shutdown_grace;
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let sensitive = SetSensitiveRequestHeadersLayer::new(CALLER_CREDENTIALS);

    let refresher_stop = CancellationToken::new();
    let refresher = tokio::spawn(refresher.run(refresher_stop.clone()));
    let mut tasks = JoinSet::new();
    tasks.spawn(server::serve(
        listeners.proxy,
        config.listen.tls.as_ref().map(|tls| tls.server_config.clone()),
        ConnectionLimits::for_proxy(&config.server),
        move |connection: ConnectionInfo| {
            let proxy = proxy.clone();
            let connection = Arc::new(connection);
            ServiceBuilder::new()
                .layer(sensitive.clone())
                .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
                .service_fn(move |request: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let connection = connection.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(request, &connection).await) }
                })
        },
        shutdown.clone(),
        grace,
    ));
    tasks.spawn(server::serve(
        listeners.admin,
        None,
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(5),
            max_head_bytes: 16 * 1024,
            max_header_fields: 64,
        },
        move |_connection| {
            let admin = admin.clone();
            tower::service_fn(move |request: Request<Incoming>| {
                std::future::ready(Ok::<_, Infallible>(admin.handle(&request)))
            })
        },
        shutdown.clone(),
        grace,
    ));
    let scheme = if config.listen.tls.is_some() { "https" } else { "http" };
    tracing::info!(proxy = %format!("{scheme}://{proxy_addr}"), admin = %admin_addr, upstream = %config.upstream.base_url, "listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        tokens,
        metrics,
        shutdown,
        tasks,
        refresher_stop,
        refresher: Some(refresher),
    })
}
