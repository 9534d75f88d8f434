//! Reading a request body as a stream: it is hashed and counted chunk by chunk,
//! and only its first 1 MiB is kept (for `received()` and JSON handlers).

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::encoding::hex;

/// How much of a body is kept.
pub(super) const KEPT_BYTES: usize = 1 << 20;

/// A body after it was read to its end (or until it failed).
pub(super) struct ReadBody {
    /// The first [`KEPT_BYTES`] bytes.
    pub prefix: Bytes,
    /// Every byte that arrived.
    pub len: u64,
    /// Lowercase hex SHA-256 of every byte that arrived.
    pub sha256: String,
    /// The body ended with an error (the client went away or broke framing).
    pub failed: bool,
    /// Trailer fields that followed the body (empty when none came).
    pub trailers: http::HeaderMap,
}

impl ReadBody {
    /// The whole body arrived and fits in `prefix`.
    pub fn complete(&self) -> bool {
        !self.failed && self.len == self.prefix.len() as u64
    }
}

/// Drains `body` frame by frame; memory use is bounded by [`KEPT_BYTES`].
pub(super) async fn read<B>(mut body: B) -> ReadBody
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut kept = BytesMut::new();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut failed = false;
    let mut trailers = http::HeaderMap::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        trailers.extend(frame.into_trailers().unwrap_or_default());
                        continue;
                    }
                };
                hasher.update(&data);
                len += data.len() as u64;
                let room = KEPT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..room.min(data.len())]);
            }
            Err(error) => {
                tracing::debug!(%error, "sandbox: request body failed");
                failed = true;
                break;
            }
        }
    }
    ReadBody { prefix: kept.freeze(), len, sha256: hex(&hasher.finalize()), failed, trailers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn keeps_a_prefix_and_hashes_everything() {
        let big = vec![7u8; KEPT_BYTES + 10];
        let read = read(Full::new(Bytes::from(big.clone()))).await;
        assert_eq!(read.len, big.len() as u64);
        assert_eq!(read.prefix.len(), KEPT_BYTES);
        assert!(!read.complete());
        assert_eq!(read.sha256, hex(&Sha256::digest(&big)));
        let empty = super::read(Full::new(Bytes::new())).await;
        assert!(empty.complete());
    }
}
