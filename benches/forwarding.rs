//! The hot forwarding path.
//!
//! - `prepare`: everything the proxy decides about a request without I/O: target
//!   check, limits, identity match, token load, URI and header rewrite.
//! - `round_trip`: a full request through the proxy to a loopback upstream and
//!   back, over pooled keep-alive connections, beside the same request sent to
//!   the upstream directly (the difference is the proxy's cost);
//!   `through_proxy_logged` is the production set-up: the log subscriber
//!   installed at `info` (writing to a sink), access lines formatted, metrics on.
//!
//! The binary's allocator too (mimalloc, default feature), so these see what
//! production pays.

#[allow(dead_code)] // the bench uses a few of the test builder's pieces
#[path = "../tests/support/config.rs"]
mod config;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use config::{Credential, Identity, Match, Secret, TestConfig};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tallyfy_proxy::app::{self, Listeners};
use tallyfy_proxy::config::{Config, LogFormat};
use tallyfy_proxy::metrics::Metrics;
use tallyfy_proxy::proxy::Proxy;
use tallyfy_proxy::reload::{self, Clients};
use tallyfy_proxy::server::ConnectionInfo;
use tallyfy_proxy::tokens::TokenStore;
use tallyfy_proxy::tokens::refresh::Refresher;
use tallyfy_proxy::traffic::TrafficState;
use tokio::net::TcpListener;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn config(base_url: &str) -> Config {
    let text = TestConfig::new(base_url)
        .credential(Credential::personal("ops", Secret::Env("T")))
        .identity(Identity::new("app", "ops", Match::Any))
        .text();
    Config::parse(&text, Path::new("bench.toml"), &|_| {
        Some("a-personal-access-token-of-typical-length-0123456789".to_owned())
    })
    .expect("bench config is valid")
}

fn typical_request() -> Request<()> {
    Request::builder()
        .method("GET")
        .uri("/api/organizations/3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5/me/tasks?status=active&per_page=50&deadline_before=2025-06-30")
        .header("host", "127.0.0.1:8080")
        .header("authorization", "Bearer legacy-app-key-0123456789")
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .header("user-agent", "LegacyApp/1.0")
        .header("x-tallyfy-client", "TallyfySDK")
        .header("accept-encoding", "gzip, deflate")
        .header("connection", "keep-alive")
        .body(())
        .expect("valid request")
}

fn prepare(c: &mut Criterion) {
    // The upstream client and the token issuer are built inside a runtime.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _entered = runtime.enter();
    let config = config("https://go.tallyfy.com");
    let metrics = Arc::new(Metrics::new());
    // Configuring the refresher publishes the static personal token; it is not run.
    let (mut refresher, handle) = Refresher::new(TokenStore::new(), metrics.clone());
    let Clients { upstream, issuer } = reload::clients(&config).expect("upstream and issuer");
    let tokens = refresher.configure(&reload::credential_set(&config), issuer).expect("credentials");
    let principals = reload::credential_set(&config).principals();
    let traffic = reload::traffic(&config, &principals, &TrafficState::new());
    let proxy = Proxy::new(reload::proxy_settings(&config), upstream, tokens, handle, metrics, traffic);
    let peer = ConnectionInfo {
        peer: "127.0.0.1:40000".parse().expect("addr"),
        local: "127.0.0.1:8080".parse().expect("addr"),
        cert_names: Arc::from([]),
    };
    c.bench_function("prepare/typical_get", |b| {
        b.iter_batched(
            || typical_request().into_parts().0,
            |mut head| {
                proxy.prepare(&mut head, &peer).expect("prepared");
                head
            },
            BatchSize::SmallInput,
        )
    });
}

/// A minimal upstream: answers every request with a small JSON body.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(br#"{"data":{"id":1}}"#))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (proxy_addr, upstream_addr, _running) = runtime.block_on(async {
        let upstream_addr = upstream().await;
        let config = config(&format!("http://{upstream_addr}"));
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        };
        let running = app::start(&config, listeners).await.expect("proxy starts");
        running.ready().await;
        (running.proxy_addr(), upstream_addr, running)
    });
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let get = |addr: SocketAddr| {
        let client = client.clone();
        async move {
            let request = Request::get(format!("http://{addr}/api/me")).body(Empty::new()).expect("request");
            let response = client.request(request).await.expect("response");
            assert!(response.status().is_success());
            response.into_body().collect().await.expect("body").to_bytes()
        }
    };
    let mut group = c.benchmark_group("round_trip");
    group.bench_function("through_proxy", |b| b.to_async(&runtime).iter(|| get(proxy_addr)));
    group.bench_function("direct_to_upstream", |b| b.to_async(&runtime).iter(|| get(upstream_addr)));
    // The subscriber is global: installed last, for the last variant only.
    tallyfy_proxy::telemetry::init_with(LogFormat::Text, "info", std::io::sink);
    tallyfy_proxy::access_log::discard();
    group.bench_function("through_proxy_logged", |b| b.to_async(&runtime).iter(|| get(proxy_addr)));
    group.finish();
}

criterion_group!(benches, prepare, round_trip);
criterion_main!(benches);
