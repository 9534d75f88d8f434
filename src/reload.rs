//! Live reload: on SIGHUP, or when `proxy.toml` or a secret file it reads
//! changes on disk, load and validate the new config and swap it in whole.
//!
//! A config generation is one [`Proxy`] (identities, policies, upstream client,
//! token store, refresher handle) behind one `ArcSwap`: a request loads it once
//! and finishes on it, so in-flight requests keep the config they started with.
//! The old refresher hands its state to the new one: credentials whose settings
//! did not change keep their tokens and cost no token-endpoint call; changed
//! ones are fetched before the new generation serves (for at most
//! [`READY_WAIT`]). An invalid config is logged in one line, counted, and the
//! old one keeps running. Listener changes need a restart and are reported so.

mod watch;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::proxy::Proxy;
use crate::tokens::TokenStore;
use crate::tokens::issuer::Issuer;
use crate::tokens::refresh::{Handover, Refresher};

/// How long a reload waits for changed credentials' first tokens before the new
/// config serves anyway (callers of a credential still without a token get 503).
pub const READY_WAIT: Duration = Duration::from_secs(10);

/// Bursts of file events (an editor's save, a Kubernetes symlink swap) are one reload.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// A running refresher and the means to stop it.
pub struct RefresherTask {
    stop: CancellationToken,
    task: JoinHandle<Handover>,
}

impl RefresherTask {
    pub fn spawn(refresher: Refresher) -> RefresherTask {
        let stop = CancellationToken::new();
        let task = tokio::spawn(refresher.run(stop.clone()));
        RefresherTask { stop, task }
    }

    /// Stops it and returns its state.
    pub async fn stop(self) -> Handover {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// Everything one config generation needs, built before anything is swapped.
pub struct Generation {
    pub proxy: Proxy,
    pub refresher: Refresher,
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

/// Builds a generation for `config` (no I/O yet: nothing runs until spawned).
pub fn build(config: &Config, metrics: &Arc<Metrics>) -> Result<Generation, BuildError> {
    let tokens = TokenStore::new(config.credentials.iter().map(|c| c.name.clone()).collect());
    let (refresher, handle) = Refresher::new(config, tokens.clone(), Issuer::new(config)?, metrics.clone())
        .map_err(BuildError::Credential)?;
    let proxy = Proxy::new(config, tokens, handle, metrics.clone())?;
    Ok(Generation { proxy, refresher })
}

/// Asks for a reload (SIGHUP, tests). Cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle {
    trigger: mpsc::Sender<()>,
    generations: tokio::sync::watch::Receiver<u64>,
}

impl ReloadHandle {
    pub fn request(&self) {
        let _ = self.trigger.try_send(());
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
    refresher: RefresherTask,
    triggers: mpsc::Receiver<()>,
    trigger: mpsc::Sender<()>,
    watcher: Option<watch::Watcher>,
    /// Counts swapped-in generations, so waiters for readiness follow reloads.
    swapped: tokio::sync::watch::Sender<u64>,
}

impl Reloader {
    pub fn new(
        config: Config,
        current: Arc<ArcSwap<Proxy>>,
        metrics: Arc<Metrics>,
        refresher: RefresherTask,
    ) -> (Reloader, ReloadHandle) {
        let (trigger, triggers) = mpsc::channel(16);
        let watcher = watch::Watcher::start(&config, trigger.clone());
        let (swapped, generations) = tokio::sync::watch::channel(0);
        let handle = ReloadHandle { trigger: trigger.clone(), generations };
        (Reloader { config, current, metrics, refresher, triggers, trigger, watcher, swapped }, handle)
    }

    /// Reloads on every trigger until `shutdown`; then returns the refresher,
    /// which the caller stops once the servers have drained.
    pub async fn run(mut self, shutdown: CancellationToken) -> RefresherTask {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return self.refresher,
                Some(()) = self.triggers.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while self.triggers.try_recv().is_ok() {}
                    self.reload(&shutdown).await;
                }
            }
        }
    }

    async fn reload(&mut self, shutdown: &CancellationToken) {
        let outcome = |metrics: &Metrics, outcome: &str| {
            metrics.config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
        };
        let new = match Config::load(&self.config.file) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "config reload rejected; the running config stays");
                outcome(&self.metrics, "invalid");
                return;
            }
        };
        let Generation { proxy, mut refresher } = match build(&new, &self.metrics) {
            Ok(generation) => generation,
            Err(error) => {
                tracing::error!(%error, "config reload failed; the running config stays");
                outcome(&self.metrics, "failed");
                return;
            }
        };
        for setting in restart_only_changes(&self.config, &new) {
            tracing::warn!(
                setting,
                "changed, but takes effect only after a restart; everything else is reloaded"
            );
        }
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        // Nothing can fail from here on: hand the old refresher's state over.
        let old = std::mem::replace(&mut self.refresher, RefresherTask::placeholder());
        let carried = refresher.adopt(old.stop().await);
        let tokens = proxy.tokens().clone();
        self.refresher = RefresherTask::spawn(refresher);
        // Changed credentials are fetched before the new config serves. Meanwhile
        // the old generation serves on with the tokens it holds (they stay valid;
        // only a replay after a 401 is not possible in this short window). A
        // shutdown does not wait for this.
        if !tokens.not_ready(std::time::Instant::now()).is_empty() {
            tokio::select! {
                () = tokens.ready() => {}
                () = tokio::time::sleep(READY_WAIT) => {
                    let waiting = tokens.not_ready(std::time::Instant::now()).join(", ");
                    tracing::warn!(credentials = %waiting, "reloaded config serves before these credentials have a token");
                }
                () = shutdown.cancelled() => {}
            }
        }
        self.current.store(Arc::new(proxy));
        self.swapped.send_modify(|generation| *generation += 1);
        self.watcher = watch::Watcher::start(&new, self.trigger.clone());
        let fetched = new.credentials.len() - carried;
        self.config = new;
        outcome(&self.metrics, "applied");
        tracing::info!(credentials_kept = carried, credentials_fetched = fetched, "config reloaded");
    }
}

/// Settings a running process cannot change: the listeners, their TLS, the
/// connection limits and the log setup.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen.proxy != new.listen.proxy || old.listen.admin != new.listen.admin {
        changed.push("listen addresses");
    }
    let tls = |c: &Config| c.listen.tls.as_ref().map(|tls| tls.fingerprint);
    if tls(old) != tls(new) {
        changed.push("listen.tls");
    }
    if old.server != new.server {
        changed.push("[server]");
    }
    if old.log != new.log {
        changed.push("[log]");
    }
    changed
}

impl RefresherTask {
    /// A stopped stand-in, only ever held for the instant of a swap.
    fn placeholder() -> RefresherTask {
        let stop = CancellationToken::new();
        stop.cancel();
        RefresherTask { stop, task: tokio::spawn(async { Handover::default() }) }
    }
}
