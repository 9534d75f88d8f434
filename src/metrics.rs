//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Label sets are bounded: identity and credential names come from the config,
//! methods are folded to the standard ones, statuses to their class, reasons to
//! fixed words. Paths and IDs never become labels.
//!
//! The figures every request touches live in [`requests`] (sharded atomics,
//! resolved per identity once per config generation); the rest, touched by
//! refreshes, reloads and refusals, are prometheus-client families here.

mod requests;

pub use requests::{IdentityMetrics, InFlight, RequestMetrics};

use std::sync::Arc;

use tokio::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabel {
    pub credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub credential: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// A listener's connection figures, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounters {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once because `max_connections` were open.
    pub refused: Counter,
}

/// Every metric the proxy keeps. One instance lives for the whole process (it
/// survives config reloads), shared by the pipeline, the refresher and the admin
/// listener.
pub struct Metrics {
    registry: Registry,
    /// Serialises scrapes: each refills the expiry gauges before encoding.
    rendering: std::sync::Mutex<()>,
    /// Requests, their latencies and the in-flight gauge.
    pub requests: Arc<RequestMetrics>,
    pub rejections: Family<ReasonLabel, Counter>,
    pub token_expiry_seconds: Family<CredentialLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub refresh_attempts: Family<CredentialLabel, Counter>,
    pub refresh_failures: Family<FailureLabels, Counter>,
    pub single_flight_waiters: Family<CredentialLabel, Counter>,
    pub replays: Family<CredentialLabel, Counter>,
    pub dates_rewritten: Counter,
    pub bodies_invalid: Counter,
    pub links_rewritten: Counter,
    /// Bodies the buffer budget had no room for (refused, or streamed as they were).
    pub buffers_full: Counter,
    /// HTTP/1 connections cut because their unfinished head found no room in the budget.
    pub heads_over_budget: Counter,
    pub config_reloads: Family<OutcomeLabel, Counter>,
    pub connections_open: Family<ListenerLabel, Gauge>,
    pub connections_refused: Family<ListenerLabel, Counter>,
    pub limit_rejections: Family<LimitLabel, Counter>,
    pub upstream_429s: Family<CredentialLabel, Counter>,
    pub remembered_429_answers: Family<CredentialLabel, Counter>,
    pub retries: Family<ReasonLabel, Counter>,
    pub retry_budget_exhausted: Counter,
    /// Fleet mode: 1 while Redis answers.
    pub fleet_connected: Gauge,
    pub fleet_undecryptable: Counter,
    pub fleet_fallbacks: Family<ReasonLabel, Counter>,
    pub fleet_adopted: Family<CredentialLabel, Counter>,
    pub fleet_throttles_learned: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tallyfy_proxy");
        let requests = Arc::new(RequestMetrics::default());
        let rejections = Family::default();
        let token_expiry_seconds = Family::default();
        let refresh_attempts = Family::default();
        let refresh_failures = Family::default();
        let single_flight_waiters = Family::default();
        let replays = Family::default();
        let dates_rewritten = Counter::default();
        let bodies_invalid = Counter::default();
        let links_rewritten = Counter::default();
        let buffers_full = Counter::default();
        let heads_over_budget = Counter::default();
        let config_reloads = Family::default();
        let connections_open = Family::default();
        let connections_refused = Family::default();
        let limit_rejections = Family::default();
        let upstream_429s = Family::default();
        let remembered_429_answers = Family::default();
        let retries = Family::default();
        let retry_budget_exhausted = Counter::default();
        let fleet_connected = Gauge::default();
        let fleet_undecryptable = Counter::default();
        let fleet_fallbacks = Family::default();
        let fleet_adopted = Family::default();
        let fleet_throttles_learned = Counter::default();
        registry.register(
            "fleet_throttles_learned",
            "Tallyfy 429s another replica met, remembered here as if met here",
            fleet_throttles_learned.clone(),
        );
        registry.register(
            "fleet_connected",
            "Fleet mode: 1 while Redis answers, 0 while each replica refreshes for itself",
            fleet_connected.clone(),
        );
        registry.register(
            "fleet_undecryptable",
            "Fleet token sets that did not decrypt with this replica's encryption_key",
            fleet_undecryptable.clone(),
        );
        registry.register(
            "fleet_fallbacks",
            "Token fetches (unreachable, undecryptable) and budget checks (budget_unreachable) this replica made alone because the fleet could not answer",
            fleet_fallbacks.clone(),
        );
        registry.register(
            "fleet_tokens_adopted",
            "Token sets another replica fetched, taken from the fleet, by credential",
            fleet_adopted.clone(),
        );
        registry.register(
            "limit_rejections",
            "Requests refused by a local limit (rate_limit, max_in_flight, [[limits]]), by limit",
            limit_rejections.clone(),
        );
        registry.register("upstream_429", "Tallyfy's 429 answers, by credential", upstream_429s.clone());
        registry.register(
            "remembered_429_answers",
            "Requests answered 429 by the proxy because Tallyfy's last 429 for the credential still holds",
            remembered_429_answers.clone(),
        );
        registry.register("upstream_retries", "Requests sent to Tallyfy again, by reason", retries.clone());
        registry.register(
            "retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        registry.register_collector(Box::new(requests.clone()));
        registry.register(
            "local_rejections",
            "Requests answered by the proxy itself, by reason",
            rejections.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the held token expires (negative: expired; absent: no expiry known)",
            token_expiry_seconds.clone(),
        );
        registry.register("token_refresh_attempts", "Token fetches started", refresh_attempts.clone());
        registry.register(
            "token_refresh_failures",
            "Token fetches that failed, by reason",
            refresh_failures.clone(),
        );
        registry.register(
            "token_single_flight_waiters",
            "Requests that waited for a refresh another request triggered",
            single_flight_waiters.clone(),
        );
        registry.register("token_replays", "Requests replayed after a dead-token response", replays.clone());
        registry.register("dates_rewritten", "Request date values rewritten", dates_rewritten.clone());
        registry.register(
            "bodies_invalid",
            "JSON-typed request bodies forwarded untouched because they did not parse",
            bodies_invalid.clone(),
        );
        registry.register(
            "links_rewritten",
            "Upstream URLs in responses rewritten to the proxy",
            links_rewritten.clone(),
        );
        registry.register(
            "buffers_full",
            "Bodies server.max_buffered_bytes had no room for: refused with 503 (one that must be judged or \
             rewritten), or streamed as they were (one kept for a replay, an answer read for its links)",
            buffers_full.clone(),
        );
        registry.register(
            "heads_over_budget",
            "HTTP/1 connections cut because their unfinished request head (past its first 8 KiB) found no \
             room in server.max_buffered_bytes",
            heads_over_budget.clone(),
        );
        registry.register("config_reloads", "Configuration reloads by outcome", config_reloads.clone());
        registry.register("connections_open", "Connections open now, by listener", connections_open.clone());
        registry.register(
            "connections_refused",
            "Connections closed at once because server.max_connections were open, by listener",
            connections_refused.clone(),
        );
        Metrics {
            registry,
            rendering: std::sync::Mutex::new(()),
            requests,
            rejections,
            token_expiry_seconds,
            refresh_attempts,
            refresh_failures,
            single_flight_waiters,
            replays,
            dates_rewritten,
            bodies_invalid,
            links_rewritten,
            buffers_full,
            heads_over_budget,
            config_reloads,
            connections_open,
            connections_refused,
            limit_rejections,
            upstream_429s,
            remembered_429_answers,
            retries,
            retry_budget_exhausted,
            fleet_connected,
            fleet_undecryptable,
            fleet_fallbacks,
            fleet_adopted,
            fleet_throttles_learned,
        }
    }

    /// A request refused by the local limit named `limit`.
    pub fn limit_rejected(&self, limit: &str) {
        self.limit_rejections.get_or_create(&LimitLabel { limit: limit.to_owned() }).inc();
    }

    /// A request sent again after `reason` (`connect`, `reset`, `502`...).
    pub fn retried(&self, reason: &str) {
        self.retries.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// The connection gauge and counter of one listener (`proxy` or `admin`).
    pub fn connections(&self, listener: &str) -> ConnectionCounters {
        let label = ListenerLabel { listener: listener.to_owned() };
        ConnectionCounters {
            open: self.connections_open.get_or_create(&label).clone(),
            refused: self.connections_refused.get_or_create(&label).clone(),
        }
    }

    pub fn rejected(&self, reason: &str) {
        self.rejections.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    pub fn credential(family: &Family<CredentialLabel, Counter>, credential: &str) {
        family.get_or_create(&CredentialLabel { credential: credential.to_owned() }).inc();
    }

    pub fn reason(family: &Family<ReasonLabel, Counter>, reason: &str) {
        family.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    pub fn refresh_failed(&self, credential: &str, reason: &str) {
        self.refresh_failures
            .get_or_create(&FailureLabels { credential: credential.to_owned(), reason: reason.to_owned() })
            .inc();
    }

    /// The Prometheus text exposition, with the token expiry gauges set from
    /// `expiries` (each credential's name and token expiry) as seen at `now`.
    pub fn render(&self, expiries: &[(Arc<str>, Option<Instant>)], now: Instant) -> String {
        let _one_scrape_at_a_time = self.rendering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.token_expiry_seconds.clear();
        for (credential, expires_at) in expiries {
            if let Some(expires_at) = *expires_at {
                let seconds = if expires_at >= now {
                    (expires_at - now).as_secs_f64()
                } else {
                    -(now - expires_at).as_secs_f64()
                };
                self.token_expiry_seconds
                    .get_or_create(&CredentialLabel { credential: credential.to_string() })
                    .set(seconds);
            }
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, StatusCode};
    use std::time::Duration;

    #[test]
    fn render_counts_requests_and_reads_token_expiry_at_scrape_time() {
        let metrics = Metrics::new();
        let app = metrics.requests.identity("app");
        app.request(&Method::GET, StatusCode::OK, Duration::from_millis(3));
        app.request(&Method::from_bytes(b"BREW").expect("method"), StatusCode::NOT_FOUND, Duration::ZERO);
        app.upstream(Duration::from_millis(2));
        let now = Instant::now();
        let expiries = [(Arc::from("ops"), Some(now + Duration::from_secs(100))), (Arc::from("never"), None)];
        let text = metrics.render(&expiries, now);
        assert!(
            text.contains(
                r#"tallyfy_proxy_requests_total{identity="app",method="GET",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"method="other",status_class="4xx"} 1"#), "{text}");
        assert!(
            text.contains(r#"tallyfy_proxy_request_duration_seconds_bucket{le="0.004",identity="app"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tallyfy_proxy_upstream_duration_seconds_count{identity="app"} 1"#),
            "{text}"
        );
        assert!(text.contains("tallyfy_proxy_requests_in_flight 0"), "{text}");
        assert!(text.contains(r#"tallyfy_proxy_token_expiry_seconds{credential="ops"} 100.0"#), "{text}");
        assert!(!text.contains(r#"credential="never""#), "no expiry, no gauge: {text}");
        let later = metrics.render(&expiries, now + Duration::from_secs(40));
        assert!(later.contains(r#"tallyfy_proxy_token_expiry_seconds{credential="ops"} 60.0"#), "{later}");
    }
}
