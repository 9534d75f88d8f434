//! [`Screened`]: a request body passed through an optional [`Screen`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Screen;
use crate::error::BoxError;

pin_project! {
    /// A request body passed through an optional [`Screen`].
    pub struct Screened<B> {
        #[pin]
        inner: B,
        // Boxed: screening is rare, and every request body is moved with the
        // request through each level of its future.
        screen: Option<Box<Screen>>,
        done: bool,
    }
}

impl<B> Screened<B> {
    pub fn new(inner: B, screen: Option<Screen>) -> Self {
        Screened { inner, screen: screen.map(Box::new), done: false }
    }
}

impl<B> Body for Screened<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let Some(screen) = this.screen.as_mut() else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        loop {
            if *this.done {
                return Poll::Ready(None);
            }
            let released = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => screen.push(&data),
                    Err(_trailers) => continue,
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None => {
                    *this.done = true;
                    screen.finish()
                }
            };
            match released {
                Err(refused) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(Box::new(refused))));
                }
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.screen.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
