//! Which protocol a plain connection speaks, read from its first bytes under a
//! deadline.
//!
//! HTTP/2 with prior knowledge (h2c) opens with a fixed 24-byte preface; anything
//! else is HTTP/1. The first byte that differs from the preface decides HTTP/1,
//! so an ordinary request costs one read. A peer that sends nothing, or stops
//! inside the preface (`P`, `PRI * HTTP/2.0\r\n`), is dropped when the deadline
//! passes: hyper-util's own sniffing has no timer.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// Reads until the protocol is known, within `deadline`. Returns it with the
/// bytes read so far (to be replayed to the HTTP server), or `None` when the
/// peer closed, failed or stayed silent.
pub(super) async fn sniff<S: AsyncRead + Unpin>(io: &mut S, deadline: Duration) -> Option<(Protocol, Bytes)> {
    let mut buf = [0u8; PREFACE.len()];
    let mut filled = 0;
    let decide = async {
        loop {
            let n = io.read(&mut buf[filled..]).await.ok()?;
            if n == 0 {
                return None;
            }
            filled += n;
            if buf[..filled] != PREFACE[..filled] {
                return Some(Protocol::Http1);
            }
            if filled == PREFACE.len() {
                return Some(Protocol::Http2);
            }
        }
    };
    let protocol = tokio::time::timeout(deadline, decide).await.ok().flatten()?;
    Some((protocol, Bytes::copy_from_slice(&buf[..filled])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniffed(bytes: &'static [u8]) -> Option<(Protocol, Bytes)> {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(bytes).await.expect("write");
        sniff(&mut server, Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn the_first_differing_byte_decides_http1() {
        let (protocol, prefix) = sniffed(b"GET / HTTP/1.1\r\n").await.expect("decided");
        assert_eq!(protocol, Protocol::Http1);
        assert!(b"GET / HTTP/1.1\r\n".starts_with(&prefix), "only bytes read are replayed");
        let (protocol, _) = sniffed(b"POST /x HTTP/1.1\r\n").await.expect("decided");
        assert_eq!(protocol, Protocol::Http1, "P then O is not the preface");
    }

    #[tokio::test]
    async fn the_whole_preface_is_http2() {
        let (protocol, prefix) = sniffed(PREFACE).await.expect("decided");
        assert_eq!((protocol, &prefix[..]), (Protocol::Http2, &PREFACE[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_or_a_stalled_preface_ends_at_the_deadline() {
        for start in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
            let (mut client, mut server) = tokio::io::duplex(64);
            client.write_all(start).await.expect("write");
            let began = tokio::time::Instant::now();
            assert_eq!(sniff(&mut server, Duration::from_secs(5)).await, None, "{start:?}");
            assert_eq!(began.elapsed(), Duration::from_secs(5), "{start:?}");
            drop(client);
        }
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_is_no_connection() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert_eq!(sniff(&mut server, Duration::from_secs(5)).await, None);
    }
}
