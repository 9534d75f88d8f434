//! `_method` in a `multipart/form-data` body, found while the body streams.
//!
//! Multipart bodies are uploads (up to 100 MB) and are never buffered whole. The
//! [`Screen`] watches the stream the way PHP's multipart parser reads it: a part
//! starts at a line that is exactly `--boundary`, its headers end at an empty
//! line, and a field's value ends at the next `\n--boundary`. Bytes that cannot
//! belong to a part's headers pass at once. A part's headers are held back until
//! they are complete; when they name a field PHP registers as `_method`, its
//! value is held too and judged: an allowed method releases it, anything else
//! ends the body with [`Refused`], so the upload is cut before Tallyfy ever has
//! a complete request (and never sees the `_method` field at all).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use pin_project_lite::pin_project;

use super::{PARAM, Unreadable, parse_method, php_name};
use crate::server::BoxError;

/// Part headers longer than this are not read: the body is refused.
const MAX_PART_HEADERS: usize = 8 * 1024;
/// A `_method` value longer than this is not a method.
const MAX_VALUE: usize = 64;

/// The boundary of a `multipart/form-data` content type, found as PHP finds it:
/// the first `boundary` (any case only when no lower-case one exists), then the
/// first `=` after it; the value is quoted, or ends at `,` or `;`.
pub fn boundary(content_type: &[u8]) -> Option<Vec<u8>> {
    let at = memmem::find(content_type, b"boundary")
        .or_else(|| memmem::find(&content_type.to_ascii_lowercase(), b"boundary"))?;
    let after = &content_type[at..];
    let value = &after[after.iter().position(|&b| b == b'=')? + 1..];
    let value = match value.strip_prefix(b"\"") {
        Some(quoted) => &quoted[..quoted.iter().position(|&b| b == b'"')?],
        None => &value[..value.iter().position(|&b| b == b',' || b == b';').unwrap_or(value.len())],
    };
    (!value.is_empty()).then(|| value.to_vec())
}

/// Why the body was stopped: the `_method` field names a method the identity
/// may not use, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the multipart _method field names {0}, which this identity may not use")]
    Method(Method),
    #[error("{}", .0.0)]
    Unreadable(Unreadable),
}

/// What the screen is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A delimiter (`\n--boundary`).
    Delimiter,
    /// The end of the headers of a part whose delimiter starts `held`.
    Headers,
    /// The end of a `_method` value that starts at this offset of `held`.
    Value(usize),
}

/// The streaming check of one multipart body.
#[derive(Debug)]
pub struct Screen {
    /// `\n--boundary`: what starts a part's line.
    delimiter: Vec<u8>,
    allowed: Vec<Method>,
    /// Bytes not yet released. It starts with a virtual `\n`, so a body that
    /// begins with `--boundary` is a delimiter too (never released).
    held: BytesMut,
    /// `held[..released]` may go; the screen decided about them.
    state: State,
    /// Leading bytes of `held` that are not part of the body (the virtual `\n`).
    virtual_prefix: usize,
}

impl Screen {
    pub fn new(boundary: &[u8], allowed: Vec<Method>) -> Screen {
        let mut delimiter = b"\n--".to_vec();
        delimiter.extend_from_slice(boundary);
        let mut held = BytesMut::new();
        held.extend_from_slice(b"\n");
        Screen { delimiter, allowed, held, state: State::Delimiter, virtual_prefix: 1 }
    }

    /// Takes `data` in; returns what may be sent now.
    pub fn push(&mut self, data: &[u8]) -> Result<Bytes, Refused> {
        self.held.extend_from_slice(data);
        self.advance(false)
    }

    /// The body ended: judges what is still held and returns the rest.
    pub fn finish(&mut self) -> Result<Bytes, Refused> {
        self.advance(true)
    }

    fn advance(&mut self, end: bool) -> Result<Bytes, Refused> {
        let mut release = 0;
        loop {
            match self.state {
                State::Delimiter => match memmem::find(&self.held[release..], &self.delimiter) {
                    Some(at) => {
                        release += at;
                        self.state = State::Headers;
                    }
                    None => {
                        // Keep what could be the start of a delimiter.
                        let keep = if end { 0 } else { self.delimiter.len() - 1 };
                        release = release.max(self.held.len().saturating_sub(keep));
                        break;
                    }
                },
                State::Headers => {
                    let part = &self.held[release..];
                    match part_line(&part[self.delimiter.len()..]) {
                        None if end => {
                            release = self.held.len(); // an unfinished line: no part
                            break;
                        }
                        None => break,
                        Some(false) => {
                            release += 1; // not a part; look for the next delimiter after this one
                            self.state = State::Delimiter;
                            continue;
                        }
                        Some(true) => {}
                    }
                    let Some(headers_end) = headers_end(part, self.delimiter.len()) else {
                        if end {
                            release = self.held.len(); // an unfinished part: PHP registers nothing
                        } else if part.len() > MAX_PART_HEADERS {
                            return Err(Refused::Unreadable(Unreadable(
                                "multipart part headers too long to read",
                            )));
                        }
                        break;
                    };
                    if names_override(&part[..headers_end], self.delimiter.len()) {
                        self.state = State::Value(release + headers_end);
                    } else {
                        release += headers_end;
                        self.state = State::Delimiter;
                    }
                }
                State::Value(start) => {
                    let value_area = &self.held[start..];
                    let value = match memmem::find(value_area, &self.delimiter) {
                        Some(at) => &value_area[..at],
                        None if end => value_area,
                        None if value_area.len() > MAX_VALUE + self.delimiter.len() => {
                            return Err(Refused::Unreadable(Unreadable(
                                "a _method override must name a method",
                            )));
                        }
                        None => break,
                    };
                    let value = value.strip_suffix(b"\r").unwrap_or(value);
                    let method = parse_method(value).map_err(Refused::Unreadable)?;
                    if !self.allowed.contains(&method) {
                        return Err(Refused::Method(method));
                    }
                    release = start + value.len();
                    self.state = State::Delimiter;
                }
            }
        }
        if let State::Value(start) = &mut self.state {
            // Nothing of a held part goes before it is judged.
            *start -= release;
        }
        let mut out = self.held.split_to(release);
        let skip = self.virtual_prefix.min(out.len());
        out.advance(skip);
        self.virtual_prefix -= skip;
        Ok(out.freeze())
    }
}

/// Whether the rest of a delimiter's line makes it a part start (the line is
/// exactly `--boundary`, CR LF or LF); `None` until that can be told.
fn part_line(after_delimiter: &[u8]) -> Option<bool> {
    match after_delimiter {
        [] | [b'\r'] => None,
        [b'\n', ..] | [b'\r', b'\n', ..] => Some(true),
        _ => Some(false),
    }
}

/// Where the header block of the part starting at `part` (with its delimiter)
/// ends, just after its empty line; `None` while incomplete.
fn headers_end(part: &[u8], delimiter_len: usize) -> Option<usize> {
    let first_line_end = delimiter_len + part[delimiter_len..].iter().position(|&b| b == b'\n')?;
    let mut line_start = first_line_end + 1;
    loop {
        let newline = line_start + part[line_start..].iter().position(|&b| b == b'\n')?;
        let line = &part[line_start..newline];
        if line.is_empty() || line == b"\r" {
            return Some(newline + 1);
        }
        line_start = newline + 1;
    }
}

/// Whether a complete part header block names a field PHP registers as `_method`.
fn names_override(block: &[u8], delimiter_len: usize) -> bool {
    let mut lines = block[delimiter_len..].split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let _delimiter_line_end = lines.next();
    let mut found = false;
    for line in lines.take_while(|line| !line.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        if line[..colon].trim_ascii().eq_ignore_ascii_case(b"content-disposition") {
            found = field_name(&line[colon + 1..]).is_some_and(|name| php_name(&name).0 == PARAM);
        }
    }
    found
}

/// The last `name=` parameter of a `Content-Disposition` value, as PHP reads it.
fn field_name(value: &[u8]) -> Option<Vec<u8>> {
    let mut name = None;
    for pair in split_unquoted(value.trim_ascii_start(), b';') {
        let pair = pair.trim_ascii_start();
        let Some(eq) = split_unquoted(pair, b'=').next().map(<[u8]>::len).filter(|&n| n < pair.len()) else {
            continue;
        };
        if pair[..eq].eq_ignore_ascii_case(b"name") {
            name = Some(unquote(pair[eq + 1..].trim_ascii_start()));
        }
    }
    name
}

/// Splits at `stop` outside single or double quotes (PHP's `php_ap_getword`).
fn split_unquoted(text: &[u8], stop: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        let mut i = 0;
        while i < text.len() && text[i] != stop {
            if text[i] == b'"' || text[i] == b'\'' {
                let quote = text[i];
                i += 1;
                while i < text.len() && text[i] != quote {
                    i += if text[i] == b'\\' && text.get(i + 1) == Some(&quote) { 2 } else { 1 };
                }
            }
            i += 1;
        }
        let i = i.min(text.len());
        rest = (i < text.len()).then(|| &text[i + 1..]);
        Some(&text[..i])
    })
}

/// A parameter value: quoted (with `\"` unescaped, up to the closing quote) or
/// up to the first space (PHP's `php_ap_getword_conf`).
fn unquote(value: &[u8]) -> Vec<u8> {
    match value.first() {
        Some(&quote @ (b'"' | b'\'')) => {
            let mut out = Vec::new();
            let mut i = 1;
            while i < value.len() && value[i] != quote {
                if value[i] == b'\\' && value.get(i + 1) == Some(&quote) {
                    i += 1;
                }
                out.push(value[i]);
                i += 1;
            }
            out
        }
        _ => value.iter().take_while(|b| !b.is_ascii_whitespace()).copied().collect(),
    }
}

pin_project! {
    /// A request body passed through an optional [`Screen`].
    pub struct Screened<B> {
        #[pin]
        inner: B,
        screen: Option<Screen>,
        done: bool,
    }
}

impl<B> Screened<B> {
    pub fn new(inner: B, screen: Option<Screen>) -> Self {
        Screened { inner, screen, done: false }
    }
}

impl<B> Body for Screened<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let Some(screen) = this.screen.as_mut() else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        loop {
            if *this.done {
                return Poll::Ready(None);
            }
            let released = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => screen.push(&data),
                    Err(_trailers) => continue,
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None => {
                    *this.done = true;
                    screen.finish()
                }
            };
            match released {
                Err(refused) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(Box::new(refused))));
                }
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.screen.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen() -> Screen {
        Screen::new(b"XyZ", vec![Method::GET, Method::POST, Method::PUT])
    }

    fn body(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, value) in fields {
            body.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body
    }

    /// Feeds `data` in pieces of `step` bytes; returns what was released, or the refusal.
    fn run(data: &[u8], step: usize) -> Result<Vec<u8>, Refused> {
        let mut screen = screen();
        let mut out = Vec::new();
        for piece in data.chunks(step) {
            out.extend_from_slice(&screen.push(piece)?);
        }
        out.extend_from_slice(&screen.finish()?);
        Ok(out)
    }

    #[test]
    fn a_body_without_an_override_passes_byte_for_byte_in_any_pieces() {
        let data = body(&[("title", "a\r\n--XyZx not a boundary"), ("file", &"x".repeat(5000))]);
        for step in [1, 2, 7, 64, 4096, data.len()] {
            assert_eq!(run(&data, step).expect("passes"), data, "step {step}");
        }
    }

    #[test]
    fn an_allowed_override_passes_and_a_refused_one_is_never_released() {
        let allowed = body(&[("title", "t"), ("_method", "put")]);
        assert_eq!(run(&allowed, 3).expect("PUT is allowed"), allowed);
        for name in ["_method", ".method", " _method"] {
            let refused = body(&[("title", "t"), (name, "DELETE")]);
            for step in [1, 5, refused.len()] {
                let mut screen = screen();
                let mut sent = Vec::new();
                let mut outcome = Ok(());
                for piece in refused.chunks(step) {
                    match screen.push(piece) {
                        Ok(bytes) => sent.extend_from_slice(&bytes),
                        Err(error) => {
                            outcome = Err(error);
                            break;
                        }
                    }
                }
                if outcome.is_ok() {
                    outcome = screen.finish().map(|b| sent.extend_from_slice(&b));
                }
                assert!(
                    matches!(outcome, Err(Refused::Method(ref m)) if *m == Method::DELETE),
                    "{name:?} step {step}"
                );
                assert!(
                    memmem::find(&sent, b"DELETE").is_none(),
                    "the value never left: {name:?} step {step}"
                );
                assert!(memmem::find(&sent, name.trim().as_bytes()).is_none(), "nor its part");
            }
        }
    }

    #[test]
    fn unreadable_overrides_are_refused() {
        assert!(matches!(run(&body(&[("_method", "DEL ETE")]), 4), Err(Refused::Unreadable(_))));
        assert!(matches!(run(&body(&[("_method", &"A".repeat(500))]), 4), Err(Refused::Unreadable(_))));
    }

    #[test]
    fn php_reads_the_boundary_and_names_its_own_way() {
        assert_eq!(boundary(b"multipart/form-data; boundary=abc"), Some(b"abc".to_vec()));
        assert_eq!(boundary(b"multipart/form-data; boundary=\"a b;c\""), Some(b"a b;c".to_vec()));
        assert_eq!(
            boundary(b"multipart/form-data; xboundary=first; boundary=second"),
            Some(b"first".to_vec())
        );
        assert_eq!(boundary(b"multipart/form-data; BOUNDARY=up"), Some(b"up".to_vec()));
        assert_eq!(boundary(b"multipart/form-data"), None);
        assert_eq!(field_name(b" form-data; name=\"_method\""), Some(b"_method".to_vec()));
        assert_eq!(field_name(b"form-data; filename=\"a;name=x\"; name=_method"), Some(b"_method".to_vec()));
        assert_eq!(field_name(b"form-data; NAME='x'; name=\"y\""), Some(b"y".to_vec()), "the last one wins");
        assert_eq!(field_name(b"form-data; name*=utf-8''x"), None);
    }
}
