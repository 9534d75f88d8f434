//! What a connection is doing: requests in flight and requests started, so an
//! idle connection can be closed; responses being sent and the frames they
//! gave, so one that stalls can be cut; and the service wrapper that keeps
//! count.
//!
//! The count ends when the response body is dropped (sent, or abandoned), not
//! when the handler returns: a long download is a connection at work, as long
//! as it moves.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::head_tap::{Framing, HeadTap, RequestLine};
use crate::framing::AmbiguousLength;

/// How many quiet checks in a row make a connection idle.
const QUIET_CHECKS: u32 = 4;

#[derive(Debug, Default)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// Bumped when a request starts and when it ends.
    events: AtomicU64,
    /// Responses whose head is out and whose body is not done.
    sending: AtomicUsize,
    /// Bumped for every frame a response body gives.
    frames: AtomicU64,
}

impl Activity {
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves once responses have been waiting to be sent, and none of them
    /// gave a frame, for `timeout` (checked every quarter of it, like
    /// [`Activity::idle_for`]): the caller takes nothing (a full socket buffer,
    /// an HTTP/2 window it never opens) or Tallyfy sends nothing more. Like
    /// nginx's `send_timeout` on HTTP/1. On HTTP/2 it watches the connection
    /// as a whole: it is cut when none of its responses moves, so a peer that
    /// keeps one stream moving keeps its stalled ones (at most the connection's
    /// concurrent streams); a watch per stream would need a timer per response.
    pub async fn stalled_for(&self, timeout: Duration) {
        let step = (timeout / QUIET_CHECKS).max(Duration::from_millis(1));
        let mut seen = self.frames.load(Ordering::Relaxed);
        let mut stalled = 0;
        loop {
            tokio::time::sleep(step).await;
            let frames = self.frames.load(Ordering::Relaxed);
            if frames == seen && self.sending.load(Ordering::Relaxed) > 0 {
                stalled += 1;
                if stalled >= QUIET_CHECKS {
                    return;
                }
            } else {
                seen = frames;
                stalled = 0;
            }
        }
    }

    /// Resolves once no request has been in flight, and none has started or
    /// ended, for `timeout` (checked every quarter of it, so no clock is read per
    /// request: it resolves between one and one and a quarter timeouts after the
    /// last request ended). The idle timeout, and on HTTP/1 the head deadline:
    /// no head completed within `timeout` of the last response's end.
    pub async fn idle_for(&self, timeout: Duration) {
        let step = (timeout / QUIET_CHECKS).max(Duration::from_millis(1));
        let mut seen = self.events.load(Ordering::Relaxed);
        let mut quiet = 0;
        loop {
            tokio::time::sleep(step).await;
            let events = self.events.load(Ordering::Relaxed);
            if events == seen && self.in_flight.load(Ordering::Relaxed) == 0 {
                quiet += 1;
                if quiet >= QUIET_CHECKS {
                    return;
                }
            } else {
                seen = events;
                quiet = 0;
            }
        }
    }
}

/// Ends a request's count (and re-arms the head tap) when dropped.
struct InFlight {
    activity: Arc<Activity>,
    tap: Option<Arc<HeadTap>>,
    /// Its response's head is out: it counts among those being sent.
    sending: bool,
}

impl InFlight {
    fn sending(&mut self) {
        self.sending = true;
        self.activity.sending.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.sending {
            self.activity.sending.fetch_sub(1, Ordering::Relaxed);
        }
        self.activity.end();
        if let Some(tap) = &self.tap {
            tap.resume();
        }
    }
}

/// The per-connection service: counts requests, and on HTTP/1 checks each
/// chunked request's head for a `Content-Length` hyper removed. Called by
/// reference (hyper's own service trait), so nothing is cloned per request.
pub(super) struct Counted<S> {
    handler: S,
    activity: Arc<Activity>,
    tap: Option<Arc<HeadTap>>,
}

impl<S> Counted<S> {
    pub fn new(handler: S, activity: Arc<Activity>, tap: Option<Arc<HeadTap>>) -> Self {
        Counted { handler, activity, tap }
    }
}

impl<S, F, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: Fn(Request<Incoming>) -> F,
    F: Future<Output = Response<B>>,
{
    type Response = Response<Guarded<B>>;
    type Error = Infallible;
    type Future = CountedFuture<Pin<Box<F>>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        self.activity.begin();
        let mut close = false;
        if let Some(tap) = &self.tap {
            // A chunked request whose head is not where the tap's count puts it
            // (it was pipelined behind another, or its target was normalised)
            // cannot be shown to be free of a Content-Length: it is refused too.
            // And its connection ends with its response: the tap does not read
            // chunks, so it could not count where the next head starts.
            let framing = framing(&request);
            close = framing == Framing::Chunked;
            let target = request_target(&request);
            let line =
                RequestLine { method: request.method().as_str().as_bytes(), target: target.as_bytes() };
            if tap.finish_head(line, framing) {
                request.extensions_mut().insert(AmbiguousLength);
            }
        }
        let in_flight = InFlight { activity: self.activity.clone(), tap: self.tap.clone(), sending: false };
        // Boxed per request: hyper keeps a slot for the service's future on every
        // connection, and an idle one should not hold room for a whole request.
        CountedFuture { inner: Box::pin((self.handler)(request)), in_flight: Some(in_flight), close }
    }
}

/// How hyper framed the request's body (it accepts no coding but `chunked`,
/// and drops a `Content-Length` beside it).
fn framing<B>(request: &Request<B>) -> Framing {
    if request.headers().contains_key(TRANSFER_ENCODING) {
        return Framing::Chunked;
    }
    match request.headers().get(CONTENT_LENGTH) {
        // hyper checked it; one that did not read as a number counts as a body
        // the handler may have left unread.
        Some(length) => Framing::Length(
            std::str::from_utf8(length.as_bytes())
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(u64::MAX),
        ),
        None => Framing::Empty,
    }
}

/// The request target as the head wrote it, for the tap: an origin-form
/// target as it came (no copy), any other as the URI spells it (a target hyper
/// normalised then matches no head, and a chunked request is refused).
fn request_target<B>(request: &Request<B>) -> Cow<'_, str> {
    match request.uri().path_and_query() {
        Some(target) if request.uri().authority().is_none() => Cow::Borrowed(target.as_str()),
        _ => Cow::Owned(request.uri().to_string()),
    }
}

pin_project! {
    pub(super) struct CountedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        // The response closes the connection (`Connection: close`).
        close: bool,
    }
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Response<B>>,
{
    type Output = Result<Response<Guarded<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx));
        if *this.close {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let mut in_flight = this.in_flight.take();
        if let Some(in_flight) = &mut in_flight {
            in_flight.sending();
        }
        Poll::Ready(Ok(response.map(|inner| Guarded { inner, in_flight })))
    }
}

pin_project! {
    /// A response body that holds its request's count until it is dropped,
    /// and counts the frames it gives.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let (Poll::Ready(Some(_)), Some(in_flight)) = (&frame, this.in_flight.as_ref()) {
            in_flight.activity.frames.fetch_add(1, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_its_timeout_without_requests() {
        let activity = Arc::new(Activity::default());
        let began = tokio::time::Instant::now();
        activity.idle_for(Duration::from_secs(60)).await;
        let waited = began.elapsed();
        assert!(waited >= Duration::from_secs(60) && waited <= Duration::from_secs(75), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_it_open() {
        let activity = Arc::new(Activity::default());
        activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(60)).await }
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!idle.is_finished(), "a ten-minute download is not idleness");
        activity.end();
        let ended = tokio::time::Instant::now();
        idle.await.expect("idle task");
        assert!(ended.elapsed() >= Duration::from_secs(60) && ended.elapsed() <= Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_stops_moving_is_a_stall_and_one_that_moves_is_not() {
        let activity = Arc::new(Activity::default());
        let stalled = tokio::spawn({
            let activity = activity.clone();
            async move { activity.stalled_for(Duration::from_secs(60)).await }
        });
        // A request waiting for Tallyfy, with no response out yet, is no stall.
        activity.begin();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!stalled.is_finished(), "waiting for the response head is not a stall");
        // A download that moves every 10 s for ten minutes is no stall either.
        activity.sending.fetch_add(1, Ordering::Relaxed);
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            activity.frames.fetch_add(1, Ordering::Relaxed);
        }
        assert!(!stalled.is_finished(), "a slow download moves");
        // Then nothing more is taken.
        let stopped = tokio::time::Instant::now();
        stalled.await.expect("stall task");
        let waited = stopped.elapsed();
        assert!(waited >= Duration::from_secs(60) && waited <= Duration::from_secs(75), "{waited:?}");
    }
}
