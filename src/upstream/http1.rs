//! HTTP/1.1 to Tallyfy, spoken by the request's own task.
//!
//! A request writes its head (and body) on a pooled connection and reads the
//! response head there; the response body then reads the rest from the same
//! connection as the caller takes it, and gives the connection back to its
//! thread's pool at the body's last byte ([`super::returning`]). There is no
//! task per connection and no channel between a request and its connection:
//! with hyper's client connections, each exchange went through a channel to the
//! connection's task and back, and that dispatch cost more per request than
//! the codec (README: Performance). HTTP/2 stays with hyper ([`super::pool`]).
//!
//! The request is lent (`&mut`): when nothing of it could be written, it is
//! still whole and can go on another connection; so can a safe one without a
//! body that a reused connection closed unanswered ([`Resend`]).

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use futures_util::FutureExt as _;
use http::uri::PathAndQuery;
use http::{Method, Request};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{SentBody, Tenant};
use crate::body::BodyFailure;
use crate::error::BoxError;

mod decoder;
mod head;

pub(super) use decoder::Decoder;
use decoder::Malformed;
use head::Sending;
pub(super) use head::{MAX_HEAD, ResponseHead};

/// How much room a read is given.
const READ_SIZE: usize = 8 * 1024;
/// Request bytes gathered before they are written: a small body goes in the
/// same `write` as its head.
const WRITE_SIZE: usize = 16 * 1024;

/// The stream under a connection: TCP, or TLS over it.
pub(super) type Io = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// An HTTP/1.1 connection to Tallyfy between exchanges, or in one.
pub(super) struct Connection {
    io: Io,
    /// Bytes read and not yet taken: the start of a response, then its body.
    read: BytesMut,
    /// Request bytes not yet written (kept for its capacity).
    write: Vec<u8>,
    /// The only credential whose requests it carries.
    tenant: Tenant,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// Writing to or reading from the connection failed.
    Io(io::Error),
    /// Tallyfy closed the connection before its response was complete.
    Closed,
    /// Tallyfy's response is not HTTP/1.1 as RFC 9112 frames it.
    Malformed(Malformed),
    /// The request body failed: the caller's upload, its size limit, or an
    /// override screen (the error says which).
    Body(BoxError),
    /// The request body was not as long as its `Content-Length` said.
    BodyLength,
}

impl Error {
    /// Whether the caller's side failed (its body), not Tallyfy's.
    pub fn is_callers(&self) -> bool {
        matches!(self, Error::Body(_) | Error::BodyLength)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(_) => f.write_str("the connection to Tallyfy failed"),
            Error::Closed => f.write_str("Tallyfy closed the connection before its response was complete"),
            Error::Malformed(_) => f.write_str("Tallyfy's response could not be read"),
            Error::Body(_) => f.write_str("the request body failed"),
            Error::BodyLength => f.write_str("the request body did not match its Content-Length"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(error) => Some(error),
            Error::Malformed(error) => Some(error),
            Error::Body(error) => Some(&**error),
            Error::Closed | Error::BodyLength => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(error: io::Error) -> Self {
        Error::Io(error)
    }
}

impl From<Malformed> for Error {
    fn from(error: Malformed) -> Self {
        Error::Malformed(error)
    }
}

/// A failed exchange, and whether the request may go on another connection.
#[derive(Debug)]
pub(super) struct Failure {
    pub error: Error,
    pub resend: Resend,
}

/// Whether a request an exchange failed may go on another connection, when
/// the failed one had been used before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    /// No: Tallyfy may have acted on it.
    Never,
    /// The connection failed before a byte was written or anything was taken
    /// from the body: the request is whole, and may go again however often.
    Untouched,
    /// A safe request without a body that got not a byte of answer
    /// ([`unanswered_safe`]): once.
    Unanswered,
}

/// How far an attempt got with its request.
#[derive(Default)]
struct Attempt {
    /// A byte of it was written.
    written: bool,
    /// Its body was polled (and may have given up bytes).
    body_read: bool,
    /// A final answer that came before the whole request was written and does
    /// not refuse it (below 400, connection kept): the request is finished,
    /// then this is the response.
    early: Option<ResponseHead>,
}

/// What came first while waiting for the caller's next body bytes.
enum Next {
    Frame(Option<Result<http_body::Frame<bytes::Bytes>, BodyFailure>>),
    Answered(ResponseHead),
}

/// How writing a request ended.
enum Sent {
    Whole,
    /// Tallyfy answered before the request was all written.
    Answered(ResponseHead),
}

impl Connection {
    pub(super) fn new(io: Io, tenant: Tenant) -> Connection {
        Connection { io, read: BytesMut::new(), write: Vec::new(), tenant }
    }

    pub(super) fn tenant(&self) -> Tenant {
        self.tenant
    }

    /// Whether an idle connection is still open: Tallyfy has neither closed it
    /// nor sent anything unasked. Looks without waiting, and without a system
    /// call when nothing arrived since the last read.
    pub(super) fn is_open(&mut self) -> bool {
        if !self.is_clean() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut probe), Poll::Pending)
    }

    /// Writes `request` (its URI's path and query as the target) and reads the
    /// response head, passing over `1xx` interim answers. Tallyfy's answer is
    /// watched for while the body is still being written: a refusal (400 or
    /// above, or one that closes the connection) ends the writing and is the
    /// response, and the connection closes after it; any other answer waits
    /// until the whole request is written.
    pub(super) async fn exchange(
        &mut self,
        request: &mut Request<SentBody>,
    ) -> Result<ResponseHead, Failure> {
        let (ended, exact) = (request.body().is_end_stream(), request.body().size_hint().exact());
        let sending = head::request_framing(request.headers_mut(), ended, exact);
        self.write.clear();
        let target = request.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        head::write_request_head(&mut self.write, request.method(), target, request.headers());
        let method = request.method().clone();
        let mut attempt = Attempt::default();
        match self.send(request.body_mut(), sending, &method, &mut attempt).await {
            Ok(Sent::Whole) => {
                if let Some(head) = attempt.early.take() {
                    return Ok(head);
                }
            }
            Ok(Sent::Answered(mut head)) => {
                head.keep_alive = false;
                return Ok(head);
            }
            Err(error) => {
                // Tallyfy may have answered and closed before taking the whole
                // body: that answer, if it arrived, is the response.
                if let Some(mut head) = attempt.early.take() {
                    head.keep_alive = false;
                    return Ok(head);
                }
                if attempt.written
                    && matches!(error, Error::Io(_))
                    && let Ok(mut head) = self.read_head(&method).await
                {
                    head.keep_alive = false;
                    return Ok(head);
                }
                // Only a request untouched (not a byte written, nothing taken
                // from its body) may go again, and only when the connection
                // failed; or a safe one Tallyfy never answered.
                let resend = if !attempt.written && !attempt.body_read && matches!(error, Error::Io(_)) {
                    Resend::Untouched
                } else {
                    unanswered_safe(&method, &attempt, &error, &self.read)
                };
                return Err(Failure { error, resend });
            }
        }
        let answer = self.read_head(&method).await;
        answer.map_err(|error| Failure {
            resend: unanswered_safe(&method, &attempt, &error, &self.read),
            error,
        })
    }

    /// Writes the gathered head and the body. The head leaves at once when the
    /// body's first bytes are not there yet; a small body goes with it.
    async fn send(
        &mut self,
        body: &mut SentBody,
        sending: Sending,
        method: &Method,
        attempt: &mut Attempt,
    ) -> Result<Sent, Error> {
        if sending != Sending::Nothing {
            let mut sent = 0u64;
            loop {
                attempt.body_read = true;
                let frame = match body.frame().now_or_never() {
                    Some(frame) => frame,
                    None => {
                        if let Some(head) = self.write_out(method, attempt).await? {
                            return Ok(Sent::Answered(head));
                        }
                        // Tallyfy's answer is watched while the caller is slow.
                        let next = std::future::poll_fn(|cx| {
                            if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                                return Poll::Ready(Ok(Next::Frame(frame)));
                            }
                            self.poll_refusal(method, attempt, cx).map_ok(Next::Answered)
                        })
                        .await?;
                        match next {
                            Next::Frame(frame) => frame,
                            Next::Answered(head) => return Ok(Sent::Answered(head)),
                        }
                    }
                };
                let Some(frame) = frame else { break };
                let Ok(data) = frame.map_err(|failure| Error::Body(failure.into()))?.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if matches!(sending, Sending::Length(length) if sent > length) {
                    return Err(Error::BodyLength);
                }
                if sending == Sending::Chunked {
                    // Writing to a Vec cannot fail.
                    let _ = write!(self.write, "{:x}\r\n", data.len());
                }
                self.write.extend_from_slice(&data);
                if sending == Sending::Chunked {
                    self.write.extend_from_slice(b"\r\n");
                }
                if self.write.len() >= WRITE_SIZE
                    && let Some(head) = self.write_out(method, attempt).await?
                {
                    return Ok(Sent::Answered(head));
                }
            }
            match sending {
                Sending::Length(length) if sent != length => return Err(Error::BodyLength),
                Sending::Chunked => self.write.extend_from_slice(b"0\r\n\r\n"),
                _ => {}
            }
        }
        if let Some(head) = self.write_out(method, attempt).await? {
            return Ok(Sent::Answered(head));
        }
        Ok(Sent::Whole)
    }

    /// Writes and flushes the gathered request bytes (TLS included). While
    /// Tallyfy takes none, its answer is read instead: a refusal ends the writing.
    async fn write_out(
        &mut self,
        method: &Method,
        attempt: &mut Attempt,
    ) -> Result<Option<ResponseHead>, Error> {
        let mut at = 0;
        let refused = std::future::poll_fn(|cx| {
            // An answer already read (woken by it, the socket writable again) is judged first.
            if !self.read.is_empty()
                && attempt.early.is_none()
                && let Some(head) = self.take_final_head(method)?
                && let Some(refusal) = park_unless_refusal(head, attempt)
            {
                return Poll::Ready(Ok(Some(refusal)));
            }
            let mut blocked = false;
            while at < self.write.len() && !blocked {
                match Pin::new(&mut self.io).poll_write(cx, &self.write[at..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        attempt.written = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                    Poll::Pending => blocked = true,
                }
            }
            if !blocked {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(None)),
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                    Poll::Pending => {}
                }
            }
            self.poll_refusal(method, attempt, cx).map_ok(Some)
        })
        .await?;
        self.write.clear();
        // A large body frame (a kept or rewritten body comes as one) is not
        // held on to by the idle connection.
        if self.write.capacity() > 4 * WRITE_SIZE {
            self.write = Vec::new();
        }
        Ok(refused)
    }

    /// Reads Tallyfy's answer while the request is not all written; `Ready`
    /// only with a refusal. Any other final answer is parked in `attempt` and
    /// reading stops. `Pending` without a waker of its own when nothing is to
    /// be watched: the caller polls another source first.
    fn poll_refusal(
        &mut self,
        method: &Method,
        attempt: &mut Attempt,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, Error>> {
        if !attempt.written || attempt.early.is_some() {
            return Poll::Pending;
        }
        let head = std::task::ready!(self.poll_head(method, cx))?;
        match park_unless_refusal(head, attempt) {
            Some(refusal) => Poll::Ready(Ok(refusal)),
            None => Poll::Pending,
        }
    }

    /// The next final response head, reading as needed.
    fn poll_head(&mut self, method: &Method, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, Error>> {
        loop {
            if let Some(head) = self.take_final_head(method)? {
                return Poll::Ready(Ok(head));
            }
            self.read.reserve(READ_SIZE);
            match std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read))
            {
                Ok(0) => return Poll::Ready(Err(Error::Closed)),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Err(error.into())),
            }
        }
    }

    /// The first final (not `1xx`) response head in what has been read.
    fn take_final_head(&mut self, method: &Method) -> Result<Option<ResponseHead>, Error> {
        while let Some(head) = head::read_response_head(&mut self.read, method)? {
            let status = head.response.status();
            if !status.is_informational() || status == http::StatusCode::SWITCHING_PROTOCOLS {
                return Ok(Some(head));
            }
        }
        Ok(None)
    }

    async fn read_head(&mut self, method: &Method) -> Result<ResponseHead, Error> {
        std::future::poll_fn(|cx| self.poll_head(method, cx)).await
    }

    /// The next piece of the response body `decoder` delimits, reading as
    /// needed; `None` at its end. A body read until close ends with the connection.
    pub(super) fn poll_body(
        &mut self,
        decoder: &mut Decoder,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<bytes::Bytes, Error>>> {
        loop {
            match decoder.decode(&mut self.read) {
                Err(malformed) => return Poll::Ready(Some(Err(malformed.into()))),
                Ok(Some(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(None) if decoder.is_done() => return Poll::Ready(None),
                Ok(None) => {}
            }
            self.read.reserve(READ_SIZE);
            match std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read))
            {
                Ok(0) if *decoder == Decoder::UntilClose => {
                    *decoder = Decoder::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(Error::Closed))),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(error.into()))),
            }
        }
    }

    /// Whether the connection holds nothing beyond the exchange just ended.
    pub(super) fn is_clean(&self) -> bool {
        self.read.is_empty()
    }
}

/// A safe request without a body that got not a byte of answer before its
/// connection closed or failed. On a kept-alive connection that is what a
/// close by Tallyfy looks like when it crossed the request on the wire (it
/// reached the proxy after the pool looked at the connection): sending the
/// request again, on another connection, cannot do anything twice. nginx and
/// Go's client do the same.
fn unanswered_safe(method: &Method, attempt: &Attempt, error: &Error, read: &BytesMut) -> Resend {
    let unanswered = crate::target::is_safe(method)
        && !attempt.body_read
        && read.is_empty()
        && matches!(error, Error::Io(_) | Error::Closed);
    if unanswered { Resend::Unanswered } else { Resend::Never }
}

/// An early answer that refuses the request (400 or above, or closing the
/// connection) is returned; any other is parked in `attempt` for after the
/// request is all written.
fn park_unless_refusal(head: ResponseHead, attempt: &mut Attempt) -> Option<ResponseHead> {
    if head.response.status().as_u16() >= 400 || !head.keep_alive {
        return Some(head);
    }
    attempt.early = Some(head);
    None
}
