//! Fleet mode: replicas that share one Redis share their tokens and refreshes.
//!
//! Without `[fleet]` nothing here runs. With it, each replica holds one
//! [`Fleet`]: a Redis connection (redis-rs's reconnecting manager), a pub/sub
//! subscription that hears of new token sets, and the few operations the
//! refresher needs, each one round trip:
//!
//! - a **lease** per credential (`SET NX PX` with a fencing number drawn from a
//!   fleet-wide counter), so one replica calls Tallyfy's token endpoint while
//!   the others wait; released and extended only by its holder (compare and set);
//! - the credential's **token set**, sealed with AES-256-GCM ([`seal`]), written
//!   only by the lease holder (so a holder whose lease lapsed cannot overwrite a
//!   newer set), with a Redis TTL no longer than the token's own life, and
//!   announced on the fleet's channel.
//!
//! Layout under `key_prefix`: `tokens/<credential>` (the sealed set),
//! `lease/<credential>` (the holder's fencing number), `fence` (the counter) and
//! the channel `news` (`<generation> <credential>`). The hot path never talks to
//! Redis: replicas swap what they read into their own token snapshot.
//!
//! Every operation answers [`FleetError::Unreachable`] while Redis is away; the
//! refresher then fetches for itself, and comes back to the fleet with its next
//! refresh once [`Fleet::run`] has reconnected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

mod budget;
mod scripts;
mod seal;
mod settings;

pub use budget::Spend;
pub use seal::EncryptionKey;
pub use settings::Settings;

use crate::metrics::Metrics;

/// How long one Redis call may take before the replica falls back to itself.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the fleet could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("Redis is unreachable: {0}")]
    Unreachable(String),
    /// The stored set does not open with this replica's `encryption_key`.
    #[error("the fleet's token set does not decrypt with this replica's encryption_key")]
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

/// What the fleet's channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// Generation `generation` of `credential`'s token set was written.
    Tokens { credential: Arc<str>, generation: u64 },
    /// Another replica met Tallyfy's 429 for `credential`: hold back for
    /// `wait` (only `org` and `limit` when `hourly`).
    Throttled(Throttled),
}

/// A Tallyfy 429 one replica met, for the others to remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttled {
    pub credential: String,
    pub wait: Duration,
    pub hourly: bool,
    pub org: String,
    pub limit: String,
}

impl News {
    fn encode(&self, from: u64) -> String {
        let value = match self {
            News::Tokens { credential, generation } => {
                serde_json::json!({ "from": from, "tokens": &**credential, "generation": generation })
            }
            News::Throttled(t) => serde_json::json!({
                "from": from,
                "throttled": t.credential,
                "wait_ms": t.wait.as_millis() as u64,
                "hourly": t.hourly,
                "org": t.org,
                "limit": t.limit,
            }),
        };
        value.to_string()
    }

    /// The news and the replica it came from.
    fn decode(text: &str) -> Option<(u64, News)> {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        let from = value["from"].as_u64()?;
        if let Some(credential) = value["tokens"].as_str() {
            let generation = value["generation"].as_u64()?;
            return Some((from, News::Tokens { credential: credential.into(), generation }));
        }
        let throttled = Throttled {
            credential: value["throttled"].as_str()?.to_owned(),
            wait: Duration::from_millis(value["wait_ms"].as_u64()?),
            hourly: value["hourly"].as_bool()?,
            org: value["org"].as_str()?.to_owned(),
            limit: value["limit"].as_str()?.to_owned(),
        };
        Some((from, News::Throttled(throttled)))
    }
}

/// A held refresh lease: its fencing number is the generation the set written
/// under it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence(pub u64);

pub struct Fleet {
    settings: Settings,
    client: redis::Client,
    connection: OnceLock<ConnectionManager>,
    connected: AtomicBool,
    news: broadcast::Sender<News>,
    metrics: Arc<Metrics>,
    /// This process among the replicas (its own throttle news is not news).
    replica: u64,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("key_prefix", &self.settings.key_prefix)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// A fleet member, not yet connected ([`Fleet::run`] connects). Fails only
    /// when the URL cannot be read.
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Result<Arc<Fleet>, String> {
        if settings.redis_url.expose().starts_with("rediss://") {
            // redis-rs builds its TLS config from the process's default provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(settings.redis_url.expose())
            .map_err(|_| "fleet.redis_url is not a usable redis:// or rediss:// URL".to_owned())?;
        metrics.fleet_connected.set(0);
        let (news, _) = broadcast::channel(256);
        Ok(Arc::new(Fleet {
            settings,
            client,
            connection: OnceLock::new(),
            connected: AtomicBool::new(false),
            news,
            metrics,
            replica: rand::random(),
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.settings.lease
    }

    /// News of token sets written by any replica (this one included).
    pub fn news(&self) -> broadcast::Receiver<News> {
        self.news.subscribe()
    }

    /// Connects, subscribes to the fleet's channel and passes its messages on,
    /// reconnecting after a second whenever Redis goes away, until `shutdown`.
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
    /// reconnects by itself afterwards). The process calls it before its first
    /// token fetch, so a replica starting beside a healthy Redis joins the
    /// fleet at once instead of signing in alone.
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
        Ok(())
    }

    async fn listen(&self) -> Result<(), FleetError> {
        self.connect().await?;
        let mut pubsub = tokio::time::timeout(CALL_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| FleetError::Unreachable("connecting timed out".into()))??;
        pubsub.subscribe(self.channel()).await?;
        self.mark(Ok(()));
        let mut messages = pubsub.into_on_message();
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = check.tick() => {
                    // A call that failed marked the fleet unreachable: see whether it is back.
                    if !self.connected.load(Ordering::Relaxed) {
                        let mut connection = self.connection()?;
                        let _ = self.call(redis::cmd("PING").query_async::<String>(&mut connection)).await;
                    }
                    continue;
                }
            };
            let Some(message) = message else { break };
            let Ok(text) = message.get_payload::<String>() else { continue };
            let Some((from, news)) = News::decode(&text) else { continue };
            if from == self.replica && matches!(news, News::Throttled(_)) {
                continue;
            }
            let _ = self.news.send(news);
        }
        Err(FleetError::Unreachable("the subscription ended".into()))
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
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, call).await {
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

    /// The credential's token set, opened; `None` when the fleet holds none.
    pub async fn read(&self, credential: &str) -> Result<Option<Vec<u8>>, FleetError> {
        let mut connection = self.connection()?;
        let at = self.key("tokens", credential);
        let sealed: Option<Vec<u8>> =
            self.call(redis::cmd("GET").arg(&at).query_async(&mut connection)).await?;
        match sealed {
            None => Ok(None),
            Some(sealed) => self.settings.encryption_key.open(&at, &sealed).map(Some).ok_or_else(|| {
                self.metrics.fleet_undecryptable.inc();
                FleetError::Undecryptable
            }),
        }
    }

    /// Takes the credential's refresh lease for [`Fleet::lease`]; `None` while
    /// another replica holds it.
    pub async fn acquire(&self, credential: &str) -> Result<Option<Fence>, FleetError> {
        let mut connection = self.connection()?;
        let script = scripts::acquire();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key("lease", credential))
            .key(format!("{}/fence", self.settings.key_prefix))
            .arg(self.settings.lease.as_millis() as u64);
        let fence: u64 = self.call(invocation.invoke_async(&mut connection)).await?;
        Ok((fence > 0).then_some(Fence(fence)))
    }

    /// Extends a held lease by [`Fleet::lease`]; `false` when it was lost.
    pub async fn extend(&self, credential: &str, fence: Fence) -> Result<bool, FleetError> {
        let mut connection = self.connection()?;
        let script = scripts::extend();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key("lease", credential))
            .arg(fence.0)
            .arg(self.settings.lease.as_millis() as u64);
        let extended: u64 = self.call(invocation.invoke_async(&mut connection)).await?;
        Ok(extended == 1)
    }

    /// Gives a held lease back (nothing when it lapsed and another holds it now).
    pub async fn release(&self, credential: &str, fence: Fence) {
        let Ok(mut connection) = self.connection() else { return };
        let script = scripts::release();
        let mut invocation = script.prepare_invoke();
        invocation.key(self.key("lease", credential)).arg(fence.0);
        let _: Result<u64, _> = self.call(invocation.invoke_async(&mut connection)).await;
    }

    /// Seals and writes the credential's set as generation `fence`, living
    /// `ttl` in Redis, and announces it; `false` (nothing written) when the
    /// lease is no longer this replica's.
    pub async fn write(
        &self,
        credential: &str,
        fence: Fence,
        plaintext: &[u8],
        ttl: Duration,
    ) -> Result<bool, FleetError> {
        let mut connection = self.connection()?;
        let at = self.key("tokens", credential);
        let sealed = self.settings.encryption_key.seal(&at, plaintext);
        let script = scripts::write();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key("lease", credential))
            .key(&at)
            .key(self.channel())
            .arg(fence.0)
            .arg(sealed)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(News::Tokens { credential: credential.into(), generation: fence.0 }.encode(self.replica));
        let written: u64 = self.call(invocation.invoke_async(&mut connection)).await?;
        Ok(written == 1)
    }
}

impl Fleet {
    /// Tells the other replicas of a Tallyfy 429 (best effort: a replica that
    /// misses it meets the 429 itself).
    pub async fn tell_throttled(&self, throttled: Throttled) {
        let Ok(mut connection) = self.connection() else { return };
        let message = News::Throttled(throttled).encode(self.replica);
        let _: Result<u64, _> = self
            .call(redis::cmd("PUBLISH").arg(self.channel()).arg(message).query_async(&mut connection))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_round_trips_with_its_sender() {
        let tokens = News::Tokens { credential: "user.0011".into(), generation: 42 };
        assert_eq!(News::decode(&tokens.encode(7)), Some((7, tokens)));
        let throttled = News::Throttled(Throttled {
            credential: "user".into(),
            wait: Duration::from_secs(30),
            hourly: true,
            org: "abc".into(),
            limit: "POST /api/organizations/abc/guests".into(),
        });
        assert_eq!(News::decode(&throttled.encode(9)), Some((9, throttled)));
        assert_eq!(News::decode("3 user"), None, "not ours");
    }
}
