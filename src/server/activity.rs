//! What a connection is doing: requests in flight and requests started, so an
//! idle connection can be closed; responses being sent and the frames they
//! gave, so one that stalls can be cut; and the service wrapper that keeps
//! count, and hands the handler a [`CallerBody`] (on HTTP/2, its future's and
//! its response body's polls are watched to confirm the body's end).
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
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::caller_body::{CallerBody, EndWatch, StreamEnd};
use super::head_tap::{Framing, HeadTap, RequestLine};
use crate::framing::AmbiguousLength;

/// How many quiet checks in a row make a connection idle.
const QUIET_CHECKS: u32 = 4;

/// Ticks of the stall watch (a quarter of the send timeout each) a response may
/// go without giving a frame: found stalled between one and one and a quarter
/// send timeouts after its last frame.
const STALE_TICKS: u64 = QUIET_CHECKS as u64 + 1;
/// Buckets of responses by the tick of their last frame: enough that a
/// stalled response is found before its bucket comes round again.
const RING: usize = 8;

#[derive(Debug, Default)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// Bumped when a request starts and when it ends.
    events: AtomicU64,
    /// The stall watch's clock, bumped by [`Activity::stalled_for`].
    tick: AtomicU64,
    /// Responses whose head is out and whose body is not done, counted by the
    /// tick of their last frame (modulo [`RING`]).
    last_moved: [AtomicUsize; RING],
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

    /// Resolves once any response whose head is out has given no frame for
    /// `timeout` (between one and one and a quarter of it: the watch ticks every
    /// quarter, and each response notes the tick of its last frame, so no clock
    /// is read per frame): the caller takes nothing (a full socket buffer, an
    /// HTTP/2 window it never opens for that stream) or Tallyfy sends nothing
    /// more. Like nginx's `send_timeout`; on HTTP/2 one stalled stream is enough,
    /// however busy its siblings, so a peer cannot keep stalled streams (each
    /// holding an upstream connection) by moving another.
    pub async fn stalled_for(&self, timeout: Duration) {
        let step = (timeout / QUIET_CHECKS).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(step).await;
            let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
            // A response last moved STALE_TICKS ago or earlier (those earlier were
            // found at their own STALE_TICKS, before their bucket came round).
            let stale = (STALE_TICKS..RING as u64)
                .filter(|&age| age <= now)
                .any(|age| self.last_moved[bucket(now - age)].load(Ordering::Relaxed) > 0);
            if stale {
                return;
            }
        }
    }

    /// A response's head is out: it counts as moved now. Returns the tick noted.
    fn sending(&self) -> u64 {
        let now = self.tick.load(Ordering::Relaxed);
        self.last_moved[bucket(now)].fetch_add(1, Ordering::Relaxed);
        now
    }

    /// A response gave a frame: moves its count from the tick noted to now's
    /// (two atomic additions at most once per tick, one load otherwise).
    fn moved(&self, noted: &mut u64) {
        let now = self.tick.load(Ordering::Relaxed);
        if now != *noted {
            self.last_moved[bucket(*noted)].fetch_sub(1, Ordering::Relaxed);
            self.last_moved[bucket(now)].fetch_add(1, Ordering::Relaxed);
            *noted = now;
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

fn bucket(tick: u64) -> usize {
    (tick % RING as u64) as usize
}

/// Ends a request's count (and re-arms the head tap) when dropped.
struct InFlight {
    activity: Arc<Activity>,
    tap: Option<Arc<HeadTap>>,
    /// Its response's head is out: the stall watch's tick of its last frame.
    moved: Option<u64>,
}

impl InFlight {
    fn sending(&mut self) {
        self.moved = Some(self.activity.sending());
    }

    fn moved(&mut self) {
        if let Some(noted) = &mut self.moved {
            self.activity.moved(noted);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(noted) = self.moved {
            self.activity.last_moved[bucket(noted)].fetch_sub(1, Ordering::Relaxed);
        }
        self.activity.end();
        if let Some(tap) = &self.tap {
            tap.resume();
        }
    }
}

/// The per-connection service: counts requests, on HTTP/1 checks each
/// chunked request's head for a `Content-Length` hyper removed, and on HTTP/2
/// watches an unfinished body's end ([`super::caller_body`]). Called by
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
    S: Fn(Request<CallerBody>) -> F,
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
        let in_flight = InFlight { activity: self.activity.clone(), tap: self.tap.clone(), moved: None };
        // An HTTP/2 body not ended with its head: its end is the caller's only
        // once confirmed (see [`super::caller_body`]).
        let end = (request.version() == Version::HTTP_2 && !request.body().is_end_stream())
            .then(|| Arc::new(StreamEnd::default()));
        let (head, body) = request.into_parts();
        let request = Request::from_parts(head, CallerBody::new(body, end.clone()));
        // Boxed per request: hyper keeps a slot for the service's future on every
        // connection, and an idle one should not hold room for a whole request.
        CountedFuture {
            inner: Box::pin((self.handler)(request)),
            in_flight: Some(in_flight),
            close,
            end: end.map(EndWatch::new),
        }
    }
}

/// How hyper framed the request's body (it accepts no coding but `chunked`,
/// and drops a `Content-Length` beside it).
fn framing<B>(request: &Request<B>) -> Framing {
    if request.headers().contains_key(TRANSFER_ENCODING) {
        return Framing::Chunked;
    }
    if !request.headers().contains_key(CONTENT_LENGTH) {
        return Framing::Empty;
    }
    // One that is not a single plain number (refused later) counts as a body
    // the handler may have left unread.
    Framing::Length(crate::headers::single_length(request.headers()).unwrap_or(u64::MAX))
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
        end: Option<EndWatch>,
    }
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Response<B>>,
{
    type Output = Result<Response<Guarded<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(end) = this.end.as_ref() {
            end.polling();
        }
        let Poll::Ready(mut response) = this.inner.poll(cx) else {
            if let Some(end) = this.end.as_ref() {
                end.yielded(cx, true);
            }
            return Poll::Pending;
        };
        if *this.close {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let mut in_flight = this.in_flight.take();
        if let Some(in_flight) = &mut in_flight {
            in_flight.sending();
        }
        let end = this.end.take();
        Poll::Ready(Ok(response.map(|inner| Guarded { inner, in_flight, end })))
    }
}

pin_project! {
    /// A response body that holds its request's count until it is dropped,
    /// and counts the frames it gives; on HTTP/2, its polls also confirm the
    /// end of a request body still being read ([`StreamEnd`]).
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
        end: Option<EndWatch>,
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
        if let Some(end) = this.end.as_ref() {
            end.polling();
        }
        let frame = this.inner.poll_frame(cx);
        if let Some(end) = this.end.as_ref() {
            end.yielded(cx, frame.is_pending());
        }
        if let (Poll::Ready(Some(_)), Some(in_flight)) = (&frame, this.in_flight.as_mut()) {
            in_flight.moved();
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
        let mut download = activity.sending();
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            activity.moved(&mut download);
        }
        assert!(!stalled.is_finished(), "a slow download moves");
        // Then nothing more is taken.
        let stopped = tokio::time::Instant::now();
        stalled.await.expect("stall task");
        let waited = stopped.elapsed();
        assert!(waited >= Duration::from_secs(60) && waited <= Duration::from_secs(75), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_stalled_response_is_found_however_busy_the_others_are() {
        let activity = Arc::new(Activity::default());
        let stalled = tokio::spawn({
            let activity = activity.clone();
            async move { activity.stalled_for(Duration::from_secs(60)).await }
        });
        let _stuck = activity.sending();
        let began = tokio::time::Instant::now();
        let mut busy = activity.sending();
        while !stalled.is_finished() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            activity.moved(&mut busy);
            assert!(began.elapsed() <= Duration::from_secs(76), "never found");
        }
        let waited = began.elapsed();
        assert!(waited >= Duration::from_secs(60), "not before the timeout: {waited:?}");
    }
}
