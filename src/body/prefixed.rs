//! [`Prefixed`]: a body that replays what was already read before streaming the rest.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Chunks;

pin_project! {
    /// A body that yields `prefix` (one chunk or several) first, then the rest of `inner`.
    pub struct Prefixed<B> {
        first: Option<Bytes>,
        rest: smallvec::IntoIter<[Bytes; 2]>,
        #[pin]
        inner: B,
    }
}

impl<B> Prefixed<B> {
    pub fn new(prefix: Option<Bytes>, inner: B) -> Self {
        Prefixed { first: prefix.filter(|p| !p.is_empty()), rest: Chunks::new().into_iter(), inner }
    }

    /// `chunks` in order, then `inner`.
    pub fn chunks(chunks: Chunks, inner: B) -> Self {
        Prefixed { first: None, rest: chunks.into_iter(), inner }
    }

    fn held(&self) -> u64 {
        self.first.as_ref().map_or(0, |f| f.len() as u64)
            + self.rest.as_slice().iter().map(|c| c.len() as u64).sum::<u64>()
    }
}

impl<B: Body<Data = Bytes>> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        for chunk in this.rest.by_ref() {
            if !chunk.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.as_slice().iter().all(Bytes::is_empty) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.held();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{BodyStart, Budget, read_up_to};
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_read_prefix_is_replayed_before_the_rest() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        let BodyStart::Over(prefix, rest) = read_up_to(body, 3, Budget::unlimited()).await.expect("reads")
        else {
            panic!("over")
        };
        let whole = Prefixed::new(Some(prefix), rest).collect().await.expect("collects").to_bytes();
        assert_eq!(whole, "0123456789");
        let small =
            read_up_to(Full::new(Bytes::from_static(b"ab")), 3, Budget::unlimited()).await.expect("reads");
        assert!(matches!(small, BodyStart::Complete(b) if b == "ab"));
    }
}
