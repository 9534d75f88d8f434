//! Live reload: on SIGHUP, or when `proxy.toml` or a file it reads changes on
//! disk, load and validate the new config and swap it in whole.
//!
//! A config generation is one [`Proxy`] (identities, policies, upstream client,
//! the slots its credentials read) behind one `ArcSwap`: a request loads it once
//! and finishes on it, so in-flight requests keep the config they started with.
//! The process has one refresher; a reload asks it to map the new credentials
//! onto slots ([`RefreshHandle::reconfigure`]): unchanged credentials keep their
//! tokens, any refresh already running and the requests waiting on it; changed
//! ones are fetched at once, those changed only in their secrets serving with
//! their previous token meanwhile, the others' callers waiting for it. The
//! new generation serves as soon as it is built: nothing in it waits for a
//! token. An invalid config is logged
//! in one line, counted, and the old one keeps running; the load is tried
//! again every [`RETRY_REJECTED`] until it succeeds (a ConfigMap naming a secret whose Secret volume has not been
//! updated yet succeeds a moment later, and that file may be one no event
//! speaks of). Settings of the listeners themselves need a restart and are
//! reported so.

mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::proxy::{self, Proxy};
use crate::tokens::CredentialSet;
use crate::tokens::issuer::Issuer;
use crate::tokens::refresh::{RefreshHandle, Refresher};
use crate::traffic::{Traffic, TrafficState};
use crate::upstream::Upstream;

pub use watch::Trigger;

/// A burst of file events (an editor's save, a Kubernetes symlink swap) is one
/// reload: it happens once the files have been quiet this long...
const DEBOUNCE: Duration = Duration::from_millis(150);
/// ...or this long after the first event, however busy they stay.
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);

/// How soon a reload that was rejected or failed is tried again.
pub const RETRY_REJECTED: Duration = Duration::from_secs(10);

/// The process's refresher task and the means to stop it.
pub struct RefresherTask {
    stop: CancellationToken,
    task: JoinHandle<()>,
    alive: Arc<AtomicBool>,
}

impl RefresherTask {
    pub fn spawn(refresher: Refresher) -> RefresherTask {
        let stop = CancellationToken::new();
        let alive = Arc::new(AtomicBool::new(true));
        let watchdog = Watchdog { alive: alive.clone(), stop: stop.clone() };
        let run = refresher.run(stop.clone());
        let task = tokio::spawn(async move {
            let _watchdog = watchdog;
            run.await;
        });
        RefresherTask { stop, task, alive }
    }

    /// False once the refresher has stopped without being told to (a panic):
    /// no token would be refreshed again, so `/livez` answers 503 and the
    /// process is restarted rather than left to fail every request later.
    pub fn alive(&self) -> Arc<AtomicBool> {
        self.alive.clone()
    }

    /// Stops it (fetches still running are abandoned).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Notes, when the refresher's task ends (or unwinds), whether it was told to.
struct Watchdog {
    alive: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if !self.stop.is_cancelled() {
            self.alive.store(false, Ordering::Relaxed);
            tracing::error!("the token refresher stopped unexpectedly; /livez answers 503 from now on");
        }
    }
}

/// A generation's two HTTP clients (Tallyfy's API, its token endpoint): the
/// parts that can fail to build, made before the refresher hears of the config.
pub struct Clients {
    pub upstream: Upstream,
    pub issuer: Issuer,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Issuer(#[from] crate::tokens::issuer::IssuerSetupError),
    #[error("TLS setup for the upstream failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Credential(String),
}

/// Builds the upstream client and the token endpoint client of `config`.
pub fn clients(config: &Config) -> Result<Clients, BuildError> {
    Ok(Clients {
        upstream: Upstream::new(&config.upstream, config.server.max_request_body_bytes)?,
        issuer: Issuer::new(&config.upstream, &config.tokens)?,
    })
}

/// What the refresher needs of `config`.
pub fn credential_set(config: &Config) -> CredentialSet {
    CredentialSet::new(config.credentials.clone(), config.tokens.clone(), &config.upstream)
}

/// The traffic control of `config`'s generation: its limits, counting on in
/// `state` where they did not change (Tallyfy's 429s, while each credential
/// acts as the same principal: `principals`, its [`CredentialSet::principals`]).
pub fn traffic(config: &Config, principals: &[String], state: &TrafficState) -> Traffic {
    let identities: Vec<_> = config.identities.iter().map(|i| (i.name.as_str(), i.limits)).collect();
    // A personal token's principal tells no user apart (the token is the user,
    // and no part of it goes into a name): its 429s stay this replica's.
    let credentials: Vec<_> = config
        .credentials
        .iter()
        .zip(principals)
        .map(|(c, p)| {
            let tells_users_apart = !matches!(c.kind, crate::tokens::CredentialKind::PersonalToken { .. });
            (c.name.as_str(), tells_users_apart.then_some(p.as_str()))
        })
        .collect();
    state.generation(&config.traffic, &identities, &credentials)
}

/// What the pipeline needs of `config`.
pub fn proxy_settings(config: &Config) -> proxy::Settings {
    proxy::Settings {
        identities: config.identities.clone(),
        limits: proxy::RequestLimits {
            max_header_bytes: config.server.max_header_bytes,
            max_headers: config.server.max_headers,
            max_request_body_bytes: config.server.max_request_body_bytes,
            // Never below the largest body read whole.
            buffer_budget: crate::body::Budget::new(
                config.server.max_buffered_bytes,
                config
                    .dates
                    .max_body_bytes
                    .max(config.links.max_body_bytes)
                    .max(config.tokens.replay_max_body_bytes),
            ),
        },
        tokens: config.tokens.clone(),
        dates: config.dates.clone(),
        links: config.links.clone(),
        public_url: config.listen.public_url.clone(),
        listener_scheme: if config.listen.tls.is_some() { "https" } else { "http" },
        unprefixed: config.listen.unprefixed,
    }
}

/// Asks for a reload (SIGHUP, tests). Cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle {
    trigger: mpsc::Sender<Trigger>,
    generations: tokio::sync::watch::Receiver<u64>,
}

impl ReloadHandle {
    /// Reloads the config, whether or not its files changed (what SIGHUP does).
    pub fn request(&self) {
        let _ = self.trigger.try_send(Trigger::Signal);
    }

    /// Changes whenever a reloaded generation is swapped in.
    pub fn generations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generations.clone()
    }
}

/// The single writer of the current generation.
pub struct Reloader {
    config: Config,
    current: Arc<ArcSwap<Proxy>>,
    metrics: Arc<Metrics>,
    refresher: RefreshHandle,
    /// Local limits' counts, carried across generations.
    traffic: Arc<TrafficState>,
    triggers: mpsc::Receiver<Trigger>,
    trigger: mpsc::Sender<Trigger>,
    watcher: Option<watch::Watcher>,
    /// Counts swapped-in generations, so waiters for readiness follow reloads.
    swapped: tokio::sync::watch::Sender<u64>,
    /// The last reload's failure while it stands, and when to try again: a
    /// retry failing alike is logged at debug level only (a signal or a file
    /// change is always logged and counted).
    failing: Option<(String, tokio::time::Instant)>,
    /// The restart-only settings in effect.
    started: Started,
}

/// The settings only a restart changes, as the process runs them: a reload is
/// compared with these, not with the last reload, whose changes to them never
/// took effect.
struct Started {
    listen: (std::net::SocketAddr, std::net::SocketAddr),
    tls: Option<[u8; 32]>,
    server: crate::config::Server,
    log: crate::config::Log,
    fleet: Option<crate::config::Fleet>,
}

impl Started {
    fn from(config: &Config) -> Started {
        Started {
            listen: (config.listen.proxy, config.listen.admin),
            tls: config.listen.tls.as_ref().map(|tls| tls.fingerprint),
            server: config.server.clone(),
            log: config.log.clone(),
            fleet: config.fleet.clone(),
        }
    }
}

impl Reloader {
    pub fn new(
        config: Config,
        current: Arc<ArcSwap<Proxy>>,
        metrics: Arc<Metrics>,
        refresher: RefreshHandle,
        traffic: Arc<TrafficState>,
    ) -> (Reloader, ReloadHandle) {
        let (trigger, triggers) = mpsc::channel(64);
        let watcher = watch::Watcher::start(&config, trigger.clone());
        let started = Started::from(&config);
        let (swapped, generations) = tokio::sync::watch::channel(0);
        let handle = ReloadHandle { trigger: trigger.clone(), generations };
        (
            Reloader {
                config,
                current,
                metrics,
                refresher,
                traffic,
                triggers,
                trigger,
                watcher,
                swapped,
                failing: None,
                started,
            },
            handle,
        )
    }

    /// Reloads on every trigger until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let retry_at = self.failing.as_ref().map(|(_, at)| *at);
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                Some(trigger) = self.triggers.recv() => Some(trigger),
                () = retry => None,
            };
            let retrying = first.is_none();
            let signalled = match first {
                Some(Trigger::Signal) => true,
                Some(Trigger::Files) => settle_burst(&mut self.triggers).await,
                None => true, // a retry: whatever the files say
            };
            let files_changed = self.watcher.as_mut().is_some_and(watch::Watcher::changed);
            if signalled || files_changed {
                self.reload(retrying).await;
            } else {
                tracing::debug!("files near the config changed, but not the config or its files: no reload");
            }
        }
    }

    async fn reload(&mut self, retrying: bool) {
        let outcome = |metrics: &Metrics, outcome: &str| {
            metrics.config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
        };
        let new = match Config::load(&self.config.file) {
            Ok(config) => config,
            Err(error) => {
                return self.failed(
                    retrying,
                    "invalid",
                    "config reload rejected; the running config stays",
                    error,
                );
            }
        };
        // Watching the new config's files starts now, with their contents as just
        // read: an edit made while the new credentials are fetched is a change.
        let watcher = watch::Watcher::start(&new, self.trigger.clone());
        let clients = match clients(&new) {
            Ok(clients) => clients,
            Err(error) => {
                return self.failed(
                    retrying,
                    "failed",
                    "config reload failed; the running config stays",
                    error,
                );
            }
        };
        let set = credential_set(&new);
        let principals = set.principals();
        let tokens = match self.refresher.reconfigure(set, clients.issuer).await {
            Ok(tokens) => tokens,
            Err(error) => {
                return self.failed(
                    retrying,
                    "failed",
                    "config reload failed; the running config stays",
                    error,
                );
            }
        };
        for setting in restart_only_changes(&self.started, &new) {
            tracing::warn!(
                setting,
                "changed, but takes effect only after a restart; everything else is reloaded"
            );
        }
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        let proxy = Proxy::new(
            proxy_settings(&new),
            clients.upstream,
            tokens,
            self.refresher.clone(),
            self.metrics.clone(),
            traffic(&new, &principals, &self.traffic),
        );
        // Nothing waits: a changed credential's new slot serves with its
        // previous token until it has its own (see `tokens::refresh`), so the
        // rest of the reload (a removed API key, a narrowed policy) applies now.
        self.current.store(Arc::new(proxy));
        self.swapped.send_modify(|generation| *generation += 1);
        self.watcher = watcher;
        self.config = new;
        self.failing = None;
        outcome(&self.metrics, "applied");
        tracing::info!("config reloaded");
    }

    /// A reload that did not apply: tried again [`RETRY_REJECTED`] later;
    /// logged and counted, unless it was such a retry failing as before.
    fn failed(&mut self, retrying: bool, outcome: &str, message: &str, error: impl std::fmt::Display) {
        let reason = error.to_string();
        let again_alike = retrying && self.failing.as_ref().is_some_and(|(last, _)| *last == reason);
        if again_alike {
            tracing::debug!(error = %reason, "{message} (tried again)");
        } else {
            tracing::error!(error = %reason, "{message}; tried again every {}s", RETRY_REJECTED.as_secs());
            self.metrics.config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
        }
        self.failing = Some((reason, tokio::time::Instant::now() + RETRY_REJECTED));
    }
}

/// Waits for a burst of file events to end: `DEBOUNCE` without one, or
/// `DEBOUNCE_MAX` in all (an endless trickle still reloads). `true` if a signal
/// came in it.
async fn settle_burst(triggers: &mut mpsc::Receiver<Trigger>) -> bool {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    let mut signalled = false;
    loop {
        tokio::select! {
            more = triggers.recv() => match more {
                Some(trigger) => signalled |= trigger == Trigger::Signal,
                None => return signalled,
            },
            () = tokio::time::sleep(DEBOUNCE) => return signalled,
            () = tokio::time::sleep_until(deadline) => return signalled,
        }
    }
}

/// Settings a running process cannot change: the listeners (addresses, TLS,
/// connection timers and caps), the drain grace, the log setup and `[fleet]`.
/// The request limits of `[server]` (headers, body size) are reloaded, the
/// header limits within what the parser was given at start.
fn restart_only_changes(started: &Started, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if started.listen != (new.listen.proxy, new.listen.admin) {
        changed.push("listen addresses");
    }
    if started.tls != new.listen.tls.as_ref().map(|tls| tls.fingerprint) {
        changed.push("listen.tls");
    }
    let (o, n) = (&started.server, &new.server);
    if o.header_read_timeout != n.header_read_timeout {
        changed.push("server.header_read_timeout_ms");
    }
    if o.idle_timeout != n.idle_timeout {
        changed.push("server.idle_timeout_ms");
    }
    if o.send_timeout != n.send_timeout {
        changed.push("server.send_timeout_ms");
    }
    if o.max_connections != n.max_connections {
        changed.push("server.max_connections");
    }
    if o.shutdown_grace != n.shutdown_grace {
        changed.push("server.shutdown_grace_ms");
    }
    // The header limits are reloaded, within the ceilings hyper's parser was
    // given at start (twice the limits then); above them, a head is refused by
    // the parser with a bare 431 until a restart. The parser counts a head's
    // framing too: the request line (8 KiB allowed for it here) and, per field,
    // `: ` and CRLF over HTTP/1 or 32 bytes over HTTP/2.
    let ceilings = o.header_ceilings();
    if n.max_headers > ceilings.fields {
        changed.push("server.max_headers (above twice its value at start)");
    }
    // What the limits need of the parser, framing counted; warned of only when
    // the new limits need more than the parser has and than the limits at
    // start needed (those are what a restart would give it, too).
    let needed = |s: &crate::config::Server| {
        s.max_header_bytes.saturating_add(32 * s.max_headers).saturating_add(8 * 1024)
    };
    if needed(n) > ceilings.bytes.max(needed(o)) {
        changed.push(
            "server.max_header_bytes (with the head's framing, above what the parser was given at start)",
        );
    }
    if started.log != new.log {
        changed.push("[log]");
    }
    let fleet_changed = match (&started.fleet, &new.fleet) {
        (None, None) => false,
        (Some(o), Some(n)) => !o.same_as(n),
        _ => true,
    };
    if fleet_changed {
        changed.push("[fleet]");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test]
    async fn a_refresher_that_ends_untold_is_no_longer_alive_and_one_stopped_still_is() {
        for panics in [true, false] {
            let stop = CancellationToken::new();
            let alive = Arc::new(AtomicBool::new(true));
            let watchdog = Watchdog { alive: alive.clone(), stop: stop.clone() };
            let task = tokio::spawn(async move {
                let _watchdog = watchdog;
                assert!(!panics, "a refresher bug (this panic is the test's)");
                std::future::pending::<()>().await;
            });
            if !panics {
                stop.cancel();
                task.abort();
            }
            let _ = task.await;
            assert_eq!(alive.load(Ordering::Relaxed), !panics, "panics: {panics}");
        }
    }

    fn config_with(server: &str) -> Config {
        let source = format!(
            "[listen]\nproxy = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:9901\"\n\
             [upstream]\nbase_url = \"https://go.tallyfy.com\"\n[server]\n{server}\n\
             [[credentials]]\nname = \"ops\"\nkind = \"personal_token\"\ntoken = {{ env = \"T\" }}\n\
             [[identities]]\nname = \"app\"\ncredential = \"ops\"\nmatch = {{ any = true }}\n"
        );
        Config::parse(&source, std::path::Path::new("proxy.toml"), &|_| Some("t".to_owned())).expect("valid")
    }

    #[test]
    fn restart_only_settings_are_compared_with_the_ones_in_effect() {
        let started = Started::from(&config_with("max_headers = 100\nmax_header_bytes = 32768"));
        let changes = |server: &str| restart_only_changes(&started, &config_with(server));
        assert!(changes("max_headers = 200\nmax_header_bytes = 40000").is_empty(), "within the ceilings");
        assert_eq!(
            changes("max_headers = 201\nmax_header_bytes = 60000"),
            [
                "server.max_headers (above twice its value at start)",
                "server.max_header_bytes (with the head's framing, above what the parser was given at start)"
            ]
        );
        // An earlier reload's change to a timer never took effect: a later
        // reload that keeps it is still told so.
        assert_eq!(changes("max_headers = 100\nidle_timeout_ms = 1000"), ["server.idle_timeout_ms"]);
        // Limits whose framing never fitted the parser's ceiling (16 KiB here):
        // unchanged, they are no news at every reload.
        let small = Started::from(&config_with("max_headers = 100\nmax_header_bytes = 8192"));
        assert!(
            restart_only_changes(&small, &config_with("max_headers = 100\nmax_header_bytes = 8192"))
                .is_empty()
        );
    }

    /// Sends `count` file events `every` apart, from a task of its own.
    fn events(count: usize, every: Duration, signal_at: Option<usize>) -> mpsc::Receiver<Trigger> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for i in 0..count {
                tokio::time::sleep(every).await;
                let trigger = if signal_at == Some(i) { Trigger::Signal } else { Trigger::Files };
                if tx.send(trigger).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await; // the watcher lives on
        });
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_settles_one_debounce_after_its_last_event() {
        let mut triggers = events(10, Duration::from_millis(10), None);
        let began = Instant::now();
        assert!(!settle_burst(&mut triggers).await);
        assert_eq!(began.elapsed(), Duration::from_millis(100) + DEBOUNCE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_trickle_still_settles_at_the_maximum_and_remembers_a_signal() {
        let mut triggers = events(1000, Duration::from_millis(100), Some(3));
        let began = Instant::now();
        assert!(settle_burst(&mut triggers).await, "a signal inside the burst reloads in any case");
        assert_eq!(began.elapsed(), DEBOUNCE_MAX);
    }
}
