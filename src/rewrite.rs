//! Body plumbing for the rewriters in [`crate::dates`] and [`crate::links`]:
//! which bodies qualify (content type, encoding), reading a bounded prefix,
//! gzip/deflate decoding, and [`Prefixed`], a body that replays what was read
//! before streaming the rest.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

/// What a body is, for rewriting purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    Form,
}

/// `application/json`, `application/*+json` or `application/x-www-form-urlencoded`.
pub fn kind(headers: &HeaderMap) -> Option<Kind> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Some(Kind::Json)
    } else if essence == "application/x-www-form-urlencoded" {
        Some(Kind::Form)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

/// The body's `Content-Encoding`, or `None` for one the proxy cannot decode
/// (which then passes untouched).
pub fn encoding(headers: &HeaderMap) -> Option<Encoding> {
    let mut values = headers.get_all(CONTENT_ENCODING).iter();
    let Some(value) = values.next() else { return Some(Encoding::Identity) };
    if values.next().is_some() {
        return None; // stacked encodings: leave alone
    }
    match value.to_str().ok()?.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Some(Encoding::Identity),
        "gzip" | "x-gzip" => Some(Encoding::Gzip),
        "deflate" => Some(Encoding::Deflate),
        _ => None,
    }
}

/// A decoded body, or why not.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Whole(Vec<u8>),
    /// It inflates past the limit: here are its first `limit` bytes.
    TooLarge(Vec<u8>),
    /// Not valid for its encoding (or cut off): what could be decoded.
    Corrupt(Vec<u8>),
}

/// Decodes `bytes`, never inflating past `limit` bytes (a zip bomb is
/// [`Decoded::TooLarge`]). A cut-off input (the start of a larger body) decodes
/// as far as it goes, as [`Decoded::Corrupt`].
pub fn decode(bytes: &[u8], encoding: Encoding, limit: u64) -> Decoded {
    let mut out = Vec::new();
    let read = match encoding {
        Encoding::Identity => {
            return if bytes.len() as u64 > limit {
                Decoded::TooLarge(bytes[..limit as usize].to_vec())
            } else {
                Decoded::Whole(bytes.to_vec())
            };
        }
        // Several gzip members in a row are one body (RFC 1952).
        Encoding::Gzip => flate2::read::MultiGzDecoder::new(bytes).take(limit + 1).read_to_end(&mut out),
        // "deflate" is zlib-wrapped per RFC 9110, though some senders use raw deflate.
        Encoding::Deflate => {
            match flate2::read::ZlibDecoder::new(bytes).take(limit + 1).read_to_end(&mut out) {
                Ok(n) => Ok(n),
                Err(_) => {
                    out.clear();
                    flate2::read::DeflateDecoder::new(bytes).take(limit + 1).read_to_end(&mut out)
                }
            }
        }
    };
    match read {
        Ok(_) if out.len() as u64 > limit => {
            out.truncate(limit as usize);
            Decoded::TooLarge(out)
        }
        Ok(_) => Decoded::Whole(out),
        Err(_) => Decoded::Corrupt(out),
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

pin_project! {
    /// A body that yields `prefix` (one chunk or several) first, then the rest of `inner`.
    pub struct Prefixed<B> {
        first: Option<Bytes>,
        rest: std::vec::IntoIter<Bytes>,
        #[pin]
        inner: B,
    }
}

impl<B> Prefixed<B> {
    pub fn new(prefix: Option<Bytes>, inner: B) -> Self {
        Prefixed { first: prefix.filter(|p| !p.is_empty()), rest: Vec::new().into_iter(), inner }
    }

    /// `chunks` in order, then `inner`.
    pub fn chunks(chunks: Vec<Bytes>, inner: B) -> Self {
        Prefixed { first: None, rest: chunks.into_iter(), inner }
    }

    fn held(&self) -> u64 {
        self.first.as_ref().map_or(0, |f| f.len() as u64)
            + self.rest.as_slice().iter().map(|c| c.len() as u64).sum::<u64>()
    }
}

impl<B: Body<Data = Bytes>> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        for chunk in this.rest.by_ref() {
            if !chunk.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.as_slice().iter().all(Bytes::is_empty) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.held();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::Full;
    use std::io::Write;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn content_types_are_classified_by_essence() {
        assert_eq!(kind(&headers(&[("content-type", "application/json; charset=utf-8")])), Some(Kind::Json));
        assert_eq!(kind(&headers(&[("content-type", "application/vnd.api+json")])), Some(Kind::Json));
        assert_eq!(
            kind(&headers(&[("content-type", "application/x-www-form-urlencoded")])),
            Some(Kind::Form)
        );
        assert_eq!(kind(&headers(&[("content-type", "multipart/form-data; boundary=x")])), None);
        assert_eq!(kind(&headers(&[])), None);
    }

    #[test]
    fn gzip_and_deflate_decode_within_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"deadline\":\"x\"}").expect("write");
        let gz = gz.finish().expect("finish");
        assert_eq!(decode(&gz, Encoding::Gzip, 100), Decoded::Whole(b"{\"deadline\":\"x\"}".to_vec()));
        assert_eq!(decode(&gz, Encoding::Gzip, 5), Decoded::TooLarge(b"{\"dea".to_vec()), "over the limit");
        assert!(matches!(decode(&gz[..gz.len() - 9], Encoding::Gzip, 100), Decoded::Corrupt(_)), "cut off");
        let twice = [gz.clone(), gz].concat();
        let Decoded::Whole(both) = decode(&twice, Encoding::Gzip, 100) else { panic!("two members") };
        assert_eq!(both.len(), 32, "every gzip member is decoded");
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(b"abc").expect("write");
        assert_eq!(
            decode(&zlib.finish().expect("finish"), Encoding::Deflate, 100),
            Decoded::Whole(b"abc".to_vec())
        );
        assert_eq!(encoding(&headers(&[("content-encoding", "br")])), None);
        assert_eq!(encoding(&headers(&[("content-encoding", "GZIP")])), Some(Encoding::Gzip));
    }

    #[tokio::test]
    async fn a_read_prefix_is_replayed_before_the_rest() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        let BodyStart::Over(prefix, rest) = read_up_to(body, 3).await.expect("reads") else { panic!("over") };
        let whole = Prefixed::new(Some(prefix), rest).collect().await.expect("collects").to_bytes();
        assert_eq!(whole, "0123456789");
        let small = read_up_to(Full::new(Bytes::from_static(b"ab")), 3).await.expect("reads");
        assert!(matches!(small, BodyStart::Complete(b) if b == "ab"));
    }
}
