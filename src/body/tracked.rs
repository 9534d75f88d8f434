//! A request body that reports when it last made progress, so the upstream
//! timeout measures Tallyfy's silence rather than the caller's upload time,
//! and how it failed, if it did, whatever the protocol made of the failure.

use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

/// When a body was last read from (or finished), shared with the sender.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// Microseconds after `origin`.
    last: AtomicU64,
    /// Body bytes read so far.
    bytes: AtomicU64,
    /// How the body failed, if it did.
    failure: OnceLock<BodyFailure>,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failure: OnceLock::new(),
        })
    }

    /// How the body failed (its size limit, an override screen, the caller
    /// gone), if it did. hyper's HTTP/2 client reports a failing body only as
    /// a stream it reset, with no cause: the sender looks here instead.
    pub fn failure(&self) -> Option<&BodyFailure> {
        self.failure.get()
    }

    fn touch(&self) {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last.fetch_max(micros, Ordering::Relaxed);
    }

    /// Body bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The body (held whole) is to be read again from its start, for another
    /// send: it is still one body, counted once.
    pub fn read_again(&self) {
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// The last moment the body moved (its creation, at first).
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_micros(self.last.load(Ordering::Relaxed))
    }
}

pin_project! {
    /// Wraps a body and touches its [`Progress`] on every frame and at its end.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        progress: Arc<Progress>,
    }
}

impl<B> Tracked<B> {
    pub fn new(inner: B, progress: Arc<Progress>) -> Self {
        Tracked { inner, progress }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }
}

/// A body's error, shared: the sender keeps it in [`Progress`], the
/// connection gets it too. Its source is the error the body gave.
#[derive(Debug, Clone)]
pub struct BodyFailure(Arc<BoxError>);

impl fmt::Display for BodyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body failed")
    }
}

impl Error for BodyFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&**self.0)
    }
}

impl<B> Body for Tracked<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BodyFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BodyFailure>>> {
        let this = self.project();
        let polled = std::task::ready!(this.inner.poll_frame(cx));
        this.progress.touch();
        Poll::Ready(match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.progress.bytes.fetch_add(data.remaining() as u64, Ordering::Relaxed);
                }
                Some(Ok(frame))
            }
            Some(Err(error)) => {
                let failure = BodyFailure(Arc::new(error.into()));
                Some(Err(this.progress.failure.get_or_init(|| failure).clone()))
            }
            None => None,
        })
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
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn reading_the_body_moves_its_activity() {
        let progress = Progress::new();
        let created = progress.last();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let body = Tracked::new(Full::new(Bytes::from_static(b"abc")), progress.clone());
        let bytes = body.collect().await.expect("Full never fails").to_bytes();
        assert_eq!(bytes, "abc");
        assert!(progress.last() >= created + Duration::from_millis(5));
    }
}
