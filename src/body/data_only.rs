//! A body without its trailer fields: a caller's upload on its way to
//! Tallyfy, or Tallyfy's HTTP/2 answer on its way back.
//!
//! Trailers are a field section the proxy never cleans: a caller's chunked
//! upload (or HTTP/2 stream) can end with `Authorization`, `X-Api-Key`,
//! `X-Tallyfy-Client` or `X-HTTP-Method-Override` there, and Tallyfy's answer
//! with a `Set-Cookie`. The HTTP/1.1 writer never sends trailers, but hyper's
//! HTTP/2 client and server would pass them on as a last `HEADERS` frame.
//! Like nginx, the proxy drops them.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Wraps a body and passes on its data frames only.
    pub struct DataOnly<B> {
        #[pin]
        inner: B,
    }
}

impl<B> DataOnly<B> {
    pub fn new(inner: B) -> Self {
        DataOnly { inner }
    }
}

impl<B: Body> Body for DataOnly<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) if !frame.is_data() => continue,
                other => return Poll::Ready(other),
            }
        }
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
    use http::HeaderMap;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn data_goes_on_and_trailers_do_not() {
        let mut trailers = HeaderMap::new();
        trailers.insert("authorization", "Bearer caller".parse().expect("value"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers.clone())),
            Ok(Frame::data(Bytes::from_static(b"c"))),
            Ok(Frame::trailers(trailers)),
        ];
        let collected = DataOnly::new(StreamBody::new(futures_util::stream::iter(frames)))
            .collect()
            .await
            .expect("infallible");
        assert!(collected.trailers().is_none(), "a trailer went on");
        assert_eq!(collected.to_bytes(), "abc");
    }
}
