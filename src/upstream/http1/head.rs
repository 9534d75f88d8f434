//! Heads on the wire: the request head written to Tallyfy, and Tallyfy's
//! response head read with httparse, with how each body is delimited. Pure.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};

use super::decoder::{Chunked, Decoder, Malformed};

/// The most header fields a response head may carry (hyper's default).
const MAX_HEADERS: usize = 100;
/// The longest response head accepted (what hyper's client buffered at most).
pub const MAX_HEAD: usize = 8 * 1024 + 4 * 1024 * 100;

/// How a request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// No body.
    Nothing,
    /// `Content-Length`: exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Sets the headers that delimit a request body, the way hyper's client did:
/// an empty body sends nothing (and no `Transfer-Encoding`); a `Content-Length`
/// already in `headers` is kept and held to, even by a body that has already
/// ended (an HTTP/2 caller that reset its stream before sending the bytes it
/// announced: the send then fails before the head is written); a body of known
/// size gets one; any other body is chunked (`chunked` added last to a
/// `Transfer-Encoding` already there, though the proxy strips the caller's).
pub fn request_framing(headers: &mut HeaderMap, ended: bool, exact: Option<u64>) -> Sending {
    if ended {
        headers.remove(TRANSFER_ENCODING);
        return match crate::headers::single_length(headers) {
            Some(length) if length > 0 => Sending::Length(length),
            Some(_) => Sending::Nothing,
            None => {
                headers.remove(CONTENT_LENGTH);
                Sending::Nothing
            }
        };
    }
    if !headers.contains_key(TRANSFER_ENCODING) {
        if let Some(length) = crate::headers::single_length(headers) {
            return Sending::Length(length);
        }
        if let Some(length) = exact {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
            return Sending::Length(length);
        }
    }
    headers.remove(CONTENT_LENGTH);
    if !ends_chunked(headers) {
        headers.append(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    Sending::Chunked
}

/// Whether the last transfer coding in `headers` is `chunked`.
fn ends_chunked(headers: &HeaderMap) -> bool {
    headers.get_all(TRANSFER_ENCODING).iter().next_back().is_some_and(|value| {
        value
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    })
}

/// Whether the response's transfer codings are `chunked` alone.
fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings =
        headers.get_all(TRANSFER_ENCODING).iter().flat_map(|value| value.as_bytes().split(|&b| b == b','));
    codings.next().is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Appends the HTTP/1.1 request head: the request line with `target` (origin
/// form), every field of `headers` in order, and the empty line.
pub fn write_request_head(out: &mut Vec<u8>, method: &Method, target: &str, headers: &HeaderMap) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head read from Tallyfy.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and header fields as Tallyfy sent them.
    pub response: Response<()>,
    /// Where its body ends.
    pub decoder: Decoder,
    /// Whether the connection may carry another exchange after this body.
    pub keep_alive: bool,
}

/// Takes one complete response head from the start of `buffer`; `Ok(None)`
/// when the head is not complete yet. Field values are slices of the head's
/// bytes, not copies.
pub fn read_response_head(buffer: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, Malformed> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buffer,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(Malformed("a response head too long")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Malformed("a response head with too many fields"));
        }
        Err(_) => return Err(Malformed("an invalid response head")),
    };
    let status = parsed.code.and_then(|code| StatusCode::from_u16(code).ok());
    let status = status.ok_or(Malformed("an invalid status code"))?;
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // A reason other than the status's own is passed on as it came (as hyper did).
    let reason = parsed
        .reason
        .filter(|reason| Some(*reason) != status.canonical_reason())
        .map(|reason| within(reason.as_bytes(), buffer.as_ptr() as usize, length));
    let start = buffer.as_ptr() as usize;
    // Names and where the values lie, in place for a usual head (its values
    // can only be sliced once the head is split off the buffer).
    let mut fields: smallvec::SmallVec<[_; 24]> = smallvec::SmallVec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Malformed("an invalid header name"))?;
        fields.push((name, within(field.value, start, length)));
    }
    let head = buffer.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, range) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| Malformed("an invalid header value"))?;
        headers.append(name, value);
    }
    let (decoder, delimited) = body_framing(method, status, version, &mut headers)?;
    let keep_alive = delimited && persists(version, &headers);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = reason.and_then(|range| hyper::ext::ReasonPhrase::try_from(head.slice(range)).ok())
    {
        response.extensions_mut().insert(reason);
    }
    Ok(Some(ResponseHead { response, decoder, keep_alive }))
}

/// Where `part` (a slice of the head, which starts at address `start` and is
/// `length` long) lies in it; an empty slice may point anywhere, so is `0..0`.
fn within(part: &[u8], start: usize, length: usize) -> std::ops::Range<usize> {
    let from = (part.as_ptr() as usize).wrapping_sub(start);
    if part.is_empty() || from.saturating_add(part.len()) > length { 0..0 } else { from..from + part.len() }
}

/// Where the body of a response to `method` ends (RFC 9112 §6.3), and whether
/// that end leaves the connection usable (a body read until close, or framed
/// both ways, does not). HTTP/1.0 has no transfer codings: one named is a
/// broken response (§6.1). A length given more than once (`5, 5`, or two
/// fields) is restated once, as RFC 9110 §8.6 asks of a proxy: a caller (an
/// HTTP/2 one above all) would refuse it as it came.
fn body_framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &mut HeaderMap,
) -> Result<(Decoder, bool), Malformed> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // No body, so no framing to refuse; but a length that is no length
        // is refused as on any answer (RFC 9110 §8.6: never forwarded; nginx:
        // 502), and a repeated one is restated.
        if let (Some(length), true) = declared_length(headers)? {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        return Ok((Decoder::Done, status != StatusCode::SWITCHING_PROTOCOLS));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(Malformed("an HTTP/1.0 response with a Transfer-Encoding"));
        }
        // Only `chunked` itself: the proxy drops `Transfer-Encoding` on the
        // way back, so a body under another coding (`gzip, chunked`) would
        // reach the caller as bytes its headers do not describe, and one not
        // ending in `chunked` could only be read until close (nginx: 502).
        if !only_chunked(headers) {
            return Err(Malformed("a Transfer-Encoding other than chunked"));
        }
        let both = headers.contains_key(CONTENT_LENGTH);
        return Ok((Decoder::Chunked(Chunked::Size), !both));
    }
    Ok(match declared_length(headers)? {
        (Some(length), repeated) => {
            if repeated {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
            }
            (Decoder::Length(length), true)
        }
        (None, _) => (Decoder::UntilClose, false),
    })
}

/// The one length `Content-Length` gives, if any, and whether it was given
/// more than once (`5, 5`, or two fields); refused when two differ or one is
/// not a plain number.
fn declared_length(headers: &HeaderMap) -> Result<(Option<u64>, bool), Malformed> {
    // The usual answer: one field, one plain number.
    if let Some(length) = crate::headers::single_length(headers) {
        return Ok((Some(length), false));
    }
    let (mut length, mut items) = (None, 0);
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            items += 1;
            let digits = item.trim_ascii();
            let parsed = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
                .flatten();
            match (parsed, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err(Malformed("an invalid Content-Length")),
            }
        }
    }
    Ok((length, items > 1))
}

/// Whether the connection stays open after this response: HTTP/1.1 unless
/// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
fn persists(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &[u8]| {
        headers.get_all(CONNECTION).iter().any(|value| {
            value.as_bytes().split(|&b| b == b',').any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    if version == Version::HTTP_10 { has(b"keep-alive") } else { !has(b"close") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(wire: &str, method: Method) -> Result<Option<(ResponseHead, usize)>, Malformed> {
        let mut buffer = BytesMut::from(wire);
        read_response_head(&mut buffer, &method).map(|head| head.map(|head| (head, buffer.len())))
    }

    fn head(wire: &str) -> ResponseHead {
        read(wire, Method::GET).expect("valid").expect("complete").0
    }

    #[test]
    fn the_head_is_taken_and_the_body_left() {
        let (head, left) =
            read("HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody", Method::POST)
                .expect("valid")
                .expect("complete");
        assert_eq!(head.response.status(), StatusCode::CREATED);
        assert_eq!(head.response.version(), Version::HTTP_11);
        let values: Vec<_> = head.response.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!((head.decoder, head.keep_alive, left), (Decoder::Length(4), true, 4));
    }

    #[test]
    fn a_partial_head_waits_and_a_broken_one_is_refused() {
        assert!(read("HTTP/1.1 200 OK\r\nContent-Le", Method::GET).expect("valid so far").is_none());
        for wire in
            ["HTTP/1.1 2000 OK\r\n\r\n", "HTTQ/1.1 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"]
        {
            assert!(read(wire, Method::GET).is_err(), "{wire:?}");
        }
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(read(&endless, Method::GET).is_err());
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X: 1\r\n".repeat(MAX_HEADERS + 1));
        assert!(read(&many, Method::GET).is_err());
    }

    #[test]
    fn bodies_are_delimited_as_rfc_9112_says() {
        let framing = |wire: &str| {
            let head = head(wire);
            (head.decoder, head.keep_alive)
        };
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"), (Decoder::Length(7), true));
        // A repeated length is passed on once, with a body or without.
        for repeated in ["Content-Length: 7, 7\r\n", "Content-Length: 7\r\ncontent-length: 7\r\n"] {
            for status in ["200 OK", "304 Not Modified", "204 No Content"] {
                let head = head(&format!("HTTP/1.1 {status}\r\n{repeated}\r\n"));
                let lengths: Vec<_> = head.response.headers().get_all("content-length").iter().collect();
                assert_eq!(lengths, ["7"], "{status} {repeated:?}");
            }
            let wire = format!("HTTP/1.1 200 OK\r\n{repeated}\r\n");
            let to_head = read(&wire, Method::HEAD).expect("read").expect("whole").0;
            assert_eq!(to_head.response.headers().get_all("content-length").iter().count(), 1);
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n"),
            (Decoder::Chunked(Chunked::Size), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            (Decoder::Chunked(Chunked::Size), false)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Decoder::UntilClose, false));
        assert_eq!(framing("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"), (Decoder::Done, true));
        assert_eq!(framing("HTTP/1.1 304 Not Modified\r\n\r\n"), (Decoder::Done, true));
        assert_eq!(framing("HTTP/1.1 101 Switching Protocols\r\n\r\n"), (Decoder::Done, false));
        assert!(read("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", Method::GET).is_err());
        let to_head =
            read("HTTP/1.1 200 OK\r\nContent-Length: 700\r\n\r\n", Method::HEAD).unwrap().unwrap().0;
        assert_eq!(to_head.decoder, Decoder::Done);
        for wire in [
            "HTTP/1.1 200 OK\r\nContent-Length: 7, 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +7\r\n\r\n",
            // Codings the caller would never hear of: 502, not a body under
            // headers that do not describe it.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n",
        ] {
            assert!(read(wire, Method::GET).is_err(), "{wire:?}");
        }
    }

    #[test]
    fn a_reason_of_its_own_is_kept() {
        let own = head("HTTP/1.1 419 Page Expired\r\nContent-Length: 0\r\n\r\n");
        let reason = own.response.extensions().get::<hyper::ext::ReasonPhrase>().expect("kept");
        assert_eq!(reason.as_bytes(), b"Page Expired");
        let canonical = head("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert!(canonical.response.extensions().get::<hyper::ext::ReasonPhrase>().is_none());
    }

    #[test]
    fn empty_values_are_kept_empty() {
        let head = head("HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Blank:   \r\nContent-Length: 0\r\n\r\n");
        assert_eq!(head.response.headers()["x-empty"], "");
        assert_eq!(head.response.headers()["x-blank"], "");
    }

    proptest::proptest! {
        /// Every prefix of a response head is "not yet", never an error or a head.
        #[test]
        fn a_head_cut_anywhere_waits_for_the_rest(cut in 0usize..95) {
            let wire = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}";
            let cut = cut.min(wire.len() - 5);
            proptest::prop_assert!(read(&wire[..cut], Method::GET).expect("valid so far").is_none());
        }
    }

    #[test]
    fn connections_persist_as_their_version_and_connection_field_say() {
        assert!(
            !head("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n").keep_alive
        );
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n").keep_alive);
    }

    #[test]
    fn request_bodies_are_delimited_as_hypers_client_did() {
        let mut headers = HeaderMap::new();
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(request_framing(&mut headers, true, Some(0)), Sending::Nothing);
        assert!(headers.is_empty());
        let mut announced = HeaderMap::new();
        announced.insert(CONTENT_LENGTH, HeaderValue::from_static("100"));
        assert_eq!(
            request_framing(&mut announced, true, Some(0)),
            Sending::Length(100),
            "an ended body is held to the length it announced"
        );
        announced.insert(CONTENT_LENGTH, HeaderValue::from_static(""));
        assert_eq!(request_framing(&mut announced, true, Some(0)), Sending::Nothing);
        assert!(announced.is_empty(), "and a length that is no number is not written");
        assert_eq!(request_framing(&mut headers, false, Some(12)), Sending::Length(12));
        assert_eq!(headers[CONTENT_LENGTH], "12");
        assert_eq!(
            request_framing(&mut headers, false, None),
            Sending::Length(12),
            "a stated length is kept"
        );
        headers.append(CONTENT_LENGTH, HeaderValue::from_static("13"));
        assert_eq!(request_framing(&mut headers, false, None), Sending::Chunked, "two lengths are no length");
        assert_eq!(headers[TRANSFER_ENCODING], "chunked");
        let mut coded = HeaderMap::new();
        coded.insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(request_framing(&mut coded, false, Some(3)), Sending::Chunked);
        let codings: Vec<_> = coded.get_all(TRANSFER_ENCODING).iter().collect();
        assert_eq!(codings, ["gzip", "chunked"]);
        assert!(!headers.contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn the_request_head_is_the_line_then_the_fields_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("go.tallyfy.com"));
        headers.append("x-b", HeaderValue::from_static("1"));
        headers.append("x-b", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        write_request_head(&mut out, &Method::PUT, "/api/x?y=%2F", &headers);
        assert_eq!(out, b"PUT /api/x?y=%2F HTTP/1.1\r\nhost: go.tallyfy.com\r\nx-b: 1\r\nx-b: 2\r\n\r\n");
    }
}
