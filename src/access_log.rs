//! One structured log line per request, written when its response body has
//! been sent (or the caller went away), so it can tell the bytes moved; and the
//! request's metrics, recorded at the same moment, exactly once.
//!
//! Fields: method, path (never the query, which may hold personal data), status,
//! upstream status, time to the response head and to the end, bytes received and
//! sent, identity, request id, and for failures the error code and detail.
//! Header values and bodies are never logged.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::{ErrorClass, ProxyError};
use crate::metrics::Metrics;
use crate::upload::Activity;

pub struct AccessLog {
    started: Instant,
    method: Method,
    path: String,
    peer: SocketAddr,
    request_id: HeaderValue,
    /// Tallyfy's own `X-Request-Id`, when it sent one.
    pub upstream_request_id: Option<HeaderValue>,
    pub identity: Option<String>,
    pub upstream_status: Option<StatusCode>,
    /// The request was sent a second time with a refreshed token.
    pub replayed: bool,
    /// Counts the request body bytes sent upstream.
    pub request_body: Option<Arc<Activity>>,
    error: Option<ProxyError>,
    /// Set when the response head is ready.
    head: Option<(StatusCode, Duration)>,
    metrics: Arc<Metrics>,
    /// Counts the request in flight until its line is written and it is dropped.
    _in_flight: InFlight,
    written: bool,
}

/// Status logged for a request whose caller went away before the response head.
const CLIENT_CLOSED: u16 = 499;

struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Drop for AccessLog {
    /// A request dropped before its line was written (the caller hung up while
    /// Tallyfy was still answering, or the drain grace ran out) still gets one.
    fn drop(&mut self) {
        self.write(0, false);
    }
}

impl AccessLog {
    pub fn start<B>(
        request: &Request<B>,
        peer: SocketAddr,
        request_id: HeaderValue,
        metrics: &Arc<Metrics>,
    ) -> Self {
        metrics.in_flight.inc();
        AccessLog {
            _in_flight: InFlight(metrics.in_flight.clone()),
            metrics: metrics.clone(),
            written: false,
            started: Instant::now(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            peer,
            request_id,
            upstream_request_id: None,
            identity: None,
            upstream_status: None,
            replayed: false,
            request_body: None,
            error: None,
            head: None,
        }
    }

    /// The request's id (see [`crate::request_id`]).
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    pub fn failed(&mut self, error: ProxyError) {
        self.error = Some(error);
    }

    /// Notes the response head; the line is written when `body` finishes (at
    /// once for a body that is already complete: hyper never polls those).
    pub fn wrap<B: Body>(mut self, status: StatusCode, body: B) -> Logged<B> {
        self.head = Some((status, self.started.elapsed()));
        if body.is_end_stream() {
            self.write(0, true);
        }
        Logged { inner: body, log: Some(self), bytes_sent: 0 }
    }

    /// Writes the line and records the metrics, once.
    fn write(&mut self, bytes_sent: u64, complete: bool) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let (status, head) = match self.head {
            Some((status, head)) => (status.as_u16(), head),
            None => (CLIENT_CLOSED, self.started.elapsed()),
        };
        self.metrics.request(
            self.identity.as_deref(),
            &self.method,
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            head,
        );
        let latency_ms = head.as_micros() as f64 / 1000.0;
        let total_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let upstream_status = self.upstream_status.map(|s| s.as_u16());
        let identity = self.identity.as_deref().unwrap_or("-");
        let bytes_received = self.request_body.as_ref().map_or(0, |a| a.bytes());
        let replayed = self.replayed;
        let error_code = self.error.as_ref().map(ProxyError::code);
        let error_detail = self.error.as_ref().map(ToString::to_string);
        // Values are passed as strings, which both formats quote and escape: a
        // caller cannot forge fields with a crafted id or path.
        let request_id = self.request_id.to_str().unwrap_or("-");
        let upstream_request_id = self.upstream_request_id.as_ref().map(|id| id.to_str().unwrap_or("-"));
        let method = self.method.as_str();
        let path = self.path.as_str();
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "tallyfy_proxy::access",
                    method,
                    path,
                    status,
                    upstream_status,
                    latency_ms,
                    total_ms,
                    bytes_received,
                    bytes_sent,
                    complete,
                    identity,
                    replayed,
                    peer = %self.peer,
                    request_id,
                    upstream_request_id,
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

pin_project! {
    /// A response body that counts what it sends and writes the request's access
    /// line when it ends, or when it is dropped early (the caller hung up:
    /// `complete=false`).
    pub struct Logged<B> {
        #[pin]
        inner: B,
        log: Option<AccessLog>,
        bytes_sent: u64,
    }

    impl<B> PinnedDrop for Logged<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut log) = this.log.take() {
                log.write(*this.bytes_sent, false);
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes_sent += data.len() as u64;
                }
                // hyper stops polling a body that says it has ended (its
                // Content-Length is reached), so this is the end too.
                if this.inner.is_end_stream()
                    && let Some(log) = this.log.as_mut()
                {
                    log.write(*this.bytes_sent, true);
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.as_mut() {
                    log.write(*this.bytes_sent, true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
