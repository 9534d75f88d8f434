//! One access line per request, written when its response body has been sent
//! (or the caller went away), so it can tell the bytes moved; and the request's
//! metrics, recorded at the same moment, exactly once.
//!
//! Fields: method, path (never the query, which may hold personal data), status,
//! upstream status, time to the response head and to the end, bytes received and
//! sent, identity, request id (and Tallyfy's), and for failures the error code
//! and detail. Header values and bodies are never logged.
//!
//! Lines are formatted by hand ([`line`]) and written in batches ([`sink`]);
//! whether they are written at all follows the tracing filter (`[log] level`,
//! `RUST_LOG`) for the target `tallyfy_proxy::access`.

pub mod line;
pub mod sink;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::{ErrorClass, ProxyError};
use crate::metrics::IdentityMetrics;
use crate::upload::Activity;
use line::{Format, Value};

pub use sink::{capture, discard, flush_thread};

/// Status logged for a request whose caller went away before the response head.
const CLIENT_CLOSED: u16 = 499;

/// The line format, set once by [`crate::telemetry::init`] (text until then).
static FORMAT: AtomicU8 = AtomicU8::new(0);

/// Chooses text or JSON lines.
pub fn set_format(json: bool) {
    FORMAT.store(u8::from(json), Ordering::Relaxed);
}

/// What a finished request's line and metrics need from the config generation
/// it ran on: the identity's name and figures.
pub trait Recorder: Send + Sync + 'static {
    /// The identity at `index`, or the unidentified caller (`None`): name and figures.
    fn identity(&self, index: Option<usize>) -> (&str, &IdentityMetrics);
    /// The in-flight gauge's decrement.
    fn finished(&self);
}

pub struct AccessLog {
    started: Instant,
    method: Method,
    target: Option<PathAndQuery>,
    peer: SocketAddr,
    request_id: HeaderValue,
    /// Tallyfy's own `X-Request-Id`, when it sent one.
    pub upstream_request_id: Option<HeaderValue>,
    /// Which identity of the generation the caller is.
    pub identity: Option<usize>,
    pub upstream_status: Option<StatusCode>,
    /// The request was sent a second time with a refreshed token.
    pub replayed: bool,
    /// Counts the request body bytes sent upstream.
    pub request_body: Option<Arc<Activity>>,
    error: Option<ProxyError>,
    /// Set when the response head is ready.
    head: Option<(StatusCode, Duration)>,
    recorder: Arc<dyn Recorder>,
    written: bool,
}

impl Drop for AccessLog {
    /// A request dropped before its line was written (the caller hung up while
    /// Tallyfy was still answering, or the drain grace ran out) still gets one.
    fn drop(&mut self) {
        self.write(0, false);
        self.recorder.finished();
    }
}

impl AccessLog {
    /// Starts the record of `request` (the caller already counted it in flight).
    pub fn start<B>(
        request: &Request<B>,
        peer: SocketAddr,
        request_id: HeaderValue,
        recorder: Arc<dyn Recorder>,
    ) -> Self {
        AccessLog {
            started: Instant::now(),
            method: request.method().clone(),
            target: request.uri().path_and_query().cloned(),
            peer,
            request_id,
            upstream_request_id: None,
            identity: None,
            upstream_status: None,
            replayed: false,
            request_body: None,
            error: None,
            head: None,
            recorder,
            written: false,
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
        let (identity, metrics) = self.recorder.identity(self.identity);
        metrics.request(
            &self.method,
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            head,
        );
        let level = match self.error.as_ref().map(ProxyError::class) {
            None | Some(ErrorClass::Caller) => {
                if !tracing::enabled!(target: "tallyfy_proxy::access", tracing::Level::INFO) {
                    return;
                }
                "INFO"
            }
            Some(ErrorClass::Upstream) => {
                if !tracing::enabled!(target: "tallyfy_proxy::access", tracing::Level::WARN) {
                    return;
                }
                "WARN"
            }
            Some(ErrorClass::Internal) => {
                if !tracing::enabled!(target: "tallyfy_proxy::access", tracing::Level::ERROR) {
                    return;
                }
                "ERROR"
            }
        };
        let total = self.started.elapsed();
        let path = self.target.as_ref().map_or("", PathAndQuery::path);
        let request_id = self.request_id.to_str().unwrap_or("-");
        let upstream_request_id = self.upstream_request_id.as_ref().map(|id| id.to_str().unwrap_or("-"));
        let bytes_received = self.request_body.as_ref().map_or(0, |a| a.bytes());
        let error_detail = self.error.as_ref().map(ToString::to_string);
        let format = if FORMAT.load(Ordering::Relaxed) == 1 { Format::Json } else { Format::Text };
        let method = self.method.as_str();
        let fields = [
            ("method", Some(Value::Plain(&method))),
            ("path", Some(Value::Str(path))),
            ("status", Some(Value::Int(u64::from(status)))),
            ("upstream_status", self.upstream_status.map(|s| Value::Int(u64::from(s.as_u16())))),
            ("latency_ms", Some(Value::Millis(head))),
            ("total_ms", Some(Value::Millis(total))),
            ("bytes_received", Some(Value::Int(bytes_received))),
            ("bytes_sent", Some(Value::Int(bytes_sent))),
            ("complete", Some(Value::Bool(complete))),
            ("identity", Some(Value::Str(identity))),
            ("replayed", Some(Value::Bool(self.replayed))),
            ("peer", Some(Value::Plain(&self.peer))),
            ("request_id", Some(Value::Str(request_id))),
            ("upstream_request_id", upstream_request_id.map(Value::Str)),
            ("error_code", self.error.as_ref().map(|e| Value::Str(e.code()))),
            ("error_detail", error_detail.as_deref().map(Value::Str)),
        ];
        sink::emit(|out| line::write(out, format, level, &fields));
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
