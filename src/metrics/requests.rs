//! The per-request metrics, cheap enough for every request: a counter by
//! identity, method and status class, two latency histograms by identity, and
//! the in-flight gauge.
//!
//! Each identity's figures are resolved once per config generation
//! ([`RequestMetrics::identity`]); a request then does a few relaxed atomic
//! adds, with no label map, allocation or lock. The atomics are sharded per
//! thread (each worker thread adds into its own cache-line-aligned shard), so two
//! cores serving the same identity do not bounce a cache line between them;
//! scrapes add the shards up. Encoded as prometheus-client families through a
//! [`Collector`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

/// The label `method` folds methods to these; anything else is `other`.
const METHODS: [&str; 8] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"];
/// `status_class`: 1xx .. 5xx.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Histogram bucket bounds in microseconds: 0.5 ms doubling to ~33 s (as before).
const BOUNDS_US: [u64; 17] = {
    let mut bounds = [0u64; 17];
    let mut i = 0;
    while i < 17 {
        bounds[i] = 500 << i;
        i += 1;
    }
    bounds
};
const BUCKETS: usize = BOUNDS_US.len() + 1;

/// How many shards each identity's figures are spread over.
fn shard_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16).next_power_of_two()
    })
}

/// This thread's shard.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|index| *index) & (shard_count() - 1)
}

/// A latency histogram's buckets (not cumulative) and sum, in one shard.
struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.iter().position(|&bound| us <= bound).unwrap_or(BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// One thread's share of an identity's figures, on its own cache lines.
#[repr(align(128))]
struct Shard {
    requests: [[AtomicU64; CLASSES.len()]; METHODS.len()],
    request: Histogram,
    upstream: Histogram,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            request: Histogram {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_us: AtomicU64::new(0),
            },
            upstream: Histogram {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_us: AtomicU64::new(0),
            },
        }
    }
}

/// The figures of one identity (or of callers no identity matched: `-`).
pub struct IdentityMetrics {
    shards: Box<[Shard]>,
}

impl IdentityMetrics {
    fn new() -> IdentityMetrics {
        IdentityMetrics { shards: (0..shard_count()).map(|_| Shard::new()).collect() }
    }

    fn shard(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    /// Records one answered request (`elapsed`: until its response head).
    pub fn request(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        let shard = self.shard();
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        shard.requests[method_index(method)][class].fetch_add(1, Ordering::Relaxed);
        shard.request.observe(elapsed);
    }

    /// Records Tallyfy's part of a request.
    pub fn upstream(&self, elapsed: Duration) {
        self.shard().upstream.observe(elapsed);
    }
}

impl std::fmt::Debug for IdentityMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityMetrics").finish_non_exhaustive()
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Requests being handled, summed over shards at scrape time.
struct InFlightShards {
    shards: Box<[InFlightShard]>,
}

#[repr(align(128))]
struct InFlightShard(AtomicI64);

/// Every identity's request figures, for the life of the process.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    /// By identity name; an identity that leaves the config keeps its series.
    identities: Mutex<BTreeMap<Arc<str>, Arc<IdentityMetrics>>>,
    in_flight: InFlight,
}

/// The in-flight gauge: +1 when a request starts, -1 when its line is written.
pub struct InFlight {
    shards: InFlightShards,
}

impl Default for InFlight {
    fn default() -> Self {
        let shards = (0..shard_count()).map(|_| InFlightShard(AtomicI64::new(0))).collect();
        InFlight { shards: InFlightShards { shards } }
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InFlight({})", self.get())
    }
}

impl InFlight {
    pub fn inc(&self) {
        self.shards.shards[shard_index()].0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.shards.shards[shard_index()].0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.shards.shards.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl RequestMetrics {
    /// The figures of the identity `name` (`-` for unknown callers), created on
    /// first use; a config generation resolves its identities once.
    pub fn identity(&self, name: &str) -> Arc<IdentityMetrics> {
        let mut identities = self.identities.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = identities.get(name) {
            return found.clone();
        }
        let created = Arc::new(IdentityMetrics::new());
        identities.insert(Arc::from(name), created.clone());
        created
    }

    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl Collector for RequestMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let identities: Vec<(Arc<str>, Arc<IdentityMetrics>)> = self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, metrics)| (name.clone(), metrics.clone()))
            .collect();
        let mut family = encoder.encode_descriptor(
            "requests",
            "Requests by identity, method and status class.",
            None,
            MetricType::Counter,
        )?;
        for (name, metrics) in &identities {
            for (m, method) in METHODS.iter().enumerate() {
                for (c, class) in CLASSES.iter().enumerate() {
                    let count: u64 =
                        metrics.shards.iter().map(|s| s.requests[m][c].load(Ordering::Relaxed)).sum();
                    if count > 0 {
                        let labels = [("identity", &**name), ("method", method), ("status_class", class)];
                        family
                            .encode_family(&labels)?
                            .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
                                &count, None,
                            )?;
                    }
                }
            }
        }
        for (metric, help, pick) in [
            (
                "request_duration_seconds",
                "Whole request latency, until the response head is sent.",
                (|s: &Shard| &s.request) as fn(&Shard) -> &Histogram,
            ),
            (
                "upstream_duration_seconds",
                "Time from sending to Tallyfy until its response head arrived.",
                |s| &s.upstream,
            ),
        ] {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Histogram)?;
            for (name, metrics) in &identities {
                let mut buckets = [0u64; BUCKETS];
                let mut sum_us = 0u64;
                for shard in metrics.shards.iter() {
                    let histogram = pick(shard);
                    for (total, bucket) in buckets.iter_mut().zip(&histogram.buckets) {
                        *total += bucket.load(Ordering::Relaxed);
                    }
                    sum_us += histogram.sum_us.load(Ordering::Relaxed);
                }
                let count: u64 = buckets.iter().sum();
                if count == 0 {
                    continue;
                }
                // Per-bucket counts: the encoder makes them cumulative.
                let bounds: Vec<(f64, u64)> =
                    BOUNDS_US.iter().map(|&us| us as f64 / 1e6).chain([f64::INFINITY]).zip(buckets).collect();
                family
                    .encode_family(&[("identity", &**name)])?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum_us as f64 / 1e6,
                        count,
                        &bounds,
                        None,
                    )?;
            }
        }
        let in_flight = ConstGauge::new(self.in_flight.get());
        let family = encoder.encode_descriptor(
            "requests_in_flight",
            "Requests being handled now.",
            None,
            in_flight.metric_type(),
        )?;
        in_flight.encode(family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_from_half_a_millisecond() {
        assert_eq!(BOUNDS_US[0], 500);
        assert_eq!(BOUNDS_US[16], 500 << 16);
        let shard = Shard::new();
        shard.request.observe(Duration::from_micros(500));
        shard.request.observe(Duration::from_micros(501));
        shard.request.observe(Duration::from_secs(3600));
        let counts: Vec<u64> = shard.request.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        assert_eq!((counts[0], counts[1], counts[BUCKETS - 1]), (1, 1, 1));
    }

    #[test]
    fn shards_add_up_across_threads() {
        let metrics = Arc::new(RequestMetrics::default());
        let app = metrics.identity("app");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let app = app.clone();
                let metrics = metrics.clone();
                scope.spawn(move || {
                    for _ in 0..1000 {
                        metrics.in_flight().inc();
                        app.request(&Method::GET, StatusCode::OK, Duration::from_millis(1));
                        metrics.in_flight().dec();
                    }
                });
            }
        });
        let total: u64 = app.shards.iter().map(|s| s.requests[0][1].load(Ordering::Relaxed)).sum();
        assert_eq!(total, 4000);
        assert_eq!(metrics.in_flight().get(), 0);
        assert!(Arc::ptr_eq(&app, &metrics.identity("app")), "one set of figures per name");
    }
}
