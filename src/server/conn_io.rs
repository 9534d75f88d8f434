//! The byte stream under hyper: replays the bytes the protocol sniff read, for
//! HTTP/1 keeps a copy of each request head as it arrives, and writes a small
//! response (head and body, which hyper hands over as separate buffers) with
//! one plain `write` instead of a `writev`.
//!
//! Why the copy: when a request carries both `Content-Length` and
//! `Transfer-Encoding`, hyper frames it by `Transfer-Encoding` and drops the
//! `Content-Length` before the service sees the request (RFC 9112 §6.3 allows
//! that). A front proxy that framed it by `Content-Length` would then disagree
//! with us about where the next request starts: the classic smuggling set-up.
//! Like nginx and Envoy, the proxy refuses such requests outright; the [`HeadTap`]
//! is how it can still see the `Content-Length` hyper removed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Capacity a cleared tap keeps for the next head; a larger buffer (after a
/// big head) is released.
const KEPT_CAPACITY: usize = 4 * 1024;

/// Small vectored writes (a response head and a small body, as hyper hands
/// them over) are gathered into one buffer and written with one plain `write`.
/// Measured on the load script's `GET` (a 700-byte answer), 18.1 → 17.5 µs of
/// CPU per request; hyper's own `writev(false)` did about as well, but keeps a
/// whole response's worth of buffer on every idle connection, where this copy
/// is bounded and shared by the thread.
const GATHER_MAX: usize = 4 * 1024;

thread_local! {
    /// Where small vectored writes are gathered (one per thread, reused).
    static GATHERED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A copy of the bytes an HTTP/1 connection read while waiting for a request
/// head: recording starts when the connection opens and whenever a response
/// has been sent, and stops when hyper hands the next request to the service.
/// So it holds the head of the request being dispatched (and possibly the start
/// of its body), never whole bodies. At most `cap` bytes are kept.
#[derive(Debug)]
pub(super) struct HeadTap {
    recording: AtomicBool,
    bytes: Mutex<Vec<u8>>,
    cap: usize,
}

impl HeadTap {
    pub fn new(cap: usize) -> HeadTap {
        HeadTap { recording: AtomicBool::new(true), bytes: Mutex::new(Vec::new()), cap }
    }

    fn record(&self, data: &[u8]) {
        if data.is_empty() || !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.cap.saturating_sub(bytes.len());
        bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The request head has been dispatched: stops recording, lets `inspect`
    /// look at what was recorded, and clears it.
    pub fn finish_head<R>(&self, inspect: impl FnOnce(&[u8]) -> R) -> R {
        self.recording.store(false, Ordering::Release);
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let result = inspect(&bytes);
        bytes.clear();
        if bytes.capacity() > KEPT_CAPACITY {
            *bytes = Vec::new();
        }
        result
    }

    /// The response has been sent: what arrives next is the next head.
    pub fn resume(&self) {
        self.recording.store(true, Ordering::Release);
    }
}

/// Whether `head` (the recorded bytes) holds a `Content-Length` field in the head
/// that starts with `request_line` (`METHOD SP target SP`); `None` when no such
/// head was recorded. Lines may end in CRLF or a bare LF, as hyper's parser
/// accepts.
pub(super) fn head_has_content_length(head: &[u8], request_line: &[u8]) -> Option<bool> {
    let start = memchr::memmem::find(head, request_line)?;
    let found = head[start..]
        .split(|&b| b == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.iter().position(|&b| b == b':').map(|colon| &line[..colon]))
        .any(|name| name.eq_ignore_ascii_case(b"content-length"));
    Some(found)
}

pin_project! {
    /// A connection's stream: `prefix` first (the sniffed bytes, with whatever
    /// `inner` already has behind them), then `inner`; reads are shown to the
    /// tap, writes pass straight through.
    pub(super) struct ConnIo<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
        tap: Option<Arc<HeadTap>>,
        // A read error met while handing over the sniffed bytes.
        deferred: Option<io::Error>,
    }
}

impl<S> ConnIo<S> {
    pub fn new(inner: S, prefix: Bytes, tap: Option<Arc<HeadTap>>) -> Self {
        ConnIo { prefix, inner, tap, deferred: None }
    }
}

impl<S: AsyncRead> AsyncRead for ConnIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            // The rest of the head is usually already here: hand it over in the
            // same read, so hyper parses the head at once instead of growing its
            // read buffer (8 KiB would become 16 KiB, for the connection's life)
            // to make room for a second read behind the sniffed bytes.
            if !this.prefix.has_remaining()
                && buf.remaining() > 0
                && let Poll::Ready(Err(error)) = this.inner.poll_read(cx, buf)
            {
                // The sniffed bytes go up now; the error with the next read.
                *this.deferred = Some(error);
            }
        } else if let Some(error) = this.deferred.take() {
            return Poll::Ready(Err(error));
        } else {
            ready!(this.inner.poll_read(cx, buf))?;
        }
        if let Some(tap) = this.tap {
            tap.record(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite> AsyncWrite for ConnIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = self.project().inner;
        if bufs.len() > 1 && bufs.iter().map(|buf| buf.len()).sum::<usize>() <= GATHER_MAX {
            return GATHERED.with_borrow_mut(|gathered| {
                gathered.clear();
                for buf in bufs {
                    gathered.extend_from_slice(buf);
                }
                inner.poll_write(cx, gathered)
            });
        }
        inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn content_length_is_found_in_the_dispatched_head_only() {
        let line = b"POST /api/x ";
        let both = b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH: 5\r\n\r\n0\r\n\r\n";
        assert_eq!(head_has_content_length(both, line), Some(true));
        let bare_lf = b"POST /api/x HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n";
        assert_eq!(head_has_content_length(bare_lf, line), Some(true));
        let body_only =
            b"POST /api/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\nContent-Length: 5\r\n";
        assert_eq!(head_has_content_length(body_only, line), Some(false), "a body line is not a header");
        assert_eq!(head_has_content_length(b"junk", line), None, "not recorded: unknown");
    }

    #[tokio::test]
    async fn the_prefix_is_replayed_and_heads_are_recorded_until_dispatched() {
        let (mut client, server) = tokio::io::duplex(256);
        let tap = Arc::new(HeadTap::new(1024));
        let mut io = ConnIo::new(server, Bytes::from_static(b"GE"), Some(tap.clone()));
        client.write_all(b"T / HTTP/1.1\r\n\r\n").await.expect("write");
        let mut read = vec![0u8; 18];
        io.read_exact(&mut read).await.expect("read");
        assert_eq!(read, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(tap.finish_head(<[u8]>::to_vec), b"GET / HTTP/1.1\r\n\r\n");
        client.write_all(b"body").await.expect("write");
        let mut body = [0u8; 4];
        io.read_exact(&mut body).await.expect("read");
        assert!(tap.finish_head(<[u8]>::is_empty), "body bytes are not recorded");
        tap.resume();
        client.write_all(b"NEXT").await.expect("write");
        io.read_exact(&mut body).await.expect("read");
        assert_eq!(tap.finish_head(<[u8]>::to_vec), b"NEXT");
    }

    #[tokio::test]
    async fn the_sniffed_bytes_and_what_followed_them_come_in_one_read() {
        let (mut client, server) = tokio::io::duplex(256);
        client.write_all(b"T /api HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
        let mut io = ConnIo::new(server, Bytes::from_static(b"GE"), None);
        let mut read = vec![0u8; 64];
        let n = io.read(&mut read).await.expect("read");
        assert_eq!(
            &read[..n],
            b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n",
            "one read: no second one to grow for"
        );
    }

    #[tokio::test]
    async fn a_read_error_behind_the_sniffed_bytes_comes_with_the_next_read() {
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        let mut io = ConnIo::new(Failing, Bytes::from_static(b"GET"), None);
        let mut read = [0u8; 16];
        assert_eq!(io.read(&mut read).await.expect("the sniffed bytes"), 3);
        assert_eq!(&read[..3], b"GET");
        let error = io.read(&mut read).await.expect_err("the error, not an end of stream");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Records each write it is given, and takes at most `limit` bytes of it.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(&'static str, Vec<u8>)>,
        limit: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.limit);
            self.writes.push(("write", data[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            let n = all.len().min(self.limit);
            self.writes.push(("writev", all[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_vectored_writes_go_out_as_one_write_and_large_ones_as_they_are() {
        let mut io = ConnIo::new(Recorder { limit: usize::MAX, ..Recorder::default() }, Bytes::new(), None);
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        let written =
            io.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(b"hello")]).await.expect("write");
        assert_eq!(written, head.len() + 5);
        let large = vec![b'x'; GATHER_MAX];
        let written =
            io.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(&large)]).await.expect("write");
        assert_eq!(written, head.len() + large.len());
        assert_eq!(io.write_vectored(&[io::IoSlice::new(b"alone")]).await.expect("write"), 5);
        let writes = &io.inner.writes;
        assert_eq!(writes[0], ("write", [&head[..], b"hello"].concat()), "head and body in one write");
        assert_eq!(writes[1], ("writev", [&head[..], &large[..]].concat()), "over the bound: untouched");
        assert_eq!(writes[2], ("writev", b"alone".to_vec()), "one buffer: untouched");
    }

    #[tokio::test]
    async fn a_gathered_write_that_goes_in_part_reports_the_part() {
        let mut io = ConnIo::new(Recorder { limit: 7, ..Recorder::default() }, Bytes::new(), None);
        let written =
            io.write_vectored(&[io::IoSlice::new(b"abcd"), io::IoSlice::new(b"efgh")]).await.expect("write");
        assert_eq!(written, 7, "as writev would: the first seven bytes across both buffers");
        assert_eq!(io.inner.writes, [("write", b"abcdefg".to_vec())]);
    }

    #[tokio::test]
    async fn the_tap_keeps_at_most_its_cap() {
        let (mut client, server) = tokio::io::duplex(256);
        let tap = Arc::new(HeadTap::new(4));
        let mut io = ConnIo::new(server, Bytes::new(), Some(tap.clone()));
        client.write_all(b"0123456789").await.expect("write");
        let mut read = [0u8; 10];
        io.read_exact(&mut read).await.expect("read");
        assert_eq!(tap.finish_head(<[u8]>::to_vec), b"0123");
    }
}
