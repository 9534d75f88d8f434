//! Reading the start of a body: whole when it fits a limit, else what was read
//! and the rest (for bodies the proxy may rewrite); and the time such a read may
//! take (in all, or between two pieces).

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

#[cfg(test)]
use super::budget::SLAB;
use super::budget::{Budget, Reservation, held};
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

/// The start of a body, read until it ends, passes `limit` bytes or finds
/// the thread's [`Budget`] spent. The bytes read are counted against the
/// budget until they are dropped.
pub enum BodyStart<B> {
    /// The whole body.
    Complete(Bytes),
    /// More than `limit` bytes: what was read, and the rest still to come.
    Over(Bytes, B),
    /// The budget could not hold the next piece: what was read, and the rest.
    Unbudgeted(Bytes, B),
}

/// Reads `body` whole if it fits in `limit` bytes (and in the budget).
/// Trailers are dropped.
pub async fn read_up_to<B>(mut body: B, limit: u64, budget: Budget) -> Result<BodyStart<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buffer = BytesMut::new();
    let mut reservation = budget.reserve();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            // The limit first: a body too large is `Over` (413, or streamed)
            // whatever the budget, never a 503 a retry could not mend.
            let over = (buffer.len() + data.len()) as u64 > limit;
            if over {
                reservation.force(data.len());
            } else if !reservation.grow(data.len()) {
                // This piece goes on uncounted, with what was read: the body streams from here.
                buffer.extend_from_slice(&data);
                return Ok(BodyStart::Unbudgeted(held(buffer.freeze(), reservation), body));
            }
            buffer.extend_from_slice(&data);
            if over {
                return Ok(BodyStart::Over(held(buffer.freeze(), reservation), body));
            }
        }
    }
    Ok(BodyStart::Complete(held(buffer.freeze(), reservation)))
}

/// Chunks of a body as they arrived. Room for two in place: a small answer
/// comes in one, and its read allocates nothing.
pub type Chunks = smallvec::SmallVec<[Bytes; 2]>;

/// The start of a body held as the chunks it arrived in (nothing copied),
/// each counted against the budget until it is dropped.
pub enum ChunkStart<B> {
    /// The whole body, and the body itself (ended).
    Complete(Chunks, B),
    /// More than `limit` bytes: what was read, and the rest still to come.
    Over(Chunks, B),
    /// The budget could not hold the next chunk: what was read, and the rest.
    Unbudgeted(Chunks, B),
    /// Still coming after the read's time: what was read, and the rest.
    Late(Chunks, B),
}

/// Chunks kept as they came whatever their size; past this many, small ones
/// are gathered into one buffer. A body sent one byte per chunk would
/// otherwise cost a `Bytes` (and the read buffer it pins) per byte: tens of
/// MiB for a 1 MiB answer.
const KEPT_CHUNKS: usize = 16;

/// A chunk at least this large is always kept as it came (no copy): at most
/// `limit / SMALL_CHUNK` of them fit in a body read whole.
const SMALL_CHUNK: usize = 4 * 1024;

/// Why a read gave no start of the body.
#[derive(Debug)]
pub enum Unread<E> {
    /// The body failed.
    Failed(E),
    /// No piece came for the read's `time`.
    Quiet,
}

/// Reads `body` as chunks until it ends or passes `limit` bytes (or finds the
/// budget spent): the first [`KEPT_CHUNKS`], and any of [`SMALL_CHUNK`] or
/// more, as they came (nothing copied); smaller ones after those gathered in
/// order. Trailers are dropped.
///
/// `time` bounds the read two ways. No piece for that long is a body that
/// stopped ([`Unread::Quiet`], as nginx's `proxy_read_timeout` counts between
/// two reads); a piece that comes after that long in all ends the read
/// ([`ChunkStart::Late`]: a body slow but steady is not lost, and is not held
/// back from its caller either). As with [`within`], a piece that is there at
/// once arms no timer and reads no clock.
pub async fn read_chunks<B>(
    mut body: B,
    limit: u64,
    budget: Budget,
    time: Duration,
) -> Result<ChunkStart<B>, Unread<B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut chunks = Chunks::new();
    let mut gathered = BytesMut::new();
    // Counts what is gathered; each chunk kept as it came carries its own part.
    let mut reservation = budget.reserve();
    let mut total = 0u64;
    let finish = |mut chunks: Chunks, gathered: BytesMut, reservation: Reservation| {
        if !gathered.is_empty() {
            chunks.push(held(gathered.freeze(), reservation));
        }
        chunks
    };
    // What was gathered goes out as one chunk before a chunk kept whole.
    let flush = |chunks: &mut Chunks, gathered: &mut BytesMut, reservation: &mut Reservation| {
        if !gathered.is_empty() {
            let own = reservation.split(gathered.len());
            chunks.push(held(gathered.split().freeze(), own));
        }
    };
    // When the read first waited: its time counts from there.
    let mut waited_from = None;
    while !body.is_end_stream() {
        let mut next = pin!(body.frame());
        let frame = match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                waited_from.get_or_insert_with(tokio::time::Instant::now);
                tokio::time::timeout(time, next).await.map_err(|_| Unread::Quiet)?
            }
        };
        let Some(frame) = frame else { break };
        if let Ok(data) = frame.map_err(Unread::Failed)?.into_data() {
            // The limit first, as in `read_up_to`.
            if total + data.len() as u64 > limit {
                reservation.force(data.len());
            } else if !reservation.grow(data.len()) {
                // This chunk goes on uncounted, after what was read: the body streams from here.
                let mut chunks = finish(chunks, gathered, reservation);
                chunks.push(data);
                return Ok(ChunkStart::Unbudgeted(chunks, body));
            }
            total += data.len() as u64;
            if chunks.len() < KEPT_CHUNKS || data.len() >= SMALL_CHUNK {
                flush(&mut chunks, &mut gathered, &mut reservation);
                let own = reservation.split(data.len());
                chunks.push(held(data, own));
            } else {
                gathered.extend_from_slice(&data);
            }
            if total > limit {
                return Ok(ChunkStart::Over(finish(chunks, gathered, reservation), body));
            }
            if waited_from.is_some_and(|from| from.elapsed() >= time) && !body.is_end_stream() {
                return Ok(ChunkStart::Late(finish(chunks, gathered, reservation), body));
            }
        }
    }
    Ok(ChunkStart::Complete(finish(chunks, gathered, reservation), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No quiet limit that a test's in-memory body could meet.
    const FOREVER: Duration = Duration::from_secs(3600);

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
        let Ok(ChunkStart::Complete(chunks, _)) =
            read_chunks(trickle(10_000), 1 << 20, Budget::unlimited(), FOREVER).await
        else {
            panic!("the whole body fits");
        };
        assert_eq!(chunks.len(), KEPT_CHUNKS + 1, "the first as they came, the rest gathered");
        assert_eq!(chunks.concat(), vec![b'x'; 10_000]);
        let Ok(ChunkStart::Over(chunks, _)) =
            read_chunks(trickle(10_000), 5_000, Budget::unlimited(), FOREVER).await
        else {
            panic!("past the limit");
        };
        assert_eq!(chunks.len(), KEPT_CHUNKS + 1);
        assert_eq!(chunks.concat().len(), 5_001, "read until one past the limit");
        let Ok(ChunkStart::Complete(chunks, _)) =
            read_chunks(trickle(3), 10, Budget::unlimited(), FOREVER).await
        else {
            panic!("fits")
        };
        assert_eq!(chunks.len(), 3, "a few chunks are kept as they came");
    }

    /// Ten frames of a quarter slab each, the first all `0`, the next all `1`, ...
    fn counting() -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        http_body_util::StreamBody::new(futures_util::stream::iter(
            (0..10u8).map(|i| Ok(http_body::Frame::data(Bytes::from(vec![i; SLAB / 4])))),
        ))
    }

    #[tokio::test]
    async fn a_read_that_finds_the_budget_spent_midway_loses_no_byte_and_gives_all_back() {
        let whole: Vec<u8> = (0..10u8).flat_map(|i| vec![i; SLAB / 4]).collect();
        // Room for two slabs: the ninth frame does not fit.
        let budget = Budget::alone(2 * SLAB as u64);
        let Ok(BodyStart::Unbudgeted(prefix, rest)) = read_up_to(counting(), 1 << 20, budget).await else {
            panic!("no room past two slabs");
        };
        assert_eq!(
            budget.used_here(),
            2 * SLAB,
            "what was read is counted, the piece that did not fit is not"
        );
        let rest = rest.collect().await.expect("the rest").to_bytes();
        assert_eq!([prefix, rest].concat(), whole, "every byte, in order");
        assert_eq!(budget.used_here(), 0, "all given back");

        let Ok(ChunkStart::Unbudgeted(chunks, rest)) =
            read_chunks(counting(), 1 << 20, budget, FOREVER).await
        else {
            panic!("no room past two slabs");
        };
        assert_eq!(budget.used_here(), 2 * SLAB);
        let rest = rest.collect().await.expect("the rest").to_bytes();
        assert_eq!([chunks.concat(), rest.to_vec()].concat(), whole, "every byte, in order");
        drop(chunks);
        assert_eq!(budget.used_here(), 0, "all given back");
    }

    #[tokio::test]
    async fn a_body_over_its_limit_is_over_whatever_the_budget() {
        // A total exactly the limit: the read that crosses the limit is
        // `Over`, not `Unbudgeted`.
        let budget = Budget::alone(SLAB as u64);
        let limit = SLAB as u64;
        let Ok(BodyStart::Over(prefix, _)) = read_up_to(counting(), limit, budget).await else {
            panic!("over")
        };
        assert_eq!(prefix.len(), SLAB + SLAB / 4);
        drop(prefix);
        assert_eq!(budget.used_here(), 0);
        let Ok(ChunkStart::Over(chunks, _)) = read_chunks(counting(), limit, budget, FOREVER).await else {
            panic!("over")
        };
        assert_eq!(chunks.concat().len(), SLAB + SLAB / 4);
        drop(chunks);
        assert_eq!(budget.used_here(), 0);
    }

    #[tokio::test]
    async fn large_chunks_past_the_first_are_kept_as_they_came_and_small_ones_around_them_in_order() {
        // 20 one-byte chunks, one of 5,000 bytes, 3 one-byte chunks.
        let pieces: Vec<Bytes> = (0..20u8)
            .map(|i| Bytes::from(vec![i]))
            .chain([Bytes::from(vec![b'L'; 5_000])])
            .chain((0..3u8).map(|i| Bytes::from(vec![100 + i])))
            .collect();
        let whole: Vec<u8> = pieces.concat();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(
            pieces.into_iter().map(|piece| Ok::<_, std::convert::Infallible>(http_body::Frame::data(piece))),
        ));
        let Ok(ChunkStart::Complete(chunks, _)) =
            read_chunks(body, 1 << 20, Budget::unlimited(), FOREVER).await
        else {
            panic!("fits");
        };
        let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [vec![1; KEPT_CHUNKS], vec![4, 5_000, 3]].concat());
        assert_eq!(chunks.concat(), whole, "in order");
    }

    /// Ten one-byte pieces, each `gap` after the last.
    fn paced(gap: Duration) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let pieces = futures_util::stream::unfold(0u8, move |sent| async move {
            if sent == 10 {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok(http_body::Frame::data(Bytes::from(vec![b'0' + sent]))), sent + 1))
        });
        http_body_util::StreamBody::new(Box::pin(pieces))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_is_late_and_one_that_stops_is_given_up() {
        let time = Duration::from_secs(5);
        // A piece every 4 s, within 5 s of each other: the read ends at the
        // first piece past 5 s in all, with the rest still to come.
        let began = tokio::time::Instant::now();
        let Ok(ChunkStart::Late(chunks, rest)) =
            read_chunks(paced(Duration::from_secs(4)), 1 << 20, Budget::unlimited(), time).await
        else {
            panic!("a body still coming after its time is late");
        };
        assert_eq!(chunks.concat(), b"01");
        assert_eq!(began.elapsed(), Duration::from_secs(8));
        let rest = rest.collect().await.expect("the rest").to_bytes();
        assert_eq!(rest, &b"23456789"[..], "nothing lost");
        // Ten pieces 400 ms apart: whole within its time.
        let Ok(ChunkStart::Complete(chunks, _)) =
            read_chunks(paced(Duration::from_millis(400)), 1 << 20, Budget::unlimited(), time).await
        else {
            panic!("whole in 4 s");
        };
        assert_eq!(chunks.concat(), b"0123456789");
        // 6 s before its first piece: given up at 5 s.
        let began = tokio::time::Instant::now();
        let stopped = read_chunks(paced(Duration::from_secs(6)), 1 << 20, Budget::unlimited(), time).await;
        assert!(matches!(stopped, Err(Unread::Quiet)));
        assert_eq!(began.elapsed(), time, "given up at its time");
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
