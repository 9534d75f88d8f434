//! Wiring: from a validated [`Config`] and two bound listeners to a running proxy.
//!
//! The binary, the sandbox command, the integration tests and the benches all start
//! the proxy through [`start`], so they run the very same code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::config::{Config, Listen};
use crate::fleet::{Fleet, News};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::{self, Clients, RefresherTask, ReloadHandle, Reloader};
use crate::server::{self, CallerBody, ConnectionInfo, ConnectionLimits, ConnectionSlots, HeadBudget};
use crate::tokens::refresh::Refresher;
use crate::tokens::{CredentialTokens, TokenStore};
use crate::traffic::TrafficState;

/// The proxy listener's connection limits: hyper's hard limits at twice the
/// configured ones, so the pipeline's JSON 431 answers every request between
/// the two; long unfinished heads counted against the current generation's
/// `server.max_buffered_bytes`.
fn proxy_connection_limits(
    server: &crate::config::Server,
    current: &Arc<ArcSwap<Proxy>>,
    metrics: &Metrics,
) -> ConnectionLimits {
    let ceilings = server.header_ceilings();
    let current = current.clone();
    let head_budget = HeadBudget {
        current: Arc::new(move || current.load().buffer_budget()),
        over: metrics.heads_over_budget.clone(),
    };
    ConnectionLimits {
        header_read_timeout: server.header_read_timeout,
        idle_timeout: server.idle_timeout,
        send_timeout: server.send_timeout,
        slots: ConnectionSlots::new(server.max_connections),
        max_head_bytes: ceilings.bytes,
        max_header_fields: ceilings.fields,
        // Callers share addresses (a NAT, a node's sidecars): no cap per peer.
        per_peer: None,
        head_budget: Some(head_budget),
    }
}

/// Connections the admin listener holds at once: probes and scrapes need few,
/// and a flood of them must not exhaust file descriptors.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;
/// The most admin connections one peer address may hold open.
pub const ADMIN_MAX_PER_PEER: usize = 16;

/// The longest any admin connection timer runs.
const ADMIN_TIMER_CAP: Duration = Duration::from_secs(5);

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

/// `count` sockets listening on `addr` with `SO_REUSEPORT`, so each runtime
/// thread accepts its own share of connections (the kernel spreads them by
/// their addresses). With port 0 the first picks the port and the rest share it.
pub fn bind_shared(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut sockets = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        sockets.push(listener);
    }
    Ok(sockets)
}

/// What serving the proxy port needs, so more sockets of it can be served on
/// other runtimes ([`Running::proxy_server`]).
#[derive(Clone)]
struct ProxyServer {
    current: Arc<ArcSwap<Proxy>>,
    tls: Option<server::Tls>,
    limits: ConnectionLimits,
    counters: crate::metrics::ConnectionCounters,
    shutdown: CancellationToken,
    grace: Duration,
}

impl ProxyServer {
    async fn serve(self, listener: TcpListener) {
        let current = self.current;
        server::serve(
            listener,
            self.tls,
            self.limits,
            self.counters,
            move |connection: ConnectionInfo| {
                let current = current.clone();
                let connection = Arc::new(connection);
                move |request: Request<CallerBody>| {
                    // One load per request: it finishes on the generation it started with.
                    let proxy = Proxy::clone(&current.load());
                    proxy.handle(request, connection.clone())
                }
            },
            self.shutdown,
            self.grace,
        )
        .await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] reload::BuildError),
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Fleet(String),
}

/// A running proxy. Dropping it does not stop it: call [`Running::shutdown`].
pub struct Running {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    current: Arc<ArcSwap<Proxy>>,
    metrics: Arc<Metrics>,
    reload: ReloadHandle,
    shutdown: CancellationToken,
    proxy_server: ProxyServer,
    /// The proxy and admin servers.
    tasks: JoinSet<()>,
    reloader: Option<JoinHandle<()>>,
    /// Stopped only after the servers have drained, so tokens stay fresh (and
    /// rejected ones are replaced) for the requests still finishing.
    refresher: Option<RefresherTask>,
}

impl Running {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The tokens of the config generation serving now.
    pub fn tokens(&self) -> CredentialTokens {
        self.current.load().tokens().clone()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves another socket of the proxy port (see [`bind_shared`]) until
    /// shutdown, with its drain. The binary runs one per extra CPU, each on a
    /// single-threaded runtime of its own thread; the future must be polled on
    /// the runtime that is to own the socket.
    pub fn proxy_server(&self, listener: std::net::TcpListener) -> impl Future<Output = ()> + Send + 'static {
        let server = self.proxy_server.clone();
        async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => server.serve(listener).await,
                Err(error) => tracing::error!(%error, "cannot serve a proxy socket"),
            }
        }
    }

    /// Resolves once every credential of the current generation holds a valid
    /// token (what `/readyz` reports).
    pub async fn ready(&self) {
        let mut generations = self.reload.generations();
        loop {
            generations.mark_unchanged();
            let tokens = self.tokens();
            tokio::select! {
                () = tokens.ready() => return,
                changed = generations.changed() => if changed.is_err() { return tokens.ready().await },
            }
        }
    }

    /// Asks for a config reload (what SIGHUP does).
    pub fn request_reload(&self) {
        self.reload.request();
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
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
        if let Some(reloader) = self.reloader.take() {
            let _ = reloader.await;
        }
        if let Some(refresher) = self.refresher.take() {
            refresher.stop().await;
        }
    }
}

/// Starts the refresher, the reloader and the proxy and admin servers on `listeners`.
pub async fn start(config: &Config, listeners: Listeners) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let (mut refresher, refresh_handle) = Refresher::new(TokenStore::new(), metrics.clone());
    let shutdown = CancellationToken::new();
    let fleet = match &config.fleet {
        None => None,
        Some(settings) => {
            let fleet = Fleet::new(settings.clone(), metrics.clone()).map_err(StartError::Fleet)?;
            if let Err(error) = fleet.connect().await {
                tracing::warn!(%error, "fleet: Redis is unreachable at start; fetching tokens alone until it answers");
            }
            tokio::spawn(fleet.clone().run(shutdown.clone()));
            refresher.join_fleet(fleet.clone());
            Some(fleet)
        }
    };
    let traffic = TrafficState::with_fleet(fleet.clone());
    if let Some(fleet) = &fleet {
        tokio::spawn(learn_throttles(fleet.news(), traffic.clone(), metrics.clone(), shutdown.clone()));
    }
    let Clients { upstream, issuer } = reload::clients(config)?;
    let set = reload::credential_set(config);
    let tokens = refresher.configure(&set, issuer).map_err(reload::BuildError::Credential)?;
    let proxy = Proxy::new(
        reload::proxy_settings(config),
        upstream,
        tokens,
        refresh_handle.clone(),
        metrics.clone(),
        reload::traffic(config, &set.principals(), &traffic),
    );
    let refresher = RefresherTask::spawn(refresher);
    let current = Arc::new(ArcSwap::from_pointee(proxy));
    let grace = config.server.shutdown_grace;
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let (reloader, reload) =
        Reloader::new(config.clone(), current.clone(), metrics.clone(), refresh_handle, traffic);
    let reloader = tokio::spawn(reloader.run(shutdown.clone()));
    let admin = Admin::new(current.clone(), metrics.clone(), refresher.alive());
    let admin_current = current.clone();

    let proxy_server = ProxyServer {
        limits: proxy_connection_limits(&config.server, &current, &metrics),
        current,
        tls: config
            .listen
            .tls
            .as_ref()
            .map(|tls| server::Tls { config: tls.server_config.clone(), anchors: tls.anchors.clone() }),
        counters: metrics.connections("proxy"),
        shutdown: shutdown.clone(),
        grace,
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(proxy_server.clone().serve(listeners.proxy));
    tasks.spawn(server::serve(
        listeners.admin,
        None,
        ConnectionLimits {
            // Every timer at most 5 s: the admin port's 256 places go to probes
            // and scrapes, and a peer holding idle connections open (an HTTP/2
            // preface, then nothing) must not keep the kubelet out.
            header_read_timeout: config.server.header_read_timeout.min(ADMIN_TIMER_CAP),
            idle_timeout: config.server.idle_timeout.min(ADMIN_TIMER_CAP),
            send_timeout: config.server.send_timeout.min(ADMIN_TIMER_CAP),
            slots: ConnectionSlots::new(ADMIN_MAX_CONNECTIONS),
            max_head_bytes: 16 * 1024,
            max_header_fields: 64,
            // And one peer address holds at most 16 of them: a peer that keeps
            // connections alive with a request every few seconds (the timers
            // never fire) cannot take all 256.
            per_peer: Some(ADMIN_MAX_PER_PEER),
            head_budget: None,
        },
        metrics.connections("admin"),
        move |_connection| {
            let admin = admin.clone();
            move |request: Request<CallerBody>| std::future::ready(admin.handle(&request))
        },
        shutdown.clone(),
        grace,
    ));
    let scheme = if config.listen.tls.is_some() { "https" } else { "http" };
    tracing::info!(proxy = %format!("{scheme}://{proxy_addr}"), admin = %admin_addr, upstream = %config.upstream.base_url, "listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        current: admin_current,
        metrics,
        reload,
        shutdown,
        proxy_server,
        tasks,
        reloader: Some(reloader),
        refresher: Some(refresher),
    })
}

/// Fleet mode: remembers the Tallyfy 429s other replicas met, as if met here.
async fn learn_throttles(
    mut news: tokio::sync::broadcast::Receiver<News>,
    traffic: Arc<TrafficState>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let heard = tokio::select! {
            () = shutdown.cancelled() => return,
            heard = news.recv() => heard,
        };
        match heard {
            Ok(News::Throttled(throttled)) => {
                let now = crate::traffic::clock::nanos(tokio::time::Instant::now());
                if traffic.learn(&throttled, now) {
                    metrics.fleet_throttles_learned.inc();
                }
            }
            Ok(News::Tokens { .. }) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
