//! One structured log line per request, written when its response head is ready.
//!
//! Fields: method, path (never the query, which may hold personal data), status,
//! upstream status, latency, identity, and for failures the error code and detail.
//! Header values and bodies are never logged.

use std::net::SocketAddr;
use std::time::Instant;

use http::{Method, Request, StatusCode};

use crate::error::{ErrorClass, ProxyError};
use crate::headers::X_REQUEST_ID;

pub struct AccessLog<'a> {
    started: Instant,
    method: Method,
    path: String,
    peer: SocketAddr,
    request_id: String,
    pub identity: Option<&'a str>,
    pub upstream_status: Option<StatusCode>,
    /// The request was sent a second time with a refreshed token.
    pub replayed: bool,
    error: Option<ProxyError>,
}

impl<'a> AccessLog<'a> {
    pub fn start<B>(request: &Request<B>, peer: SocketAddr) -> Self {
        AccessLog {
            started: Instant::now(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            peer,
            request_id: request
                .headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .chars()
                .take(128)
                .collect(),
            identity: None,
            upstream_status: None,
            replayed: false,
            error: None,
        }
    }

    /// The request's `X-Request-Id` (set by the server layer when the caller sent none).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn failed(&mut self, error: ProxyError) {
        self.error = Some(error);
    }

    pub fn finish(self, status: StatusCode) {
        let latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let upstream_status = self.upstream_status.map(|s| s.as_u16());
        let identity = self.identity.unwrap_or("-");
        let replayed = self.replayed;
        let error_code = self.error.as_ref().map(ProxyError::code);
        let error_detail = self.error.as_ref().map(ToString::to_string);
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "tallyfy_proxy::access",
                    method = %self.method,
                    path = %self.path,
                    status = status.as_u16(),
                    upstream_status,
                    latency_ms,
                    identity,
                    replayed,
                    peer = %self.peer,
                    request_id = %self.request_id,
                    error_code,
                    error_detail,
                    "request"
                )
            };
        }
        match self.error.as_ref().map(ProxyError::class) {
            None | Some(ErrorClass::Caller) => line!(info),
            Some(ErrorClass::Upstream) => line!(warn),
            Some(ErrorClass::Internal) => line!(error),
        }
    }
}
