//! The byte stream under hyper: replays the bytes the protocol sniff read, for
//! HTTP/1 shows every read to the connection's [`HeadTap`] (so a request's raw
//! head can be checked), and writes a small response (head and body, which
//! hyper hands over as separate buffers) with one plain `write` instead of a
//! `writev`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::head_tap::HeadTap;

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
        if let Some(tap) = this.tap
            && tap.is_over()
        {
            // What hyper holds of the next heads found no room in the budget.
            return Poll::Ready(Err(io::Error::other(super::head_tap::HeadsFull)));
        }
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
        if let Some(tap) = this.tap
            && let Err(full) = tap.record(&buf.filled()[before..])
        {
            // Ends the connection: no room for more of its unfinished head.
            return Poll::Ready(Err(io::Error::other(full)));
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
    use crate::server::head_tap::{Framing, RequestLine};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_replayed_and_every_read_is_shown_to_the_tap() {
        let (mut client, server) = tokio::io::duplex(256);
        let tap = Arc::new(HeadTap::new(1024, None));
        let mut io = ConnIo::new(server, Bytes::from_static(b"PO"), Some(tap.clone()));
        let rest = b"ST /api HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        client.write_all(rest).await.expect("write");
        let mut read = vec![0u8; rest.len() + 2];
        io.read_exact(&mut read).await.expect("read");
        assert!(read.starts_with(b"POST /api HTTP/1.1"));
        assert!(
            tap.finish_head(RequestLine { method: b"POST", target: b"/api" }, Framing::Chunked),
            "the sniffed bytes were recorded with the rest"
        );
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
}
