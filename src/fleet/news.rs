//! The fleet's channel: what replicas tell each other (new token sets,
//! Tallyfy's 429s), and the subscription that hears it, with a poll of the
//! generations as the fallback for whatever a reconnect missed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{CALL_TIMEOUT, Fleet, FleetError};

/// How often the generations are read whatever the channel said, so a message
/// lost while the subscription was down is made up for.
pub const POLL_EVERY: Duration = Duration::from_secs(5);

/// The most bytes a message of the channel may hold.
const MAX_NEWS_BYTES: usize = 4096;
/// The longest organisation a 429's news names: the traffic key's 64 bytes, or
/// `sha256:` and a digest for a longer one.
const LONGEST_ORG_KEY: usize = 71;
/// The longest limit a 429's news names: a rule's name, or a method and a
/// path of at most 512 bytes (or its digest).
const LONGEST_LIMIT_KEY: usize = 1024;

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
    /// The principal the credential acts as (its fleet name); `None` from a
    /// replica of an earlier version.
    pub principal: Option<String>,
    pub wait: Duration,
    pub hourly: bool,
    pub org: String,
    pub limit: String,
}

impl News {
    pub(super) fn encode(&self, from: u64) -> String {
        let value = match self {
            News::Tokens { credential, generation } => {
                serde_json::json!({ "from": from, "tokens": &**credential, "generation": generation })
            }
            News::Throttled(t) => serde_json::json!({
                "from": from,
                "throttled": t.credential,
                "principal": t.principal,
                "wait_ms": t.wait.as_millis() as u64,
                "hourly": t.hourly,
                "org": t.org,
                "limit": t.limit,
            }),
        };
        value.to_string()
    }

    /// The news and the replica it came from.
    pub(super) fn decode(text: &str) -> Option<(u64, News)> {
        // Real news is a few hundred bytes (an organisation and a limit are
        // bounded as keys are): a larger message is no replica's, and each
        // learned 429 is kept for up to an hour.
        if text.len() > MAX_NEWS_BYTES {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        let from = value["from"].as_u64()?;
        if let Some(credential) = value["tokens"].as_str() {
            let generation = value["generation"].as_u64()?;
            return Some((from, News::Tokens { credential: credential.into(), generation }));
        }
        let throttled = Throttled {
            credential: value["throttled"].as_str()?.to_owned(),
            principal: value["principal"].as_str().map(str::to_owned),
            wait: Duration::from_millis(value["wait_ms"].as_u64()?),
            hourly: value["hourly"].as_bool()?,
            org: value["org"].as_str().filter(|org| org.len() <= LONGEST_ORG_KEY)?.to_owned(),
            limit: value["limit"].as_str().filter(|limit| limit.len() <= LONGEST_LIMIT_KEY)?.to_owned(),
        };
        Some((from, News::Throttled(throttled)))
    }
}

impl Fleet {
    /// Subscribes, then passes the channel's messages on (and the polled
    /// generations every [`POLL_EVERY`]) until the subscription fails.
    pub(super) async fn listen(&self) -> Result<(), FleetError> {
        self.connect().await?;
        let subscribed = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(self.channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(CALL_TIMEOUT, subscribed)
            .await
            .map_err(|_| FleetError::Unreachable("subscribing timed out".into()))??;
        self.mark(Ok(()));
        let (mut sink, mut messages) = pubsub.split();
        // Whatever was written while this replica was not listening.
        self.poll().await;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let mut polled = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = check.tick() => {
                    // A subscription can die without closing: ping through it.
                    let pong = tokio::time::timeout(CALL_TIMEOUT, sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        return Err(FleetError::Unreachable("the subscription stopped answering".into()));
                    }
                    // A call that failed marked the fleet away: see whether it is back.
                    if !self.is_connected() {
                        let mut connection = self.connection()?;
                        let _ = self.call(redis::cmd("PING").query_async::<String>(&mut connection)).await;
                    }
                    if polled.elapsed() >= POLL_EVERY {
                        polled = tokio::time::Instant::now();
                        self.poll().await;
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

    /// Compares the fleet's key again (seeding it when Redis lost it), then
    /// reads every credential's current generation and passes each on as news
    /// (the refresher ignores the ones it holds).
    async fn poll(&self) {
        let _ = self.check_key().await;
        let Ok(mut connection) = self.connection() else { return };
        // Whatever else someone wrote there is no news, and no error (an error
        // marks Redis away, budgets skipping it, at every poll).
        let kind: Result<String, _> =
            self.call(redis::cmd("TYPE").arg(self.generations_key()).query_async(&mut connection)).await;
        if kind.as_deref() != Ok("hash") {
            return;
        }
        let generations: Result<Vec<(String, String)>, _> =
            self.call(redis::cmd("HGETALL").arg(self.generations_key()).query_async(&mut connection)).await;
        for (credential, generation) in generations.unwrap_or_default() {
            let Ok(generation) = generation.parse() else { continue };
            let _ = self.news.send(News::Tokens { credential: credential.into(), generation });
        }
    }

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
            principal: Some("user.0011".into()),
            wait: Duration::from_secs(30),
            hourly: true,
            org: "abc".into(),
            limit: "POST /api/organizations/abc/guests".into(),
        });
        assert_eq!(News::decode(&throttled.encode(9)), Some((9, throttled)));
        assert_eq!(News::decode("3 user"), None, "not ours");
    }
}
