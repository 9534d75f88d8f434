//! A response body from Tallyfy. An HTTP/1.1 body is read from its connection
//! by whoever polls it, and the connection goes back to its thread's pool the
//! moment the body ends (see [`super::pool`]); an HTTP/2 body is hyper's, its
//! trailer fields dropped (a field section [`crate::headers::to_caller`] never
//! cleans: a `Set-Cookie` or Tallyfy's own `X-Request-Id` could ride in it).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::http1::{Connection, Decoder};
use super::pool::{Local, StreamPlace};
use crate::body::DataOnly;
use crate::error::BoxError;

/// Tallyfy's response body.
pub struct UpstreamBody(Inner);

enum Inner {
    /// Read from the connection; `connection` is `None` once the body has
    /// ended (the connection given back) or failed (the connection gone).
    Http1 { connection: Option<Box<Connection>>, decoder: Decoder, keep_alive: bool, pool: Arc<Local> },
    /// Its stream's place on its connection is given up when it is dropped.
    Http2 { body: DataOnly<Incoming>, _place: StreamPlace },
}

impl UpstreamBody {
    pub(super) fn http1(
        connection: Box<Connection>,
        decoder: Decoder,
        keep_alive: bool,
        pool: Arc<Local>,
    ) -> Self {
        let mut body = UpstreamBody(Inner::Http1 { connection: Some(connection), decoder, keep_alive, pool });
        body.give_back_if_ended();
        body
    }

    pub(super) fn http2(body: Incoming, place: StreamPlace) -> Self {
        UpstreamBody(Inner::Http2 { body: DataOnly::new(body), _place: place })
    }

    /// An ended HTTP/1.1 body's connection goes back to the pool, unless the
    /// response said it closes or Tallyfy sent more than the response.
    fn give_back_if_ended(&mut self) {
        if let Inner::Http1 { connection, decoder, keep_alive, pool } = &mut self.0
            && decoder.is_done()
            && let Some(connection) = connection.take()
            && *keep_alive
            && connection.is_clean()
        {
            pool.give_back(connection);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.0 {
            Inner::Http2 { body, .. } => {
                return Pin::new(&mut *body).poll_frame(cx).map(|frame| match frame {
                    // hyper ends a body at a `RST_STREAM(NO_ERROR)` (or a
                    // graceful `GOAWAY` that left the stream out) as at its
                    // `END_STREAM`: short of its length, that is a cut answer.
                    None if body.size_hint().exact().is_some_and(|left| left > 0) => {
                        Some(Err("Tallyfy's HTTP/2 answer ended before its Content-Length".into()))
                    }
                    frame => frame.map(|frame| frame.map_err(Into::into)),
                });
            }
            // Ended (its connection given back), or failed: a failed body
            // never reads as one that ended.
            Inner::Http1 { connection: None, decoder, .. } if decoder.is_done() => return Poll::Ready(None),
            Inner::Http1 { connection: None, .. } => {
                return Poll::Ready(Some(Err("the response body failed".into())));
            }
            Inner::Http1 { connection: Some(connection), decoder, .. } => {
                ready!(connection.poll_body(decoder, cx))
            }
        };
        match polled {
            Some(Ok(data)) => {
                self.give_back_if_ended();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => {
                self.give_back_if_ended();
                Poll::Ready(None)
            }
            Some(Err(error)) => {
                // The connection is broken: it goes with the body.
                if let Inner::Http1 { connection, .. } = &mut self.0 {
                    *connection = None;
                }
                Poll::Ready(Some(Err(error.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Http1 { decoder, .. } => decoder.is_done(),
            // All the bytes its length announced have come: an `END_STREAM`
            // in a frame of its own may follow, but a caller's HTTP/1.1
            // response ends at the length, and the body is read no further.
            Inner::Http2 { body, .. } => body.is_end_stream() || body.size_hint().exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Http1 { decoder, .. } => {
                decoder.remaining().map_or_else(SizeHint::default, SizeHint::with_exact)
            }
            Inner::Http2 { body, .. } => body.size_hint(),
        }
    }
}
