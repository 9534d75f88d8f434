//! Which bodies the rewriters read: content types ([`Kind`]), content codings
//! ([`Encoding`]), and decoding gzip or deflate within a limit ([`decode`]).

use std::borrow::Cow;
use std::io::Read;

use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};

/// What a body is, for rewriting purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    Form,
}

/// How Tallyfy's Laravel reads a request body. A form when its essence (up to
/// `;`, `,` or a space, any case, as PHP fills `$_POST`) is
/// `application/x-www-form-urlencoded`, unless the content type also says
/// `/json` or `+json` (`Request::isJson`, which is case-sensitive: such a form
/// is read as JSON). Any other that says `/json` or `+json`, in any case
/// (`text/json`, `application/vnd.api+json`), is JSON: a superset of
/// `isJson`, since a body read as JSON that Laravel leaves unread is only
/// rewritten in vain.
pub fn kind(headers: &HeaderMap) -> Option<Kind> {
    let value = headers.get(CONTENT_TYPE)?.as_bytes().trim_ascii();
    let says_json = |any_case: bool| says_json(value, any_case);
    let essence = &value[..value.iter().position(|b| b";, ".contains(b)).unwrap_or(value.len())];
    // The usual answer (`application/json; charset=utf-8`) is told by its
    // essence alone, without a look at every window of its parameters.
    let tail = essence.last_chunk::<5>();
    if tail.is_some_and(|tail| tail.eq_ignore_ascii_case(b"/json") || tail.eq_ignore_ascii_case(b"+json")) {
        return Some(Kind::Json);
    }
    if essence.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
        Some(if says_json(false) { Kind::Json } else { Kind::Form })
    } else {
        says_json(true).then_some(Kind::Json)
    }
}

/// Whether a content type says `/json` or `+json` anywhere (Laravel's
/// `isJson` reads it case-sensitively).
fn says_json(value: &[u8], any_case: bool) -> bool {
    value.windows(b"/json".len()).any(|window| {
        [b"/json", b"+json"]
            .iter()
            .any(|json| if any_case { window.eq_ignore_ascii_case(*json) } else { window == *json })
    })
}

/// [`kind`] for a request sent as `method`. Symfony (`Request::createFromGlobals`)
/// also reads a `PUT`, `PATCH` or `DELETE` body as a form when its content
/// type only starts with `application/x-www-form-urlencoded` (`str_starts_with`:
/// case as written), where PHP fills `$_POST` for an exact essence alone.
/// Such a form is JSON only as `isJson` says (case-sensitively), as for a
/// form known by its essence.
pub fn request_kind(method: &http::Method, headers: &HeaderMap) -> Option<Kind> {
    if matches!(*method, http::Method::PUT | http::Method::PATCH | http::Method::DELETE)
        && let Some(value) = headers.get(CONTENT_TYPE).map(|value| value.as_bytes().trim_ascii())
        && value.starts_with(b"application/x-www-form-urlencoded")
    {
        return Some(if says_json(value, false) { Kind::Json } else { Kind::Form });
    }
    kind(headers)
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

/// A decoded body, or why not. An uncompressed body is borrowed, not copied.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Whole(Cow<'a, [u8]>),
    /// It inflates past the limit: here are its first `limit` bytes.
    TooLarge(Cow<'a, [u8]>),
    /// Not valid for its encoding (or cut off): what could be decoded.
    Corrupt(Vec<u8>),
}

impl Decoded<'_> {
    /// The bytes decoded, whole or not.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Decoded::Whole(bytes) | Decoded::TooLarge(bytes) => bytes,
            Decoded::Corrupt(bytes) => bytes,
        }
    }
}

/// A deflate stream read whole (`n` bytes out of `consumed` in) must be all of
/// `bytes`: bytes after its end make the body corrupt, as bytes after a gzip
/// member do, so a body rewritten from its stream never drops them.
fn ended_there(n: usize, consumed: u64, bytes: &[u8], limit: u64) -> std::io::Result<usize> {
    if n as u64 <= limit && consumed < bytes.len() as u64 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bytes after the deflate stream"));
    }
    Ok(n)
}

/// Decodes `bytes`, never inflating past `limit` bytes (a zip bomb is
/// [`Decoded::TooLarge`]). A cut-off input (the start of a larger body) decodes
/// as far as it goes, as [`Decoded::Corrupt`].
pub fn decode(bytes: &[u8], encoding: Encoding, limit: u64) -> Decoded<'_> {
    let mut out = Vec::new();
    let read = match encoding {
        Encoding::Identity => {
            return match usize::try_from(limit) {
                Ok(limit) if bytes.len() > limit => Decoded::TooLarge(Cow::Borrowed(&bytes[..limit])),
                _ => Decoded::Whole(Cow::Borrowed(bytes)),
            };
        }
        // Several gzip members in a row are one body (RFC 1952).
        Encoding::Gzip => flate2::read::MultiGzDecoder::new(bytes).take(limit + 1).read_to_end(&mut out),
        // "deflate" is zlib-wrapped per RFC 9110, though some senders use raw deflate.
        // Read as raw deflate only when zlib fails; when both fail, what
        // decoded furthest is kept (a zlib stream cut off is the start of a
        // larger body, whose dates must still be seen).
        Encoding::Deflate => {
            let mut zlib = flate2::read::ZlibDecoder::new(bytes);
            match zlib.by_ref().take(limit + 1).read_to_end(&mut out) {
                Ok(n) => ended_there(n, zlib.total_in(), bytes, limit),
                Err(zlib_error) => {
                    let mut raw_out = Vec::new();
                    let mut raw = flate2::read::DeflateDecoder::new(bytes);
                    let read = raw.by_ref().take(limit + 1).read_to_end(&mut raw_out);
                    let read = read.and_then(|n| ended_there(n, raw.total_in(), bytes, limit));
                    if read.is_ok() || raw_out.len() > out.len() {
                        out = raw_out;
                        read
                    } else {
                        Err(zlib_error)
                    }
                }
            }
        }
    };
    match read {
        Ok(_) if out.len() as u64 > limit => {
            out.truncate(limit as usize);
            Decoded::TooLarge(Cow::Owned(out))
        }
        Ok(_) => Decoded::Whole(Cow::Owned(out)),
        Err(_) => Decoded::Corrupt(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::io::Write;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn content_types_are_classified_as_laravel_reads_them() {
        assert_eq!(kind(&headers(&[("content-type", "application/json; charset=utf-8")])), Some(Kind::Json));
        assert_eq!(kind(&headers(&[("content-type", "application/vnd.api+json")])), Some(Kind::Json));
        assert_eq!(
            kind(&headers(&[("content-type", "application/x-www-form-urlencoded")])),
            Some(Kind::Form)
        );
        assert_eq!(kind(&headers(&[("content-type", "multipart/form-data; boundary=x")])), None);
        assert_eq!(kind(&headers(&[])), None);
        assert_eq!(kind(&headers(&[("content-type", " Application/JSON ;q")])), Some(Kind::Json), "any case");
        assert_eq!(kind(&headers(&[("content-type", "APPLICATION/Problem+JSON")])), Some(Kind::Json));
        // Whatever Laravel's `isJson` reads as JSON.
        assert_eq!(kind(&headers(&[("content-type", "text/json")])), Some(Kind::Json));
        assert_eq!(kind(&headers(&[("content-type", "text/json+json")])), Some(Kind::Json));
        assert_eq!(kind(&headers(&[("content-type", "application/jsonx")])), Some(Kind::Json));
        assert_eq!(
            kind(&headers(&[("content-type", "application/x-www-form-urlencoded; x=/json")])),
            Some(Kind::Json),
            "Laravel reads it as JSON"
        );
        assert_eq!(
            kind(&headers(&[("content-type", "application/x-www-form-urlencoded; charset=/JSON")])),
            Some(Kind::Form),
            "but only as isJson says, case-sensitively"
        );
        assert_eq!(
            kind(&headers(&[("content-type", "application/x-www-form-urlencoded,text/plain")])),
            Some(Kind::Form),
            "the essence ends at a comma, as PHP reads it"
        );
        assert_eq!(kind(&headers(&[("content-type", "text/plain")])), None);
        assert_eq!(kind(&headers(&[("content-type", "application/x-www-form-urlencodedx")])), None);
    }

    #[test]
    fn symfony_reads_a_put_patch_or_delete_form_by_the_start_of_its_type() {
        use http::Method;
        let odd = headers(&[("content-type", "application/x-www-form-urlencodedx")]);
        for method in [Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(request_kind(&method, &odd), Some(Kind::Form), "{method}");
        }
        assert_eq!(request_kind(&Method::POST, &odd), None, "PHP's $_POST wants the essence");
        let upper = headers(&[("content-type", "APPLICATION/X-WWW-FORM-URLENCODEDX")]);
        assert_eq!(request_kind(&Method::PUT, &upper), None, "str_starts_with is case-sensitive");
        let json = headers(&[("content-type", "application/x-www-form-urlencodedx/json")]);
        assert_eq!(request_kind(&Method::PUT, &json), Some(Kind::Json), "isJson first");
        for upper in ["application/x-www-form-urlencodedx/JSON", "application/x-www-form-urlencoded-v2+JSON"]
        {
            let upper = headers(&[("content-type", upper)]);
            assert_eq!(request_kind(&Method::PATCH, &upper), Some(Kind::Form), "isJson is case-sensitive");
        }
        let plain = headers(&[("content-type", "application/x-www-form-urlencoded; charset=utf-8")]);
        assert_eq!(request_kind(&Method::GET, &plain), Some(Kind::Form));
    }

    #[test]
    fn gzip_and_deflate_decode_within_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"deadline\":\"x\"}").expect("write");
        let gz = gz.finish().expect("finish");
        assert_eq!(decode(&gz, Encoding::Gzip, 100).bytes(), b"{\"deadline\":\"x\"}");
        assert!(matches!(decode(&gz, Encoding::Gzip, 100), Decoded::Whole(Cow::Owned(_))));
        let over = decode(&gz, Encoding::Gzip, 5);
        assert!(matches!(over, Decoded::TooLarge(_)), "over the limit");
        assert_eq!(over.bytes(), b"{\"dea");
        assert!(matches!(decode(&gz[..gz.len() - 9], Encoding::Gzip, 100), Decoded::Corrupt(_)), "cut off");
        let twice = [gz.clone(), gz].concat();
        let Decoded::Whole(both) = decode(&twice, Encoding::Gzip, 100) else { panic!("two members") };
        assert_eq!(both.len(), 32, "every gzip member is decoded");
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(b"abc").expect("write");
        let zlib = zlib.finish().expect("finish");
        assert!(matches!(decode(&zlib, Encoding::Deflate, 100), Decoded::Whole(abc) if *abc == *b"abc"));
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(b"abc").expect("write");
        let raw = raw.finish().expect("finish");
        assert!(matches!(decode(&raw, Encoding::Deflate, 100), Decoded::Whole(abc) if *abc == *b"abc"));
        // Cut off (the start of a larger body): as far as it goes, zlib or raw.
        let mut stored = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::none());
        stored.write_all(&[b"deadline=2025-07-15&pad=".as_slice(), &[b'a'; 3000]].concat()).expect("write");
        let stored = stored.finish().expect("finish");
        let Decoded::Corrupt(start) = decode(&stored[..1000], Encoding::Deflate, 10_000) else {
            panic!("cut off")
        };
        assert!(start.starts_with(b"deadline=2025-07-15&pad=aaa"), "{:?}", String::from_utf8_lossy(&start));
        let Decoded::Corrupt(start) = decode(&raw[..raw.len() - 1], Encoding::Deflate, 100) else {
            panic!("cut off")
        };
        assert!(b"abc".starts_with(&start));
        // Bytes after the stream: corrupt (the body then goes as it came), never dropped.
        for stream in [&zlib, &raw] {
            let trailed = [stream.as_slice(), b"&deadline=2025-03-04"].concat();
            assert!(matches!(decode(&trailed, Encoding::Deflate, 100), Decoded::Corrupt(_)));
            assert!(matches!(decode(&trailed, Encoding::Deflate, 2), Decoded::TooLarge(_)), "over first");
        }
        assert!(
            matches!(decode(b"abc", Encoding::Identity, 3), Decoded::Whole(Cow::Borrowed(b"abc"))),
            "not copied"
        );
        assert!(matches!(decode(b"abcd", Encoding::Identity, 3), Decoded::TooLarge(Cow::Borrowed(b"abc"))));
        assert_eq!(encoding(&headers(&[("content-encoding", "br")])), None);
        assert_eq!(encoding(&headers(&[("content-encoding", "GZIP")])), Some(Encoding::Gzip));
    }
}
