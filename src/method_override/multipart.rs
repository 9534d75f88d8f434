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
//! is searched a bounded number of times (once, or as many times as the bytes of
//! `\n--boundary` that may straddle two pieces), whatever the size of the pieces
//! the body arrives in: a search resumes where the last one stopped.

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

/// What the screen is waiting for. Offsets index `held`; `searched` is where
/// the next search for the awaited line end or boundary resumes (what is
/// before it has been searched and holds none).
#[derive(Debug, Clone)]
enum State {
    /// A `--boundary` at or after `from`.
    Seeking { from: usize },
    /// The end of the line of the `--boundary` at `at`: a part starts there if
    /// the line is exactly `--boundary` (PHP compares C strings: a NUL ends it).
    Boundary { at: usize, searched: usize },
    /// The header lines of the part whose boundary is at `at`; the next line
    /// starts at `line`.
    Headers { at: usize, line: usize, searched: usize, headers: PartHeaders },
    /// The value of a `_method` part (boundary at `at`), which starts at `value`.
    Value { at: usize, value: usize, searched: usize },
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
                State::Seeking { from } => {
                    match memmem::find(unsearched(&self.held, *from), &self.dash_boundary) {
                        Some(found) => State::Boundary { at: *from + found, searched: *from + found },
                        None => {
                            // Keep what could be the start of a boundary.
                            let keep = if end { 0 } else { self.dash_boundary.len() - 1 };
                            *from = (*from).max(self.held.len().saturating_sub(keep));
                            break;
                        }
                    }
                }
                State::Boundary { at, searched } => {
                    let at = *at;
                    let line = at + self.dash_boundary.len();
                    let rest = &self.held[line..];
                    match boundary_line(rest, (*searched).max(line) - line) {
                        Line::Incomplete if end => State::Seeking { from: self.held.len() },
                        Line::Incomplete if splits_in_php(self.dash_boundary.len() + rest.len()) => {
                            return Err(unreadable("a multipart boundary line is too long"));
                        }
                        Line::Incomplete => {
                            *searched = self.held.len();
                            break;
                        }
                        Line::Other => State::Seeking { from: at + 1 },
                        // A NUL-ended boundary line PHP reads in pieces: the
                        // rest of it would be the part's first header line.
                        Line::Boundary(len) if splits_in_php(self.dash_boundary.len() + len - 1) => {
                            return Err(unreadable("a multipart boundary line is too long"));
                        }
                        Line::Boundary(len) => State::Headers {
                            at,
                            line: line + len,
                            searched: line + len,
                            headers: PartHeaders::default(),
                        },
                    }
                }
                State::Headers { at, line, searched, headers } => {
                    let from = (*searched).max(*line);
                    let Some(found) = memchr::memchr(b'\n', unsearched(&self.held, from)) else {
                        *searched = self.held.len();
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
                    let newline = from + found - *line;
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
                        *searched = after;
                        continue;
                    }
                    // The header block ends at an empty line, or one starting with NUL.
                    if headers.names_override() {
                        State::Value { at: *at, value: after, searched: after }
                    } else {
                        State::Seeking { from: after }
                    }
                }
                State::Value { value, searched, .. } => {
                    let area = &self.held[*value..];
                    let from = (*searched).max(*value);
                    let field = match memmem::find(unsearched(&self.held, from), &self.value_end) {
                        Some(found) => &area[..from - *value + found],
                        None if end => area,
                        None if area.len() > MAX_VALUE + self.value_end.len() => {
                            return Err(unreadable("a _method override must name a method"));
                        }
                        None => {
                            // Keep what could be the start of the value's end.
                            *searched = self.held.len().saturating_sub(self.value_end.len() - 1);
                            break;
                        }
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
            State::Boundary { at, .. } | State::Headers { at, .. } | State::Value { at, .. } => *at,
        };
        match &mut self.state {
            State::Seeking { from } => *from -= keep_from,
            State::Boundary { at, searched } => {
                *at -= keep_from;
                *searched -= keep_from;
            }
            State::Headers { at, line, searched, .. } => {
                *at -= keep_from;
                *line -= keep_from;
                *searched -= keep_from;
            }
            State::Value { at, value, searched } => {
                *at -= keep_from;
                *value -= keep_from;
                *searched = searched.saturating_sub(keep_from);
            }
        }
        self.held.split_to(keep_from).freeze()
    }
}

/// The bytes of `held` from `from` on, handed to a search. Tests count them.
fn unsearched(held: &[u8], from: usize) -> &[u8] {
    #[cfg(test)]
    tests::SEARCHED.with(|searched| searched.set(searched.get() + held.len() - from));
    &held[from..]
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
        let cases: [&[u8]; 12] = [
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
            // A run of `=` is one separator (`php_ap_getword`).
            b"--XyZ\r\nContent-Disposition: form-data; name==_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
            b"--XyZ\r\nContent-Disposition: form-data; name===\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
            // A run of `;` too, and C's white space includes the vertical tab.
            b"--XyZ\r\nContent-Disposition: form-data;;\x0bname=_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
            b"--XyZ\r\nContent-Disposition: form-data; name=\x0b_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
            b"--XyZ\r\nContent-Disposition: form-data; name=_method\x0bjunk\r\n\r\nDELETE\r\n--XyZ--\r\n",
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

    thread_local! {
        /// Bytes handed to searches on this test's thread (see `unsearched`).
        pub(super) static SEARCHED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn each_byte_is_searched_a_bounded_number_of_times_in_any_pieces() {
        // Lines just under what PHP reads whole, arriving a byte at a time: a
        // search that started over at each piece would hand ~4000²/2 bytes to
        // memchr per line. Resumed, a byte is searched at most once per byte of
        // `\n--XyZ` that could straddle two pieces.
        let long = "a".repeat(4000);
        let header_line = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=x\r\nX-Pad: {long}\r\n\r\nv\r\n--XyZ--\r\n"
        );
        let continued =
            format!("--XyZ\r\nContent-Disposition: form-data; name=x;\r\n {long}\r\n\r\nv\r\n--XyZ--\r\n");
        let nul_boundary = format!("--XyZ\0{long}\r\n\r\nv\r\n--XyZ--\r\n");
        let value =
            "--XyZ\r\nContent-Disposition: form-data; name=_method\r\n\r\nput\r\n--XyZ--\r\n".to_string();
        let plain = body(&[("title", &long), ("file", &long)]);
        let plain = String::from_utf8(plain).expect("ASCII");
        for (case, data) in [header_line, continued, nul_boundary, value, plain].iter().enumerate() {
            for step in [1, 7, data.len()] {
                SEARCHED.with(|searched| searched.set(0));
                assert_eq!(run(data.as_bytes(), step).expect("passes"), data.as_bytes(), "case {case}");
                let searched = SEARCHED.with(|searched| searched.get());
                let bound = data.len() * b"\n--XyZ".len();
                assert!(
                    searched <= bound,
                    "case {case}, step {step}: {searched} bytes searched, bound {bound}"
                );
                assert!(searched >= data.len() / 2, "case {case}: the count sees the searches ({searched})");
            }
        }
    }

    /// Feeds `data` cut at `cuts`; what was released, or the refusal.
    fn run_cut(data: &[u8], cuts: &[usize]) -> Result<Vec<u8>, Refused> {
        let mut points: Vec<usize> = cuts.iter().map(|&cut| cut.min(data.len())).collect();
        points.push(data.len());
        points.sort_unstable();
        let (mut screen, mut out, mut fed) = (screen(), Vec::new(), 0);
        for point in points {
            out.extend_from_slice(&screen.push(&data[fed..point])?);
            fed = point;
        }
        out.extend_from_slice(&screen.finish()?);
        Ok(out)
    }

    /// The outcome as a comparable value: the bytes, or which refusal.
    fn outcome(result: Result<Vec<u8>, Refused>) -> Result<Vec<u8>, String> {
        result.map_err(|refused| match refused {
            Refused::Method(method) => method.to_string(),
            Refused::Unreadable(_) => "unreadable".to_owned(),
        })
    }

    proptest::proptest! {
        /// Bodies made of parts and of the pieces the screen reacts to, cut
        /// anywhere: the outcome is the one the whole body in one piece has,
        /// and a body that passes passes byte for byte.
        #[test]
        fn any_pieces_give_the_outcome_of_the_whole_body(
            parts in proptest::collection::vec((0usize..4, 0usize..5, 0usize..4, 0usize..14), 0..8),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..24),
        ) {
            let pad = "a".repeat(PHP_LINE - 9);
            let heads: [&[u8]; 4] = [
                b"--XyZ\r\nContent-Disposition: form-data; name=_method\r\n\r\n",
                b"--XyZ\nContent-Disposition: form-data; name=\"_method\"\n\0",
                b"--XyZ\r\nContent-Disposition: form-data; name=x\r\n",
                b"",
            ];
            let values: [&[u8]; 5] = [b"put", b"DELETE", b"x", pad.as_bytes(), b""];
            let ends: [&[u8]; 4] = [b"\r\n--XyZ", b"\n--XyZ", b"\r\n--XyZ--\r\n", b""];
            let words: [&[u8]; 14] = [
                b"--XyZ", b"\r\n", b"\n", b"\0", b"Content-Disposition: form-data; name=",
                b"_method", b"\"_method\"", b"DELETE", b"put", b" ", b"x", b":", b"\r", pad.as_bytes(),
            ];
            let data: Vec<u8> = parts
                .iter()
                .flat_map(|&(head, value, end, word)| [heads[head], values[value], ends[end], words[word]])
                .flatten()
                .copied()
                .collect();
            let cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(data.len() + 1)).collect();
            let whole = outcome(run_cut(&data, &[]));
            if let Ok(passed) = &whole {
                proptest::prop_assert_eq!(passed, &data);
            }
            proptest::prop_assert_eq!(outcome(run_cut(&data, &cuts)), whole);
        }
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
