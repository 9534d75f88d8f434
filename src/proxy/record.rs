//! What the proxy records about one request when its response is over: the
//! access line ([`crate::access_log`]) and the request's metrics, exactly once,
//! and the in-flight count while it lasts.
//!
//! Line fields: method, path (never the query, which may hold personal data),
//! status, upstream status, time to the response head and to the end, bytes
//! received and sent, identity, request id (and Tallyfy's), and for failures the
//! error code and detail. Header values and bodies are never logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, StatusCode};

use super::Shared;
use crate::access_log::{self, Level, Value};
use crate::body::{Finish, Progress};
use crate::error::{ErrorClass, ProxyError};
use crate::traffic::TALLYFY_LIMIT;
use crate::traffic::in_flight::Place;

/// Status logged for a request whose caller went away before the response head.
const CLIENT_CLOSED: u16 = 499;

pub struct RequestRecord {
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
    pub request_body: Option<Arc<Progress>>,
    /// The request's place under its identity's `max_in_flight`, given back
    /// when the record is written.
    pub place: Option<Place>,
    /// How a Tallyfy 429 shaped the request: `remembered` (answered by the
    /// proxy from one), `waited` (held back until its `Retry-After`),
    /// `absorbed` (Tallyfy's 429 waited out and the request sent again).
    pub throttle: Option<&'static str>,
    /// Sends after the first (`[upstream.retry]`).
    pub retries: u32,
    error: Option<ProxyError>,
    /// Set when the response head is ready.
    head: Option<(StatusCode, Duration)>,
    /// The generation the request ran on: identity names and figures.
    generation: Arc<Shared>,
    written: bool,
}

impl Drop for RequestRecord {
    /// A request dropped before its line was written (the caller hung up while
    /// Tallyfy was still answering, or the drain grace ran out) still gets one.
    fn drop(&mut self) {
        self.write(0, false);
        self.generation.metrics.requests.in_flight().dec();
    }
}

impl Finish for RequestRecord {
    fn finish(mut self, bytes_sent: u64, complete: bool) {
        self.write(bytes_sent, complete);
    }
}

impl RequestRecord {
    /// Starts the record of `request`, counting it in flight.
    pub(super) fn start<B>(
        request: &Request<B>,
        peer: SocketAddr,
        request_id: HeaderValue,
        generation: Arc<Shared>,
    ) -> Self {
        generation.metrics.requests.in_flight().inc();
        RequestRecord {
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
            place: None,
            throttle: None,
            retries: 0,
            error: None,
            head: None,
            generation,
            written: false,
        }
    }

    /// `remembered` when the proxy answered for Tallyfy, from its last 429.
    fn answered_for_tallyfy(&self) -> Option<&'static str> {
        matches!(&self.error, Some(ProxyError::RateLimited { limit, .. }) if **limit == *TALLYFY_LIMIT)
            .then_some("remembered")
    }

    pub(super) fn failed(&mut self, error: ProxyError) {
        self.error = Some(error);
    }

    /// Notes that the response head is ready.
    pub(super) fn head_ready(&mut self, status: StatusCode) {
        self.head = Some((status, self.started.elapsed()));
    }

    /// Writes the line and records the metrics, once.
    fn write(&mut self, bytes_sent: u64, complete: bool) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        self.place = None;
        let (status, head) = match self.head {
            Some((status, head)) => (status.as_u16(), head),
            None => (CLIENT_CLOSED, self.started.elapsed()),
        };
        let (identity, figures) = self.generation.identity_figures(self.identity);
        figures.request(
            &self.method,
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            head,
        );
        let level = match self.error.as_ref().map(ProxyError::class) {
            None | Some(ErrorClass::Caller) => Level::Info,
            Some(ErrorClass::Upstream) => Level::Warn,
            Some(ErrorClass::Internal) => Level::Error,
        };
        let path = self.target.as_ref().map_or("", PathAndQuery::path);
        let upstream_request_id = self.upstream_request_id.as_ref().map(|id| id.to_str().unwrap_or("-"));
        let error_detail = self.error.as_ref().map(ToString::to_string);
        access_log::write(
            level,
            &[
                ("method", Some(Value::Bare(self.method.as_str()))),
                ("path", Some(Value::Str(path))),
                ("status", Some(Value::Int(u64::from(status)))),
                ("upstream_status", self.upstream_status.map(|s| Value::Int(u64::from(s.as_u16())))),
                ("latency_ms", Some(Value::Millis(head))),
                ("total_ms", Some(Value::Millis(self.started.elapsed()))),
                ("bytes_received", Some(Value::Int(self.request_body.as_ref().map_or(0, |a| a.bytes())))),
                ("bytes_sent", Some(Value::Int(bytes_sent))),
                ("complete", Some(Value::Bool(complete))),
                ("identity", Some(Value::Str(identity))),
                ("replayed", Some(Value::Bool(self.replayed))),
                ("retries", (self.retries > 0).then_some(Value::Int(u64::from(self.retries)))),
                ("throttle", self.throttle.or_else(|| self.answered_for_tallyfy()).map(Value::Str)),
                ("peer", Some(Value::Peer(self.peer))),
                ("request_id", Some(Value::Str(self.request_id.to_str().unwrap_or("-")))),
                ("upstream_request_id", upstream_request_id.map(Value::Str)),
                ("error_code", self.error.as_ref().map(|e| Value::Str(e.code()))),
                ("error_detail", error_detail.as_deref().map(Value::Str)),
            ],
        );
    }
}
