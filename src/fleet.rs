//! Fleet mode: replicas that share one Redis share their tokens, their
//! refreshes and their rate budgets.
//!
//! Without `[fleet]` nothing here runs. With it, each replica holds one
//! [`Fleet`]: a Redis connection (redis-rs's reconnecting manager), a
//! subscription to the fleet's channel ([`news`]), and a few operations, each
//! one round trip:
//!
//! - a **lease** per credential (`SET NX PX` with a fencing number that never
//!   goes back, [`scripts`]), so one replica calls Tallyfy's token endpoint
//!   while the others wait; released and extended only by its holder;
//! - the credential's **token set** ([`token_sets`]), sealed with AES-256-GCM
//!   ([`seal`]), written only by the lease holder (so a holder whose lease
//!   lapsed cannot overwrite a newer set), with a Redis TTL no longer than the
//!   token's own life, and announced on the channel;
//! - **budgets** ([`budget`]): `rate_limit` and `[[limits]]` spent fleet-wide.
//!
//! Layout under `key_prefix`: `tokens/<credential>` (the sealed set),
//! `lease/<credential>` (the holder's fencing number), `fence` (the counter),
//! `generations` (each credential's last generation, for replicas that missed
//! the news), `key-fingerprint` and `key-check` (the fleet's key named, and a
//! value sealed with it), `budget/...`,
//! and the channel `news`. It stores bytes and counts under names it is given:
//! it knows nothing of tokens or limits.
//!
//! Every operation answers [`FleetError::Unreachable`] while Redis is away; the
//! caller then works alone, and comes back to the fleet once [`Fleet::run`]
//! has reconnected.
//!
//! The fleet's key is the one named by `key-fingerprint` (a digest that
//! reveals nothing of it), seeded by the first replica to start. A replica
//! whose key is another answers [`FleetError::Undecryptable`] to every token
//! operation, so it never writes a set the others cannot open: the lease and
//! write scripts compare the fingerprint in the same atomic step as the write.
//! The fingerprint decides whenever Redis holds one; `key-check`, a value
//! sealed with the key that replicas of earlier versions compare, decides
//! only without it, and a replica names the fingerprint beside a check only
//! when its key opens that check. Redis can lose both (a flush, an eviction,
//! a restart without persistence); the replicas whose key they named name it
//! again at their next lease or poll ([`news::POLL_EVERY`], checked every
//! second), and a refused replica names nothing, so it cannot take the fleet
//! over. It reads the fingerprint at each poll, and its credentials rejoin
//! the fleet once the fingerprint names its key ([`Fleet::rejoins`]). A lease
//! or write that finds only the check (no fingerprint) leaves the naming to
//! the key check.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

mod budget;
mod news;
mod scripts;
mod seal;
mod settings;
mod token_sets;

pub use budget::Spend;
pub use news::{News, Throttled};
pub use seal::EncryptionKey;
pub use settings::Settings;
pub use token_sets::{Announce, Stored};

use crate::metrics::Metrics;

/// How long one Redis call may take before the replica works alone.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the key check holds, sealed.
const KEY_CHECK: &[u8] = b"tallyfy-proxy fleet key check";

/// Why the fleet could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("Redis is unreachable: {0}")]
    Unreachable(String),
    /// This replica's `encryption_key` is not the fleet's.
    #[error("the fleet's tokens do not decrypt with this replica's encryption_key")]
    Undecryptable,
}

impl FleetError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Undecryptable => "undecryptable",
        }
    }
}

impl From<redis::RedisError> for FleetError {
    fn from(error: redis::RedisError) -> Self {
        // redis-rs errors name the command and the address, never the URL's password.
        FleetError::Unreachable(error.to_string())
    }
}

/// A held refresh lease: its fencing number is the generation the set written
/// under it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence(pub u64);

/// The key check's outcome.
const KEY_UNCHECKED: u8 = 0;
const KEY_ACCEPTED: u8 = 1;
const KEY_REFUSED: u8 = 2;

pub struct Fleet {
    settings: Settings,
    client: redis::Client,
    connection: OnceLock<ConnectionManager>,
    connected: AtomicBool,
    key: AtomicU8,
    /// Returns of the fleet's key to this replica's ([`Fleet::rejoins`]).
    rejoins: AtomicU64,
    /// This replica's key, named ([`EncryptionKey::fingerprint`]).
    fingerprint: String,
    news: broadcast::Sender<News>,
    metrics: Arc<Metrics>,
    /// This process among the replicas (its own throttle news is not news).
    replica: u64,
    /// The last set under each key that did not open, as a digest: the same
    /// one read again is not reported again.
    unopened: std::sync::Mutex<std::collections::HashMap<String, [u8; 32]>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("key_prefix", &self.settings.key_prefix)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// A fleet member, not yet connected ([`Fleet::connect`], [`Fleet::run`]).
    /// Fails only when the URL cannot be read.
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Result<Arc<Fleet>, String> {
        if settings.redis_url.expose().starts_with("rediss://") {
            // redis-rs builds its TLS config from the process's default provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(settings.redis_url.expose())
            .map_err(|_| "fleet.redis_url is not a usable redis:// or rediss:// URL".to_owned())?;
        metrics.fleet_connected.set(0);
        let (news, _) = broadcast::channel(256);
        let fingerprint = settings.encryption_key.fingerprint(&settings.key_prefix);
        Ok(Arc::new(Fleet {
            fingerprint,
            settings,
            client,
            connection: OnceLock::new(),
            connected: AtomicBool::new(false),
            key: AtomicU8::new(KEY_UNCHECKED),
            rejoins: AtomicU64::new(0),
            news,
            metrics,
            replica: rand::random(),
            unopened: std::sync::Mutex::default(),
        }))
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.settings.lease
    }

    /// News of token sets written by any replica (this one included) and of
    /// the 429s other replicas met.
    pub fn news(&self) -> broadcast::Receiver<News> {
        self.news.subscribe()
    }

    /// Keeps the subscription up, reconnecting a second after it fails, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.listen() => {
                    if let Err(error) = outcome {
                        self.mark(Err(&error));
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Opens the connection the operations use (once: redis-rs's manager
    /// reconnects by itself afterwards) and checks this replica's key against
    /// the fleet's. The process calls it before its first token fetch, so a
    /// replica starting beside a healthy Redis joins the fleet at once instead
    /// of signing in alone.
    pub async fn connect(&self) -> Result<(), FleetError> {
        if self.connection.get().is_none() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let manager = tokio::time::timeout(
                CALL_TIMEOUT * 3,
                self.client.get_connection_manager_with_config(config),
            )
            .await
            .map_err(|_| FleetError::Unreachable("connecting timed out".into()))??;
            let _ = self.connection.set(manager);
            self.mark(Ok(()));
        }
        if self.key.load(Ordering::Relaxed) == KEY_UNCHECKED {
            self.check_key().await?;
        }
        Ok(())
    }

    /// Compares this replica's key with the fleet's: the fingerprint decides
    /// when Redis holds one; without it, the sealed check replicas of earlier
    /// versions left. What is absent is seeded (see the script), unless the
    /// fleet refused this replica's key: a refused replica never names the
    /// fleet's key after Redis lost it. With nothing to compare, the verdict
    /// stands.
    async fn check_key(&self) -> Result<(), FleetError> {
        let at = self.key_check_key();
        let seed = self.key.load(Ordering::Relaxed) != KEY_REFUSED;
        let (check, named) = self.key_check(&at, seed, &[]).await?;
        let verdict = match (named, check) {
            (Some(named), _) => named == self.fingerprint,
            (None, Some(check)) => {
                let opened = self.settings.encryption_key.open(&at, &check).as_deref() == Some(KEY_CHECK);
                if opened && seed {
                    // The fleet of earlier versions is this replica's: named beside
                    // the check it opened (unless another took its place meanwhile).
                    let (_, named) = self.key_check(&at, seed, &check).await?;
                    named.is_none_or(|named| named == self.fingerprint)
                } else {
                    opened
                }
            }
            (None, None) => return Ok(()),
        };
        self.key_verdict(if verdict { KEY_ACCEPTED } else { KEY_REFUSED });
        Ok(())
    }

    /// One run of the key check script: the check and fingerprint Redis holds.
    async fn key_check(
        &self,
        at: &str,
        seed: bool,
        opened: &[u8],
    ) -> Result<(Option<Vec<u8>>, Option<String>), FleetError> {
        let mut connection = self.connection()?;
        let mut invocation = scripts::scripts().key_check.prepare_invoke();
        invocation
            .key(at)
            .key(self.fingerprint_key())
            .arg(self.settings.encryption_key.seal(at, KEY_CHECK))
            .arg(&self.fingerprint)
            .arg(if seed { "seed" } else { "" })
            .arg(opened);
        self.call(invocation.invoke_async(&mut connection)).await
    }

    /// How often the fleet's key has become this replica's again after
    /// refusing it: credentials that left the fleet before the last such
    /// return may come back.
    pub fn rejoins(&self) -> u64 {
        self.rejoins.load(Ordering::Relaxed)
    }

    /// Records the key check's verdict; logs and counts only the changes.
    fn key_verdict(&self, verdict: u8) {
        let before = self.key.swap(verdict, Ordering::Relaxed);
        if before == verdict {
            return;
        }
        if verdict == KEY_REFUSED {
            self.metrics.fleet_undecryptable.inc();
            tracing::error!(
                prefix = %self.settings.key_prefix,
                "fleet: the fleet's tokens do not decrypt with this replica's encryption_key; \
                 this replica refreshes its tokens alone (give every replica the same key)"
            );
        } else if before == KEY_REFUSED {
            self.rejoins.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(prefix = %self.settings.key_prefix, "fleet: the fleet's key is this replica's again; joining it");
        }
    }

    /// What a script's -1 means: the fleet's key is another.
    fn refused_by_script(&self) -> FleetError {
        self.key_verdict(KEY_REFUSED);
        FleetError::Undecryptable
    }

    /// `Err(Undecryptable)` for a replica whose key the fleet refused.
    fn key_accepted(&self) -> Result<(), FleetError> {
        match self.key.load(Ordering::Relaxed) {
            KEY_REFUSED => Err(FleetError::Undecryptable),
            KEY_ACCEPTED => Ok(()),
            _ => Err(FleetError::Unreachable("the key is not checked yet".into())),
        }
    }

    /// Records whether Redis answered; logs only the changes.
    fn mark(&self, outcome: Result<(), &FleetError>) {
        let now = outcome.is_ok();
        if self.connected.swap(now, Ordering::Relaxed) != now {
            match outcome {
                Ok(()) => tracing::info!(prefix = %self.settings.key_prefix, "fleet: connected to Redis"),
                Err(error) => tracing::warn!(
                    %error,
                    "fleet: Redis is unreachable; each replica refreshes its own tokens until it returns"
                ),
            }
        }
        self.metrics.fleet_connected.set(i64::from(now));
    }

    /// Whether Redis answered the last call.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn connection(&self) -> Result<ConnectionManager, FleetError> {
        self.connection.get().cloned().ok_or_else(|| FleetError::Unreachable("not connected yet".into()))
    }

    /// One call, bounded by [`CALL_TIMEOUT`], its outcome marked.
    async fn call<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, FleetError> {
        self.call_within(CALL_TIMEOUT, call).await
    }

    /// One call, bounded by `limit`, its outcome marked.
    async fn call_within<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, FleetError> {
        let outcome = match tokio::time::timeout(limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(FleetError::from(error)),
            Err(_) => Err(FleetError::Unreachable("a call timed out".into())),
        };
        self.mark(outcome.as_ref().map(|_| ()));
        outcome
    }

    fn key(&self, kind: &str, credential: &str) -> String {
        format!("{}/{kind}/{credential}", self.settings.key_prefix)
    }

    fn channel(&self) -> String {
        format!("{}/news", self.settings.key_prefix)
    }

    fn key_check_key(&self) -> String {
        format!("{}/key-check", self.settings.key_prefix)
    }

    fn fingerprint_key(&self) -> String {
        format!("{}/key-fingerprint", self.settings.key_prefix)
    }

    fn generations_key(&self) -> String {
        format!("{}/generations", self.settings.key_prefix)
    }
}
