//! [`Finished`]: a response body that counts the bytes it sends and tells its
//! [`Finish`] once, when the body ends or when it is dropped early (the caller
//! hung up: `complete` is false). How a request's access line and metrics are
//! recorded at the moment its response is really over.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// What happens, once, when a response body is over.
pub trait Finish {
    fn finish(self, bytes_sent: u64, complete: bool);
}

pin_project! {
    pub struct Finished<B, F: Finish> {
        #[pin]
        inner: B,
        on_finish: Option<F>,
        bytes_sent: u64,
    }

    impl<B, F: Finish> PinnedDrop for Finished<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_finish) = this.on_finish.take() {
                on_finish.finish(*this.bytes_sent, false);
            }
        }
    }
}

impl<B: Body, F: Finish> Finished<B, F> {
    /// Wraps `inner`; a body that is already complete is finished at once (hyper
    /// never polls those).
    pub fn new(inner: B, on_finish: F) -> Self {
        let on_finish = if inner.is_end_stream() {
            on_finish.finish(0, true);
            None
        } else {
            Some(on_finish)
        };
        Finished { inner, on_finish, bytes_sent: 0 }
    }
}

impl<B: Body<Data = Bytes>, F: Finish> Body for Finished<B, F> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes_sent += data.len() as u64;
                }
                // hyper stops polling a body that says it has ended (its
                // Content-Length is reached), so this is the end too.
                this.inner.is_end_stream()
            }
            Poll::Ready(None) => true,
            _ => false,
        };
        if ended && let Some(on_finish) = this.on_finish.take() {
            on_finish.finish(*this.bytes_sent, true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(u64, bool)>>>);

    impl Finish for Seen {
        fn finish(self, bytes_sent: u64, complete: bool) {
            self.0.lock().expect("not poisoned").push((bytes_sent, complete));
        }
    }

    #[tokio::test]
    async fn a_body_sent_to_its_end_finishes_once_complete() {
        let seen = Seen::default();
        let body = Finished::new(Full::new(Bytes::from_static(b"abc")), seen.clone());
        assert_eq!(body.collect().await.expect("collects").to_bytes(), "abc");
        assert_eq!(*seen.0.lock().expect("not poisoned"), [(3, true)]);
    }

    #[tokio::test]
    async fn a_body_dropped_midway_finishes_incomplete() {
        let seen = Seen::default();
        use futures_util::StreamExt;
        let first = Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ab")));
        let chunks = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
        let mut body = Finished::new(StreamBody::new(chunks), seen.clone());
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "ab");
        drop(body);
        assert_eq!(*seen.0.lock().expect("not poisoned"), [(2, false)]);
    }

    #[test]
    fn an_empty_body_finishes_at_once() {
        let seen = Seen::default();
        let _body = Finished::new(http_body_util::Empty::<Bytes>::new(), seen.clone());
        assert_eq!(*seen.0.lock().expect("not poisoned"), [(0, true)]);
    }
}
