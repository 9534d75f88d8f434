//! The admin listener: `/livez` (the process is up, its token refresher too), `/readyz` (every credential
//! holds a valid token) and `/metrics` (Prometheus). Kept off the proxy port so probes never reach Tallyfy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::metrics::Metrics;
use arc_swap::ArcSwap;

use crate::proxy::Proxy;

#[derive(Clone)]
pub struct Admin {
    /// The config generation serving now (its token store answers readiness).
    current: Arc<ArcSwap<Proxy>>,
    metrics: Arc<Metrics>,
    /// Whether the token refresher still runs ([`crate::reload::RefresherTask::alive`]).
    refresher_alive: Arc<AtomicBool>,
}

impl Admin {
    pub fn new(
        current: Arc<ArcSwap<Proxy>>,
        metrics: Arc<Metrics>,
        refresher_alive: Arc<AtomicBool>,
    ) -> Self {
        Admin { current, metrics, refresher_alive }
    }

    pub fn handle<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error":{"code":"method_not_allowed","message":"use GET"}}),
            );
        }
        match request.uri().path() {
            "/livez" if self.refresher_alive.load(Ordering::Relaxed) => {
                reply(StatusCode::OK, json!({"status":"live"}))
            }
            "/livez" => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status":"not_live","reason":"the token refresher stopped"}),
            ),
            "/metrics" => {
                let text = self.metrics.render(&self.current.load().tokens().expiries(), Instant::now());
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                response
            }
            "/readyz" => {
                let proxy = self.current.load();
                let waiting: Vec<String> =
                    proxy.tokens().not_ready(Instant::now()).iter().map(|name| name.to_string()).collect();
                if waiting.is_empty() {
                    reply(StatusCode::OK, json!({"status":"ready"}))
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status":"not_ready","reason":"no valid token yet","credentials":waiting}),
                    )
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({"error":{"code":"not_found","message":"admin serves /livez, /readyz and /metrics"}}),
            ),
        }
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
