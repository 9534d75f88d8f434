//! `_method` in a `multipart/form-data` body, found while the body streams.
//!
//! Multipart bodies are uploads (up to 100 MB) and are never buffered whole. The
//! [`Screen`] watches the stream the way PHP's multipart parser (`rfc1867.c`)
//! reads it, erring on the side of holding back:
//! - a part may start at any `--boundary` whose line ends there (CR LF, LF, or a
//!   NUL, since PHP compares C strings), wherever it stands: PHP also starts
//!   lines in the middle of very long ones;
//! - its header lines end at an empty line or one starting with NUL; a line
//!   starting with white space or without a colon continues the previous header;
//!   lines PHP would read in pieces (a line feed 5,120 bytes or more into the
//!   line, boundary lines included) are refused, not guessed at;
//! - if any `Content-Disposition` has any `name` PHP registers as `_method`, the
//!   field's value (up to the next `\n--boundary`) is held and judged.
//!
//! Bytes that cannot belong to a part's headers pass at once; a part's headers
//! are held until complete. An allowed method releases the held bytes; anything
//! else ends the body with [`Refused`], so the upload is cut before Tallyfy ever
//! has a complete request, and never sees the `_method` field at all. Each byte
//! is searched once, whatever the size of the pieces the body arrives in.

use bytes::{Bytes, BytesMut};
use http::Method;
use memchr::memmem;

mod php;
mod screened;

use super::{Unreadable, parse_method};
use php::{Line, PartHeaders, boundary_line};

pub use php::boundary;
pub use screened::Screened;

/// A part's header block longer than this is not read: the body is refused.
const MAX_PART_HEADERS: usize = 8 * 1024;
/// A `_method` value longer than this is not a method.
const MAX_VALUE: usize = 64;

/// Why the body was stopped: the `_method` field names a method the identity
/// may not use, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the multipart _method field names {0}, which this identity may not use")]
    Method(Method),
    #[error("{}", .0.0)]
    Unreadable(Unreadable),
}

/// PHP reads multipart lines into a buffer of this size and hands a longer one
/// back in pieces; the screen refuses such lines rather than guess the pieces.
const PHP_LINE: usize = 5 * 1024;

/// Whether PHP reads a line in pieces when its line feed is `newline` bytes
/// after the line's start (or has not come yet that far in): its buffer holds
/// `PHP_LINE` bytes, so a line feed at that offset or beyond is not in it, and
/// the full buffer is handed back as a line of its own (`next_line` in
/// `rfc1867.c`). The feed then ends an empty line: the end of a part's headers.
fn splits_in_php(newline: usize) -> bool {
    newline >= PHP_LINE
}

/// What the screen is waiting for. Offsets index `held`.
#[derive(Debug, Clone)]
enum State {
    /// A `--boundary` at or after `from`.
    Seeking { from: usize },
    /// The end of the line of the `--boundary` at `at`: a part starts there if
    /// the line is exactly `--boundary` (PHP compares C strings: a NUL ends it).
    Boundary { at: usize },
    /// The header lines of the part whose boundary is at `at`; the next line
    /// starts at `line`.
    Headers { at: usize, line: usize, headers: PartHeaders },
    /// The value of a `_method` part (boundary at `at`), which starts at `value`.
    Value { at: usize, value: usize },
}

/// The streaming check of one multipart body.
#[derive(Debug)]
pub struct Screen {
    /// `--boundary`: how a part's line starts.
    dash_boundary: Vec<u8>,
    /// `\n--boundary`: what ends a field's value.
    value_end: Vec<u8>,
    allowed: Vec<Method>,
    /// Bytes not yet released.
    held: BytesMut,
    state: State,
}

impl Screen {
    pub fn new(boundary: &[u8], allowed: Vec<Method>) -> Screen {
        let dash_boundary = [b"--", boundary].concat();
        let value_end = [b"\n", dash_boundary.as_slice()].concat();
        Screen { dash_boundary, value_end, allowed, held: BytesMut::new(), state: State::Seeking { from: 0 } }
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
        loop {
            let next = match &mut self.state {
                State::Seeking { from } => match memmem::find(&self.held[*from..], &self.dash_boundary) {
                    Some(found) => State::Boundary { at: *from + found },
                    None => {
                        // Keep what could be the start of a boundary.
                        let keep = if end { 0 } else { self.dash_boundary.len() - 1 };
                        *from = (*from).max(self.held.len().saturating_sub(keep));
                        break;
                    }
                },
                State::Boundary { at } => {
                    let at = *at;
                    let rest = &self.held[at + self.dash_boundary.len()..];
                    match boundary_line(rest) {
                        Line::Incomplete if end => State::Seeking { from: self.held.len() },
                        Line::Incomplete if splits_in_php(self.dash_boundary.len() + rest.len()) => {
                            return Err(unreadable("a multipart boundary line is too long"));
                        }
                        Line::Incomplete => break,
                        Line::Other => State::Seeking { from: at + 1 },
                        // A NUL-ended boundary line PHP reads in pieces: the
                        // rest of it would be the part's first header line.
                        Line::Boundary(len) if splits_in_php(self.dash_boundary.len() + len - 1) => {
                            return Err(unreadable("a multipart boundary line is too long"));
                        }
                        Line::Boundary(len) => State::Headers {
                            at,
                            line: at + self.dash_boundary.len() + len,
                            headers: PartHeaders::default(),
                        },
                    }
                }
                State::Headers { at, line, headers } => {
                    let Some(newline) = memchr::memchr(b'\n', &self.held[*line..]) else {
                        if end {
                            // An unfinished part: PHP registers nothing.
                            self.state = State::Seeking { from: self.held.len() };
                            continue;
                        }
                        if splits_in_php(self.held.len() - *line) {
                            return Err(unreadable("a multipart header line is too long"));
                        }
                        break;
                    };
                    if *line + newline - *at > MAX_PART_HEADERS {
                        return Err(unreadable("multipart part headers too long to read"));
                    }
                    if splits_in_php(newline) {
                        return Err(unreadable("a multipart header line is too long"));
                    }
                    let raw = &self.held[*line..*line + newline];
                    let text = raw.strip_suffix(b"\r").unwrap_or(raw);
                    let text = text.split(|&b| b == 0).next().unwrap_or_default();
                    let after = *line + newline + 1;
                    if !text.is_empty() && !raw.starts_with(b"\0") {
                        headers.add_line(text);
                        *line = after;
                        continue;
                    }
                    // The header block ends at an empty line, or one starting with NUL.
                    if headers.names_override() {
                        State::Value { at: *at, value: after }
                    } else {
                        State::Seeking { from: after }
                    }
                }
                State::Value { value, .. } => {
                    let area = &self.held[*value..];
                    let field = match memmem::find(area, &self.value_end) {
                        Some(len) => &area[..len],
                        None if end => area,
                        None if area.len() > MAX_VALUE + self.value_end.len() => {
                            return Err(unreadable("a _method override must name a method"));
                        }
                        None => break,
                    };
                    let field = field.strip_suffix(b"\r").unwrap_or(field);
                    let method = parse_method(field).map_err(Refused::Unreadable)?;
                    if !self.allowed.contains(&method) {
                        return Err(Refused::Method(method));
                    }
                    State::Seeking { from: *value + field.len() }
                }
            };
            self.state = next;
        }
        Ok(self.release())
    }

    /// Lets go of every byte before the earliest one still needed.
    fn release(&mut self) -> Bytes {
        let keep_from = match &self.state {
            State::Seeking { from } => *from,
            State::Boundary { at } | State::Headers { at, .. } | State::Value { at, .. } => *at,
        };
        match &mut self.state {
            State::Seeking { from } => *from -= keep_from,
            State::Boundary { at } => *at -= keep_from,
            State::Headers { at, line, .. } => {
                *at -= keep_from;
                *line -= keep_from;
            }
            State::Value { at, value } => {
                *at -= keep_from;
                *value -= keep_from;
            }
        }
        self.held.split_to(keep_from).freeze()
    }
}

fn unreadable(why: &'static str) -> Refused {
    Refused::Unreadable(Unreadable(why))
}

#[cfg(test)]
mod tests {
    use super::php::field_names;
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
    fn what_php_would_read_as_a_method_part_is_judged_however_it_is_spelled() {
        let cases: [&[u8]; 7] = [
            // PHP takes the first Content-Disposition; every one is judged.
            b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
            // A line without a colon continues the previous header.
            b"--XyZ\r\nContent-Disposition: form-data; name=x;\r\nname=_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
            // A line starting with NUL ends the headers.
            b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\0\r\nDELETE\r\n--XyZ--\r\n",
            // A NUL ends the boundary line for PHP's strcmp.
            b"--XyZ\0x\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
            // A boundary in the middle of a line (PHP splits lines at 5 KiB).
            b"AAAA--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
            // A name with PHP's folding, and white space before the header name.
            b"--XyZ\nContent-Disposition:form-data; NAME=\" .method\"\n\nDELETE\n--XyZ--\n",
            // A header whose continuation starts with white space.
            b"--XyZ\r\nContent-Disposition: form-data;\r\n name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
        ];
        for (i, body) in cases.iter().enumerate() {
            for step in [1, 3, body.len()] {
                assert!(
                    matches!(run(body, step), Err(Refused::Method(ref m)) if *m == Method::DELETE),
                    "case {i}, step {step}: {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn lines_longer_than_php_reads_are_refused() {
        let long_header =
            [b"--XyZ\r\nX-Pad: ".as_slice(), &[b'a'; 6000], b"\r\n\r\nvalue\r\n--XyZ--\r\n"].concat();
        assert!(matches!(run(&long_header, 100), Err(Refused::Unreadable(_))));
    }

    /// `X-Pad: ` and `pad` bytes, then CR LF: the line feed `pad + 8` bytes in.
    fn padded_header_then_method(pad: usize) -> Vec<u8> {
        [
            b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\nX-Pad: ".as_slice(),
            &vec![b'a'; pad],
            b"\r\nDELETE\r\n--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nPOST\r\n--XyZ--\r\n",
        ]
        .concat()
    }

    #[test]
    fn a_header_line_php_reads_in_two_pieces_is_refused_at_the_exact_length() {
        // Line feed at offset 5119: one line for PHP, so its headers go on
        // through `DELETE` and the second part's to the empty line, and the
        // value judged is POST, as PHP reads it.
        for step in [1, 100, 8192] {
            assert!(run(&padded_header_then_method(PHP_LINE - 9), step).is_ok(), "step {step}");
        }
        // Line feed at offset 5120: PHP hands back 5120 bytes, then an empty
        // line that ends the headers, so `_method` is DELETE.
        for step in [1, 100, 8192] {
            assert!(
                matches!(run(&padded_header_then_method(PHP_LINE - 8), step), Err(Refused::Unreadable(_))),
                "step {step}"
            );
        }
    }

    #[test]
    fn a_nul_ended_boundary_line_php_reads_in_pieces_is_refused() {
        // `--XyZ\0` then padding: PHP's first 5120 bytes match the boundary
        // (strcmp stops at the NUL), and the rest of the line is read as the
        // part's first header line.
        let part = |pad: usize| {
            [
                b"--XyZ\0".as_slice(),
                &vec![b'a'; pad],
                b"Content-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
            ]
            .concat()
        };
        for step in [1, 100, 8192] {
            assert!(
                matches!(run(&part(PHP_LINE - 6), step), Err(Refused::Unreadable(_))),
                "exactly at the piece's end, step {step}"
            );
            assert!(matches!(run(&part(6000), step), Err(Refused::Unreadable(_))), "step {step}");
        }
        // Shorter, the line is PHP's whole boundary line, and the part has no headers.
        let short = [b"--XyZ\0".as_slice(), &[b'a'; 100], b"\r\n\r\nDELETE\r\n--XyZ--\r\n"].concat();
        assert_eq!(run(&short, 7).expect("no part PHP reads"), short);
    }

    #[test]
    fn each_byte_is_searched_once_in_any_pieces() {
        // 8 KiB of header continuation arriving a byte at a time: linear, not quadratic.
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=x\r\n".to_vec();
        for _ in 0..100 {
            body.extend_from_slice(b" continued header line of forty bytes..\r\n");
        }
        body.extend_from_slice(b"\r\nvalue\r\n--XyZ--\r\n");
        let began = std::time::Instant::now();
        assert_eq!(run(&body, 1).expect("passes"), body);
        assert!(began.elapsed() < std::time::Duration::from_secs(2), "{:?}", began.elapsed());
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
        assert_eq!(field_names(b" form-data; name=\"_method\""), [b"_method".to_vec()]);
        assert_eq!(field_names(b"form-data; filename=\"a;name=x\"; name=_method"), [b"_method".to_vec()]);
        assert_eq!(field_names(b"form-data; NAME='x'; name=\"y\""), [b"x".to_vec(), b"y".to_vec()]);
        assert!(field_names(b"form-data; name*=utf-8''x").is_empty());
    }
}
