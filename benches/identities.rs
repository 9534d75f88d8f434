//! Identity matching and token loads on the hot path.
//!
//! - `identify_and_lease/api_keys/N`: the caller's API key is the last of N
//!   configured keys; one SHA-256, one map lookup, one snapshot load.
//! - `identify_and_lease/source_rules_scanned/N`: N address rules that do not
//!   match stand before the caller's key rule (the slow, scanning case).
//! - `lease/quiet` and `lease/while_swapping`: the token load alone, and while
//!   another thread publishes new snapshots as fast as it can.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use tallyfy_proxy::config::Identity;
use tallyfy_proxy::identity::{Caller, Identities, Matcher, sha256};
use tallyfy_proxy::policy::Policy;
use tallyfy_proxy::secret::Secret;
use tallyfy_proxy::tokens::{CredentialId, CredentialTokens, SlotId, Token, TokenStore};
use tokio::time::Instant;

fn key_rule(i: usize) -> Identity {
    Identity {
        name: format!("app-{i}"),
        credential: CredentialId::new(0),
        matcher: Matcher::ApiKey { sha256: sha256(format!("key-{i}").as_bytes()) },
        policy: Policy::default(),
        dates: None,
        limits: Default::default(),
    }
}

fn source_rule(i: usize) -> Identity {
    Identity {
        name: format!("net-{i}"),
        credential: CredentialId::new(0),
        matcher: Matcher::Source {
            networks: vec![format!("10.{}.{}.0/24", i / 256, i % 256).parse().expect("cidr")],
        },
        policy: Policy::default(),
        dates: None,
        limits: Default::default(),
    }
}

/// One credential, `ops`, with a personal token: what a generation's identities read.
fn tokens() -> CredentialTokens {
    let store = TokenStore::new();
    let slot: SlotId = store.add_slot("ops");
    store.publish(slot, Token::bearer(&Secret::new("tallyfy-token"), None).expect("token"));
    CredentialTokens::new(store, vec![slot], vec![false])
}

fn identify_and_lease(c: &mut Criterion) {
    let tokens = tokens();
    let peer = "127.0.0.1:40000".parse().expect("addr");
    let mut group = c.benchmark_group("identify_and_lease");
    for n in [1usize, 100, 10_000] {
        let identities = Identities::new((0..n).map(key_rule).collect());
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_str(&format!("key-{}", n - 1)).expect("value"));
        group.bench_with_input(BenchmarkId::new("api_keys", n), &n, |b, _| {
            b.iter(|| {
                let caller = Caller { headers: &headers, peer, cert_names: &[] };
                let identity = identities.identify(&caller).expect("matches");
                tokens.lease(identity.credential, Instant::now()).expect("token")
            })
        });
    }
    for n in [1usize, 100] {
        let mut rules: Vec<Identity> = (0..n).map(source_rule).collect();
        rules.push(key_rule(0));
        let identities = Identities::new(rules);
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("key-0"));
        group.bench_with_input(BenchmarkId::new("source_rules_scanned", n), &n, |b, _| {
            b.iter(|| {
                let caller = Caller { headers: &headers, peer, cert_names: &[] };
                let identity = identities.identify(&caller).expect("matches");
                tokens.lease(identity.credential, Instant::now()).expect("token")
            })
        });
    }
    group.finish();
}

fn lease(c: &mut Criterion) {
    let tokens = tokens();
    let id = CredentialId::new(0);
    let (store, slot) = (tokens.store().clone(), tokens.slot(id));
    let mut group = c.benchmark_group("lease");
    group.bench_function("quiet", |b| b.iter(|| tokens.lease(id, Instant::now()).expect("token")));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let token = Token::bearer(&Secret::new("rotated-token"), None).expect("token");
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                store.publish(slot, token.clone());
                swaps += 1;
            }
            swaps
        }
    });
    group.bench_function("while_swapping", |b| b.iter(|| tokens.lease(id, Instant::now()).expect("token")));
    stop.store(true, Ordering::Relaxed);
    let swaps = writer.join().expect("writer thread");
    eprintln!("lease/while_swapping: the writer published {swaps} snapshots meanwhile");
    group.finish();
}

criterion_group!(benches, identify_and_lease, lease);
criterion_main!(benches);
