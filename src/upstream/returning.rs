//! A response body from Tallyfy that gives its HTTP/1.1 connection back to its
//! thread's pool the moment the body ends (see [`super::pool`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use super::SentBody;
use super::pool::Local;

/// Tallyfy's response body, holding its connection until the last byte.
pub struct UpstreamBody {
    body: Incoming,
    /// The HTTP/1.1 connection and the pool it goes back to; `None` for
    /// HTTP/2 (the connection is shared) and once given back.
    back: Option<(http1::SendRequest<SentBody>, Arc<Local>)>,
}

impl UpstreamBody {
    pub(super) fn new(body: Incoming, back: Option<(http1::SendRequest<SentBody>, Arc<Local>)>) -> Self {
        let mut body = UpstreamBody { body, back };
        if body.body.is_end_stream() {
            body.give_back();
        }
        body
    }

    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.give_back(sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
            // The connection is broken: it goes with the body.
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
