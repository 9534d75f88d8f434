//! Reading the start of a body: whole when it fits a limit, else what was read
//! and the rest (for bodies the proxy may rewrite); and the time such a read may
//! take.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

/// `read` bounded by `limit`, or `None` when it took longer. The timer is armed
/// only when `read` is not done on its first poll: a body that came with its
/// head, the usual case, costs no clock read and no timer.
pub async fn within<F: Future>(limit: Duration, read: F) -> Option<F::Output> {
    let mut read = pin!(read);
    let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(done) => Some(done),
        Poll::Pending => tokio::time::timeout(limit, read).await.ok(),
    }
}

/// The start of a body, read until it ends or passes `limit` bytes.
pub enum BodyStart<B> {
    /// The whole body.
    Complete(Bytes),
    /// More than `limit` bytes: what was read, and the rest still to come.
    Over(Bytes, B),
}

/// Reads `body` whole if it fits in `limit` bytes. Trailers are dropped.
pub async fn read_up_to<B>(mut body: B, limit: u64) -> Result<BodyStart<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buffer.extend_from_slice(&data);
            if buffer.len() as u64 > limit {
                return Ok(BodyStart::Over(buffer.freeze(), body));
            }
        }
    }
    Ok(BodyStart::Complete(buffer.freeze()))
}

/// Chunks of a body as they arrived. Room for two in place: a small answer
/// comes in one, and its read allocates nothing.
pub type Chunks = smallvec::SmallVec<[Bytes; 2]>;

/// The start of a body held as the chunks it arrived in (nothing copied).
pub enum ChunkStart<B> {
    /// The whole body, and the body itself (ended).
    Complete(Chunks, B),
    /// More than `limit` bytes: what was read, and the rest still to come.
    Over(Chunks, B),
}

/// Chunks kept as they came; past this many, the rest is gathered into one
/// buffer. A body sent one byte per chunk would otherwise cost a `Bytes` (and
/// the read buffer it pins) per byte: tens of MiB for a 1 MiB answer.
const KEPT_CHUNKS: usize = 16;

/// Reads `body` as chunks until it ends or passes `limit` bytes: the first
/// [`KEPT_CHUNKS`] as they came (nothing copied), any others gathered after
/// them in one. Trailers are dropped.
pub async fn read_chunks<B>(mut body: B, limit: u64) -> Result<ChunkStart<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut chunks = Chunks::new();
    let mut gathered = BytesMut::new();
    let mut total = 0u64;
    let finish = |mut chunks: Chunks, gathered: BytesMut| {
        if !gathered.is_empty() {
            chunks.push(gathered.freeze());
        }
        chunks
    };
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            if chunks.len() < KEPT_CHUNKS {
                chunks.push(data);
            } else {
                gathered.extend_from_slice(&data);
            }
            if total > limit {
                return Ok(ChunkStart::Over(finish(chunks, gathered), body));
            }
        }
    }
    Ok(ChunkStart::Complete(finish(chunks, gathered), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pieces` one-byte frames of `x`.
    fn trickle(
        pieces: usize,
    ) -> http_body_util::StreamBody<
        impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>> + Unpin,
    > {
        http_body_util::StreamBody::new(futures_util::stream::iter(
            (0..pieces).map(|_| Ok(http_body::Frame::data(Bytes::from_static(b"x")))),
        ))
    }

    #[tokio::test]
    async fn a_body_in_tiny_chunks_is_held_in_a_few() {
        let Ok(ChunkStart::Complete(chunks, _)) = read_chunks(trickle(10_000), 1 << 20).await else {
            panic!("the whole body fits");
        };
        assert_eq!(chunks.len(), KEPT_CHUNKS + 1, "the first as they came, the rest gathered");
        assert_eq!(chunks.concat(), vec![b'x'; 10_000]);
        let Ok(ChunkStart::Over(chunks, _)) = read_chunks(trickle(10_000), 5_000).await else {
            panic!("past the limit");
        };
        assert_eq!(chunks.len(), KEPT_CHUNKS + 1);
        assert_eq!(chunks.concat().len(), 5_001, "read until one past the limit");
        let Ok(ChunkStart::Complete(chunks, _)) = read_chunks(trickle(3), 10).await else { panic!("fits") };
        assert_eq!(chunks.len(), 3, "a few chunks are kept as they came");
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_done_at_once_is_returned_and_a_late_one_is_cut_at_its_limit() {
        let began = tokio::time::Instant::now();
        assert_eq!(within(Duration::from_secs(5), async { 7 }).await, Some(7));
        let late = async {
            tokio::time::sleep(Duration::from_secs(9)).await;
            7
        };
        assert_eq!(within(Duration::from_secs(5), late).await, None);
        assert_eq!(began.elapsed(), Duration::from_secs(5), "cut at its limit, counted from the first poll");
        let slow = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            8
        };
        assert_eq!(within(Duration::from_secs(5), slow).await, Some(8));
        assert_eq!(began.elapsed(), Duration::from_secs(9));
    }
}
