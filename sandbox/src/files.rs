//! File routes that prove streaming: an upload answered with the size and
//! SHA-256 of what arrived (the body was read chunk by chunk, never whole), and a
//! download of N deterministic bytes (byte i = i % 251) produced chunk by chunk.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::json;

use super::encoding::{query_param, random_hex};
use super::respond::{self, Reply};
use super::router::Call;

/// The largest download the sandbox serves.
const MAX_DOWNLOAD: u64 = 1 << 30;
const DEFAULT_DOWNLOAD: u64 = 1024;
const CHUNK: usize = 64 * 1024;
/// The pattern repeats every 251 bytes; this buffer holds whole periods, enough
/// for a chunk starting at any phase.
const PATTERN_LEN: usize = 251 * (CHUNK / 251 + 2);

/// `POST .../file`: 201 with what arrived.
pub(super) fn upload(call: &Call<'_>) -> Reply {
    respond::data(
        StatusCode::CREATED,
        json!({"id": random_hex(32), "size": call.body.len, "sha256": call.body.sha256}),
    )
}

/// `GET .../file/{id}/dl?bytes=N`: N (default 1 KiB, at most 1 GiB) pattern bytes.
pub(super) fn download(call: &Call<'_>, file_id: &str) -> Reply {
    let len = query_param(call.query(), "bytes")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(DEFAULT_DOWNLOAD)
        .min(MAX_DOWNLOAD);
    let mut body = PatternBody::new(len);
    // `trailers=1`: a trailer section after the bytes, holding fields no
    // caller of the proxy should ever see (HTTP/2 answers carry it).
    if query_param(call.query(), "trailers").is_some() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("set-cookie", HeaderValue::from_static("tallyfy_session=s3cr3t; path=/"));
        trailers.insert("x-request-id", HeaderValue::from_static("sandbox-trailer"));
        body.trailers = Some(trailers);
    }
    // `late_end=1`: the end is said apart from the last bytes (over HTTP/2, an
    // empty DATA frame with END_STREAM after them), as some servers send it.
    body.late_end = query_param(call.query(), "late_end").is_some();
    let mut response = Response::new(body.boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    let name = file_id.chars().filter(char::is_ascii_alphanumeric).take(64).collect::<String>();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.bin\"")) {
        headers.insert(CONTENT_DISPOSITION, value);
    }
    response
}

/// Byte `i` of a download.
pub(super) fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A body of `len` pattern bytes, served in [`CHUNK`]-sized zero-copy slices.
struct PatternBody {
    pattern: Bytes,
    sent: u64,
    len: u64,
    /// Sent after the bytes, once.
    trailers: Option<http::HeaderMap>,
    /// The body does not say it has ended until it is polled past its bytes.
    late_end: bool,
    ended: bool,
}

impl PatternBody {
    fn new(len: u64) -> PatternBody {
        let pattern: Vec<u8> = (0..PATTERN_LEN as u64).map(pattern_byte).collect();
        PatternBody {
            pattern: Bytes::from(pattern),
            sent: 0,
            len,
            trailers: None,
            late_end: false,
            ended: false,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let remaining = this.len - this.sent;
        if remaining == 0 {
            this.ended = this.trailers.is_none();
            return Poll::Ready(this.trailers.take().map(|trailers| Ok(Frame::trailers(trailers))));
        }
        let start = (this.sent % 251) as usize;
        let size = remaining.min(CHUNK as u64) as usize;
        this.sent += size as u64;
        Poll::Ready(Some(Ok(Frame::data(this.pattern.slice(start..start + size)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.len && self.trailers.is_none() && (!self.late_end || self.ended)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pattern_bodies_have_the_right_bytes() {
        let len = 3 * CHUNK as u64 + 7;
        let bytes = PatternBody::new(len).collect().await.expect("infallible").to_bytes();
        assert_eq!(bytes.len() as u64, len);
        assert!(bytes.iter().enumerate().all(|(i, b)| *b == pattern_byte(i as u64)));
        let empty = PatternBody::new(0).collect().await.expect("infallible").to_bytes();
        assert!(empty.is_empty());
    }
}
