//! Reading the start of a body: whole when it fits a limit, else what was read
//! and the rest (for bodies the proxy may rewrite).

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

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

/// The start of a body held as the chunks it arrived in (nothing copied).
pub enum ChunkStart<B> {
    /// The whole body, and the body itself (ended).
    Complete(Vec<Bytes>, B),
    /// More than `limit` bytes: what was read, and the rest still to come.
    Over(Vec<Bytes>, B),
}

/// Reads `body` as chunks until it ends or passes `limit` bytes. Trailers are dropped.
pub async fn read_chunks<B>(mut body: B, limit: u64) -> Result<ChunkStart<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut chunks = Vec::new();
    let mut total = 0u64;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            chunks.push(data);
            if total > limit {
                return Ok(ChunkStart::Over(chunks, body));
            }
        }
    }
    Ok(ChunkStart::Complete(chunks, body))
}
