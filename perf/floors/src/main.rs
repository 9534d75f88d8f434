//! Three floors for `scripts/load`: each proxies `GET` to the upstream, setting
//! `Host`, `Authorization` and `X-Tallyfy-Client`, on a current-thread runtime,
//! with upstream connections kept per thread, and does nothing else.
//!
//! - `hyper-pooled`: hyper's HTTP/1 server, and hyper's HTTP/1 client
//!   connections (`hyper::client::conn`, a task each) kept in a per-thread list
//!   and given back when a response body ends. tallyfy-proxy's own shape
//!   (`src/upstream/pool.rs`), without its work.
//! - `hand-client`: hyper's HTTP/1 server, and the upstream exchange written by
//!   hand in the request's own task (write the head, read the answer).
//! - `hand-both`: no hyper at all.
//!
//! They answer only what the load run asks (`GET`, a `Content-Length` answer
//! from a well-behaved upstream); they are yardsticks, not proxies.
//!
//! Usage: `floors MODE LISTEN UPSTREAM`.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "Bearer pat-abc";

thread_local! {
    /// Idle hyper client connections (`hyper-pooled`).
    static SENDERS: RefCell<Vec<SendRequest<Empty<Bytes>>>> = const { RefCell::new(Vec::new()) };
    /// Idle upstream sockets (`hand-client`, `hand-both`).
    static SOCKETS: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, listen, upstream] = &args[..] else {
        eprintln!("usage: floors hyper-pooled|hand-client|hand-both LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let (mode, upstream) = (mode.clone(), upstream.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let upstream = upstream.clone();
            match mode.as_str() {
                "hyper-pooled" => tokio::spawn(serve_hyper(stream, upstream, false)),
                "hand-client" => tokio::spawn(serve_hyper(stream, upstream, true)),
                _ => tokio::spawn(serve_by_hand(stream, upstream)),
            };
        }
    })
}

/// hyper's server; the upstream by hyper's client or by hand.
async fn serve_hyper(stream: TcpStream, upstream: String, by_hand: bool) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let upstream = upstream.clone();
        async move {
            if by_hand {
                let answer = exchange(&upstream, &request_head(&path, &upstream)).await?;
                Ok::<_, io::Error>(answer.into_response().map(Pooled::Full))
            } else {
                pooled_exchange(&upstream, &path).await.map(|r| r.map(Pooled::Hyper))
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
}

/// An answer from either client, as one body type.
enum Pooled {
    Hyper(GivesBack),
    Full(Full<Bytes>),
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        match self.get_mut() {
            Pooled::Hyper(body) => body.poll_frame(cx),
            Pooled::Full(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Pooled::Hyper(body) => body.body.is_end_stream(),
            Pooled::Full(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Pooled::Hyper(body) => body.body.size_hint(),
            Pooled::Full(body) => body.size_hint(),
        }
    }
}

/// hyper's client: an idle connection of this thread, or a new one.
async fn pooled_exchange(upstream: &str, path: &str) -> io::Result<Response<GivesBack>> {
    let mut sender = loop {
        let Some(mut sender) = SENDERS.with(|s| s.borrow_mut().pop()) else {
            let socket = TcpStream::connect(upstream).await?;
            socket.set_nodelay(true)?;
            let (sender, connection) =
                http1::handshake(TokioIo::new(socket)).await.map_err(io::Error::other)?;
            tokio::spawn(connection);
            break sender;
        };
        if std::future::poll_fn(|cx| Poll::Ready(sender.poll_ready(cx))).await.is_ready() {
            break sender;
        }
    };
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = path.parse().map_err(io::Error::other)?;
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    headers.insert(http::header::HOST, HeaderValue::from_str(upstream).map_err(io::Error::other)?);
    headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static(TOKEN));
    headers.insert("x-tallyfy-client", HeaderValue::from_static("APIClient"));
    let response = sender.send_request(request).await.map_err(io::Error::other)?;
    Ok(response.map(|body| {
        let mut body = GivesBack { body, sender: Some(sender) };
        body.give_back_at_end();
        body
    }))
}

/// A hyper client response body that returns its connection when it ends.
struct GivesBack {
    body: Incoming,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl GivesBack {
    fn give_back_at_end(&mut self) {
        if self.body.is_end_stream()
            && let Some(sender) = self.sender.take()
        {
            SENDERS.with(|s| s.borrow_mut().push(sender));
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            // A broken connection is not given back.
            Some(Err(_)) => self.sender = None,
            _ => self.give_back_at_end(),
        }
        Poll::Ready(frame.map(|f| f.map_err(io::Error::other)))
    }
}

fn request_head(path: &str, upstream: &str) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    for part in ["GET ", path, " HTTP/1.1\r\nhost: ", upstream, "\r\nauthorization: ", TOKEN] {
        head.extend_from_slice(part.as_bytes());
    }
    head.extend_from_slice(b"\r\nx-tallyfy-client: APIClient\r\n\r\n");
    head
}

/// An upstream answer read by hand.
struct Answer {
    status: u16,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Answer {
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        for (name, value) in self.headers {
            if name != http::header::CONTENT_LENGTH {
                response.headers_mut().append(name, value);
            }
        }
        response
    }
}

/// Writes `head` on an idle socket of this thread (or a new one) and reads the
/// answer: its head with httparse, then `Content-Length` bytes.
async fn exchange(upstream: &str, head: &[u8]) -> io::Result<Answer> {
    let mut socket = match SOCKETS.with(|s| s.borrow_mut().pop()) {
        Some(socket) => socket,
        None => {
            let socket = TcpStream::connect(upstream).await?;
            socket.set_nodelay(true)?;
            socket
        }
    };
    socket.write_all(head).await?;
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        if socket.read_buf(&mut buffer).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) = parsed.parse(&buffer).map_err(io::Error::other)? else {
            continue;
        };
        let mut length = 0;
        let mut kept = Vec::with_capacity(parsed.headers.len());
        for header in parsed.headers.iter() {
            let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(io::Error::other)?;
            if name == http::header::CONTENT_LENGTH {
                length = std::str::from_utf8(header.value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            if name != http::header::CONNECTION && name.as_str() != "keep-alive" {
                kept.push((name, HeaderValue::from_bytes(header.value).map_err(io::Error::other)?));
            }
        }
        let status = parsed.code.unwrap_or(502);
        let _ = buffer.split_to(head_len);
        while buffer.len() < length {
            if socket.read_buf(&mut buffer).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        SOCKETS.with(|s| s.borrow_mut().push(socket));
        return Ok(Answer { status, headers: kept, body: buffer.split_to(length).freeze() });
    }
}

/// No hyper: read a request head, exchange with the upstream, write the answer.
async fn serve_by_hand(mut stream: TcpStream, upstream: String) {
    let mut input = BytesMut::with_capacity(4096);
    let mut output = BytesMut::with_capacity(4096);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&input) {
            Ok(httparse::Status::Complete(head_len)) => {
                let head = request_head(parsed.path.unwrap_or("/"), &upstream);
                let _ = input.split_to(head_len);
                let Ok(answer) = exchange(&upstream, &head).await else { return };
                output.clear();
                output.put_slice(b"HTTP/1.1 ");
                output.put_slice(answer.status.to_string().as_bytes());
                output.put_slice(b" \r\ncontent-length: ");
                output.put_slice(answer.body.len().to_string().as_bytes());
                for (name, value) in &answer.headers {
                    if name != http::header::CONTENT_LENGTH {
                        output.put_slice(b"\r\n");
                        output.put_slice(name.as_str().as_bytes());
                        output.put_slice(b": ");
                        output.put_slice(value.as_bytes());
                    }
                }
                output.put_slice(b"\r\n\r\n");
                output.put_slice(&answer.body);
                if stream.write_all(&output).await.is_err() {
                    return;
                }
            }
            Ok(httparse::Status::Partial) => {
                if !matches!(stream.read_buf(&mut input).await, Ok(n) if n > 0) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
