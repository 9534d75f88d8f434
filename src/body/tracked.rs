//! A request body that reports when it last made progress, so the upstream
//! timeout measures Tallyfy's silence rather than the caller's upload time.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// When a body was last read from (or finished), shared with the sender.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// Microseconds after `origin`.
    last: AtomicU64,
    /// Body bytes read so far.
    bytes: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress { origin: Instant::now(), last: AtomicU64::new(0), bytes: AtomicU64::new(0) })
    }

    fn touch(&self) {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last.fetch_max(micros, Ordering::Relaxed);
    }

    /// Body bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
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
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
                && let Some(data) = data
            {
                this.progress.bytes.fetch_add(data.remaining() as u64, Ordering::Relaxed);
            }
            this.progress.touch();
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
