//! The local limits on the hot path: one identity with a token bucket and 100
//! `[[limits]]` rules, as `Proxy::prepare` runs them for every request.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use tallyfy_proxy::policy::PathPattern;
use tallyfy_proxy::traffic::clock;
use tallyfy_proxy::traffic::{IdentityLimits, Rate, RuleSettings, Settings, TrafficState};
use tokio::time::Instant;

const ORG: &str = "3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5";

/// 100 rules, half for GET and half for POST, each on its own route.
fn rules() -> Vec<RuleSettings> {
    (0..100)
        .map(|i| RuleSettings {
            name: format!("rule-{i}"),
            methods: Some(vec![if i % 2 == 0 { Method::GET } else { Method::POST }]),
            path: PathPattern::parse(&format!("/api/organizations/{{org}}/things-{i}")).expect("pattern"),
            max: u32::MAX,
            per: Duration::from_secs(3600),
        })
        .collect()
}

fn limits(c: &mut Criterion) {
    let state = TrafficState::new();
    // A bucket that never runs dry, so every iteration does the whole check.
    let rate = Rate { per_second: 1_000_000, burst: 1_000_000_000 };
    let identity = IdentityLimits { rate: Some(rate), max_in_flight: None };
    let settings = Settings { rules: rules(), ..Settings::default() };
    let traffic = state.generation(&settings, &[("billing", identity)], &[("ops", Some("ops"))]);
    let untouched = format!("/api/organizations/{ORG}/runs");
    let counted = format!("/api/organizations/{ORG}/things-42");

    let mut group = c.benchmark_group("traffic");
    group.bench_function("admit/bucket_and_100_rules_none_matching", |b| {
        b.iter(|| {
            let now = clock::nanos(Instant::now());
            black_box(traffic.admit(0, 0, &Method::GET, black_box(&untouched), now)).expect("admitted");
        })
    });
    group.bench_function("admit/bucket_and_100_rules_one_counting", |b| {
        b.iter(|| {
            let now = clock::nanos(Instant::now());
            black_box(traffic.admit(0, 0, &Method::GET, black_box(&counted), now)).expect("admitted");
        })
    });
    let plain = state.generation(
        &Settings::default(),
        &[("app", IdentityLimits::default())],
        &[("ops", Some("ops"))],
    );
    group.bench_function("admit/no_limits", |b| {
        b.iter(|| {
            let now = clock::nanos(Instant::now());
            black_box(plain.admit(0, 0, &Method::GET, black_box(&untouched), now)).expect("admitted");
        })
    });
    group.finish();
}

criterion_group!(benches, limits);
criterion_main!(benches);
