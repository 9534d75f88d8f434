//! The caller's request body as the handler reads it: hyper's, except that on
//! HTTP/2 its end means the caller ended it.
//!
//! hyper reads an HTTP/2 stream reset with `NO_ERROR` as the end of the
//! request body (RFC 9113 §8.1 lets a *server* stop a request that way once it
//! has answered; from a caller it means the upload was abandoned). A request
//! the caller abandoned must never reach Tallyfy framed as complete: a
//! truncated upload (a file, a multipart form with no closing boundary) would
//! be committed with the proxy's token. hyper does look for a reset each time
//! the request's future is pending, and drops the future when it finds one. So
//! an HTTP/2 body's end is held ([`StreamEnd`]) until the request's future has
//! been pending once after the end was seen, and then polled again: hyper found
//! no reset. Once the future has answered, its response body's polls tell the
//! same (hyper looks for a reset before each; Tallyfy over HTTP/2 may answer
//! before an upload ends). A future dropped unanswered, or a response body
//! dropped, before that leaves the end an error, and the request is never
//! finished upstream (its upstream connection or stream is dropped half-sent,
//! as for any caller that goes away).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::BoxError;

/// The caller's request body.
#[derive(Debug)]
pub struct CallerBody {
    inner: Incoming,
    /// HTTP/2 bodies not ended with their head: where their end is confirmed.
    end: Option<Arc<StreamEnd>>,
    /// hyper's body ended (it is not polled again).
    inner_ended: bool,
}

impl CallerBody {
    pub(super) fn new(inner: Incoming, end: Option<Arc<StreamEnd>>) -> Self {
        CallerBody { inner, end, inner_ended: false }
    }
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.inner_ended {
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(frame) => return Poll::Ready(Some(frame.map_err(BoxError::from))),
                None => this.inner_ended = true,
            }
        }
        match &this.end {
            None => Poll::Ready(None),
            Some(end) => end.body_ended(cx).map(|settled| match settled {
                Ok(()) => None,
                Err(Abandoned) => {
                    Some(Err("the caller reset its HTTP/2 stream before its body ended".into()))
                }
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        // An HTTP/2 body is over only once its end is confirmed.
        self.inner.is_end_stream() && self.end.as_ref().is_none_or(|end| end.confirmed())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Tells an HTTP/2 body's [`StreamEnd`] of the polls of its request's future,
/// then (once it answered) of its response body's; when dropped (the future
/// dropped unanswered, or the response body dropped), that an end not yet
/// confirmed is an abandoned request's.
#[derive(Debug)]
pub(super) struct EndWatch(Arc<StreamEnd>);

impl EndWatch {
    pub(super) fn new(end: Arc<StreamEnd>) -> Self {
        EndWatch(end)
    }

    /// The watched future or body is about to be polled.
    pub(super) fn polling(&self) {
        self.0.polling();
    }

    /// The watched future or body gave hyper the hand (`pending`: it waits).
    pub(super) fn yielded(&self, cx: &mut Context<'_>, pending: bool) {
        self.0.yielded(cx, pending);
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        self.0.released();
    }
}

/// The end of an HTTP/2 request body, between the body (which sees it) and the
/// request's future or, once it answered, its response body (whose polls tell
/// whether hyper found a reset).
#[derive(Debug, Default)]
pub(super) struct StreamEnd {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The body saw hyper's end.
    seen: bool,
    /// The request's future was pending, or its response body was polled,
    /// after `seen`: hyper looks for a reset before the next poll.
    looked: bool,
    settled: Option<Result<(), Abandoned>>,
    /// The task of the request's future (and of its response body: hyper's
    /// stream task), woken when the end is seen (the body may be read on
    /// another task: an HTTP/2 connection to Tallyfy reads it on its own).
    service: Option<Waker>,
    /// The body's reader, woken when the end is settled.
    body: Option<Waker>,
}

/// The request's future was dropped unanswered, or its response body dropped,
/// before the body's end was confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Abandoned;

impl StreamEnd {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn confirmed(&self) -> bool {
        self.state().settled == Some(Ok(()))
    }

    /// The body saw hyper's end: ready once settled.
    fn body_ended(&self, cx: &mut Context<'_>) -> Poll<Result<(), Abandoned>> {
        let mut state = self.state();
        if let Some(settled) = state.settled {
            return Poll::Ready(settled);
        }
        state.seen = true;
        state.body = Some(cx.waker().clone());
        if let Some(service) = state.service.take() {
            service.wake();
        }
        Poll::Pending
    }

    /// The request's future (or, once it answered, its response body) is
    /// about to be polled: if it gave hyper the hand since the end was seen,
    /// hyper looked for a reset in between and found none, and the end is the
    /// caller's.
    fn polling(&self) {
        let mut state = self.state();
        if state.seen && state.looked && state.settled.is_none() {
            state.settled = Some(Ok(()));
            if let Some(body) = state.body.take() {
                body.wake();
            }
        }
    }

    /// The request's future, or its response body, gave hyper the hand
    /// (`pending`: it waits). hyper looks for a reset before it polls either
    /// again: when the end was seen, that poll confirms it (and comes at once).
    fn yielded(&self, cx: &mut Context<'_>, pending: bool) {
        let mut state = self.state();
        if state.settled.is_some() {
            return;
        }
        if state.seen {
            state.looked = true;
            if pending {
                cx.waker().wake_by_ref();
            }
        } else if pending && !state.service.as_ref().is_some_and(|service| service.will_wake(cx.waker())) {
            state.service = Some(cx.waker().clone());
        }
    }

    /// The request's future ended without an answer, or its response body
    /// is dropped: an end not yet confirmed is an abandoned request's (once
    /// the answer is whole, Tallyfy has answered, and what it did not read of
    /// the upload is cut as for a caller gone).
    fn released(&self) {
        let mut state = self.state();
        if state.settled.is_none() {
            state.settled = Some(Err(Abandoned));
            if let Some(body) = state.body.take() {
                body.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn an_end_is_the_callers_only_after_a_pending_and_a_poll_past_it() {
        let end = StreamEnd::default();
        let (service_wakes, service) = waker();
        let (body_wakes, body) = waker();
        end.yielded(&mut Context::from_waker(&service), true);
        assert!(end.body_ended(&mut Context::from_waker(&body)).is_pending(), "held");
        assert_eq!(service_wakes.0.load(Ordering::Relaxed), 1, "the request's future is told");
        end.polling();
        assert!(!end.confirmed(), "not pending since the end: hyper has not looked for a reset");
        end.yielded(&mut Context::from_waker(&service), true);
        assert_eq!(service_wakes.0.load(Ordering::Relaxed), 2, "polled again at once");
        end.polling();
        assert!(end.confirmed());
        assert_eq!(body_wakes.0.load(Ordering::Relaxed), 1, "the reader is told");
        assert_eq!(end.body_ended(&mut Context::from_waker(&body)), Poll::Ready(Ok(())));
        end.released();
        assert!(end.confirmed(), "a confirmed end stays confirmed");
    }

    #[test]
    fn a_response_body_polled_past_the_end_confirms_it() {
        let end = StreamEnd::default();
        let (_, task) = waker();
        let (body_wakes, body) = waker();
        assert!(end.body_ended(&mut Context::from_waker(&body)).is_pending());
        // The response body gave a frame: hyper looks for a reset before the next poll.
        end.polling();
        end.yielded(&mut Context::from_waker(&task), false);
        assert!(!end.confirmed(), "not before that poll");
        end.polling();
        assert!(end.confirmed());
        assert_eq!(body_wakes.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_future_dropped_before_the_end_is_confirmed_leaves_it_abandoned() {
        let end = StreamEnd::default();
        let (body_wakes, body) = waker();
        let (_, service) = waker();
        assert!(end.body_ended(&mut Context::from_waker(&body)).is_pending());
        end.yielded(&mut Context::from_waker(&service), true);
        // hyper found the reset and dropped the future here.
        end.released();
        assert_eq!(body_wakes.0.load(Ordering::Relaxed), 1);
        assert_eq!(end.body_ended(&mut Context::from_waker(&body)), Poll::Ready(Err(Abandoned)));
        end.polling();
        assert!(!end.confirmed());
    }
}
