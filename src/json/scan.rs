//! A streaming, validating JSON scanner: no DOM, no allocation per token.
//!
//! The scanner walks the body once, iteratively (an explicit stack, so deep nesting cannot overflow the
//! call stack), and reports object keys, string values and number values to a [`Visitor`] together with
//! their byte spans. Each container carries a small, visitor-defined context (`Visitor::Ctx`): the context
//! of the value a key or array element introduces is computed from the context of its container, so a
//! visitor can track "am I inside `prerun`?" without building a key path.
//!
//! Validation follows the reader the body is for ([`Reader`]): UTF-8, string escapes (including
//! surrogate pairing), control characters, the number grammar, literals, structure and trailing
//! bytes as `serde_json::from_slice::<serde_json::Value>` checks them (and PHP's `json_decode`);
//! the nesting limit and numbers overflowing f64 as that reader takes them (none and infinity, for a
//! reader standing for any caller's).

use std::ops::Range;

/// The body is not valid JSON (or nests deeper than its [`Reader`] reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

/// Whose reading of JSON a scan agrees with, where readers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    /// Whatever a caller's library may read, for Tallyfy's answers: no
    /// nesting limit (JavaScript's `JSON.parse`, Python's `json`) and a number
    /// beyond f64 read as infinity. A scan that refused an answer some
    /// caller reads would leave Tallyfy's links in it; one that accepts an
    /// answer a stricter caller refuses only rewrites links in vain.
    /// Also a lone surrogate escape (`"\ud800"`, which both read) and a
    /// leading UTF-8 byte order mark (Python's `json.loads` of bytes, and
    /// JavaScript's `Response.json()`, skip it; a stray one in a PHP file
    /// puts it before an answer).
    AnyCaller,
    /// PHP's `json_decode` as Laravel calls it on a request body: 511
    /// containers nested, a number beyond f64 read as infinity. A body Tallyfy
    /// reads must be read as Tallyfy reads it: one it reads and the scan
    /// refused would pass with its dates unrewritten.
    Php,
}

impl Reader {
    /// The most containers nested.
    pub(crate) const fn max_depth(self) -> usize {
        match self {
            // Bounded by the body itself: the stack is on the heap.
            Reader::AnyCaller => usize::MAX,
            // Laravel's depth, 512, counts the innermost value as a level too.
            Reader::Php => 511,
        }
    }
}

/// A JSON string token. `start..end` spans the token including both quotes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StrToken {
    pub start: usize,
    pub end: usize,
    /// Whether the raw content contains at least one backslash escape.
    pub escaped: bool,
}

impl StrToken {
    /// The raw bytes between the quotes (escapes not decoded).
    pub fn raw<'a>(&self, body: &'a [u8]) -> &'a [u8] {
        &body[self.start + 1..self.end - 1]
    }

    /// The span of the raw content, without the quotes.
    pub fn content(&self) -> Range<usize> {
        self.start + 1..self.end - 1
    }
}

/// Receives the tokens a scan finds. All methods are called in document order.
pub(crate) trait Visitor {
    /// Per-value context; the root value gets the context passed to [`scan`].
    type Ctx: Copy;
    /// An object key; `object` is the context of the object. Returns the context of the key's value.
    fn key(&mut self, body: &[u8], object: Self::Ctx, key: StrToken) -> Self::Ctx;
    /// An array element is about to start; returns its context.
    fn element(&mut self, array: Self::Ctx) -> Self::Ctx;
    /// A string value (never a key).
    fn string(&mut self, body: &[u8], ctx: Self::Ctx, token: StrToken);
    /// A number value; `span` covers exactly the number's bytes.
    fn number(&mut self, body: &[u8], ctx: Self::Ctx, span: Range<usize>);
}

#[derive(Clone, Copy)]
struct Frame<C> {
    object: bool,
    ctx: C,
}

/// Scans `body` as one JSON document, reporting tokens to `visitor`.
///
/// On `Err` the visitor may already have seen some tokens; callers must discard what it collected.
pub(crate) fn scan<V: Visitor>(
    reader: Reader,
    body: &[u8],
    root: V::Ctx,
    visitor: &mut V,
) -> Result<(), Invalid> {
    let max_depth = reader.max_depth();
    if std::str::from_utf8(body).is_err() {
        return Err(Invalid);
    }
    let mut stack: Vec<Frame<V::Ctx>> = Vec::with_capacity(16);
    let mut i = match reader {
        Reader::AnyCaller if body.starts_with(b"\xEF\xBB\xBF") => 3,
        _ => 0,
    };
    let mut ctx = root;
    'value: loop {
        i = skip_ws(body, i);
        match body.get(i).copied() {
            Some(open @ (b'{' | b'[')) => {
                if stack.len() >= max_depth {
                    return Err(Invalid);
                }
                let object = open == b'{';
                stack.push(Frame { object, ctx });
                i = skip_ws(body, i + 1);
                let close = if object { b'}' } else { b']' };
                if body.get(i) == Some(&close) {
                    stack.pop();
                    i += 1;
                } else if object {
                    (i, ctx) = read_key(body, i, ctx, visitor, reader)?;
                    continue 'value;
                } else {
                    ctx = visitor.element(ctx);
                    continue 'value;
                }
            }
            Some(b'"') => {
                let (end, escaped) = scan_string(body, i, reader)?;
                visitor.string(body, ctx, StrToken { start: i, end, escaped });
                i = end;
            }
            Some(b'-' | b'0'..=b'9') => {
                let end = scan_number(body, i)?;
                visitor.number(body, ctx, i..end);
                i = end;
            }
            Some(b't') => i = literal(body, i, b"true")?,
            Some(b'f') => i = literal(body, i, b"false")?,
            Some(b'n') => i = literal(body, i, b"null")?,
            _ => return Err(Invalid),
        }
        // A value is complete: close containers until the next value starts or the document ends.
        loop {
            i = skip_ws(body, i);
            let Some(&frame) = stack.last() else {
                return if i == body.len() { Ok(()) } else { Err(Invalid) };
            };
            match (body.get(i).copied(), frame.object) {
                (Some(b','), true) => {
                    (i, ctx) = read_key(body, skip_ws(body, i + 1), frame.ctx, visitor, reader)?;
                    continue 'value;
                }
                (Some(b','), false) => {
                    i += 1;
                    ctx = visitor.element(frame.ctx);
                    continue 'value;
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    stack.pop();
                    i += 1;
                }
                _ => return Err(Invalid),
            }
        }
    }
}

/// Reads `"key"` `:` at `i`; returns the position after the colon and the value's context.
fn read_key<V: Visitor>(
    body: &[u8],
    i: usize,
    obj: V::Ctx,
    v: &mut V,
    reader: Reader,
) -> Result<(usize, V::Ctx), Invalid> {
    if body.get(i) != Some(&b'"') {
        return Err(Invalid);
    }
    let (end, escaped) = scan_string(body, i, reader)?;
    let ctx = v.key(body, obj, StrToken { start: i, end, escaped });
    let colon = skip_ws(body, end);
    if body.get(colon) != Some(&b':') {
        return Err(Invalid);
    }
    Ok((colon + 1, ctx))
}

#[inline]
fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = body.get(i) {
        i += 1;
    }
    i
}

/// Bytes that end the fast path inside a string: quote, backslash, control characters.
const STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Scans the string starting with the quote at `i`; returns (index after the closing quote, escaped?).
pub(crate) fn scan_string(body: &[u8], i: usize, reader: Reader) -> Result<(usize, bool), Invalid> {
    let mut i = i + 1;
    let mut escaped = false;
    loop {
        i = skip_plain(body, i);
        match body.get(i) {
            Some(b'"') => return Ok((i + 1, escaped)),
            Some(b'\\') => {
                escaped = true;
                i = scan_escape(body, i, reader)?;
            }
            _ => return Err(Invalid), // end of input or a raw control character
        }
    }
}

/// The index of the first quote, backslash or control character at or after
/// `i` (or `body.len()`): most of a body is the plain inside of strings.
#[inline]
fn skip_plain(body: &[u8], i: usize) -> usize {
    skip_unescaped::<false>(body, i)
}

/// The index of the first byte at or after `i` that a JSON string escapes
/// (quote, backslash, control character) or, with `LOG`, the delete character
/// and any byte of a non-ASCII character too (the access log looks at each such
/// character: Rust's `Debug` escapes the unprintable ones); `body.len()` if
/// none. Read eight bytes at a time.
#[inline]
pub(crate) fn skip_unescaped<const LOG: bool>(body: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    // Flags the bytes of `word` below `n` (n <= 0x80). A borrow can also flag
    // bytes after a flagged one, never before it: the lowest flag is exact.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let equal = |word: u64, b: u8| below(word ^ (ONES * u64::from(b)), 1);
    while let Some(chunk) = body.get(i..i + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let mut stops = below(word, 0x20) | equal(word, b'"') | equal(word, b'\\');
        if LOG {
            stops |= equal(word, 0x7f) | (word & HIGHS);
        }
        if stops != 0 {
            // Little-endian: the lowest flag is the first such byte in the body.
            return i + (stops.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while body.get(i).is_some_and(|&b| !(STRING_STOP[usize::from(b)] || (LOG && b >= 0x7f))) {
        i += 1;
    }
    i
}

/// Validates the escape whose backslash is at `i`; returns the index after it.
fn scan_escape(body: &[u8], i: usize, reader: Reader) -> Result<usize, Invalid> {
    match body.get(i + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
        // Any code unit, a surrogate alone too: read as it is.
        Some(b'u') if reader == Reader::AnyCaller => hex4(body, i + 2).map(|_| i + 6).ok_or(Invalid),
        Some(b'u') => match hex4(body, i + 2).ok_or(Invalid)? {
            0xD800..=0xDBFF => {
                // A high surrogate must be followed by an escaped low surrogate.
                if body.get(i + 6..i + 8) != Some(b"\\u") {
                    return Err(Invalid);
                }
                match hex4(body, i + 8) {
                    Some(0xDC00..=0xDFFF) => Ok(i + 12),
                    _ => Err(Invalid),
                }
            }
            0xDC00..=0xDFFF => Err(Invalid),
            _ => Ok(i + 6),
        },
        _ => Err(Invalid),
    }
}

/// The value of four hex digits at `at`, if present.
pub(crate) fn hex4(body: &[u8], at: usize) -> Option<u16> {
    let digits = body.get(at..at + 4)?;
    let mut n = 0u16;
    for &d in digits {
        n = n << 4 | u16::from((d as char).to_digit(16)? as u8);
    }
    Some(n)
}

fn scan_number(body: &[u8], start: usize) -> Result<usize, Invalid> {
    let mut i = start;
    let digits = |body: &[u8], mut i: usize| {
        while body.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    if body[i] == b'-' {
        i += 1;
    }
    match body.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(body, i + 1),
        _ => return Err(Invalid),
    }
    if body.get(i) == Some(&b'.') {
        if !body.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return Err(Invalid);
        }
        i = digits(body, i + 1);
    }
    if let Some(b'e' | b'E') = body.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = body.get(i) {
            i += 1;
        }
        if !body.get(i).is_some_and(u8::is_ascii_digit) {
            return Err(Invalid);
        }
        i = digits(body, i);
    }
    // Every reader takes a number overflowing f64 (`1e309`) as infinity, or
    // in full: only the grammar is checked.
    Ok(i)
}

fn literal(body: &[u8], i: usize, word: &[u8]) -> Result<usize, Invalid> {
    if body.get(i..i + word.len()) == Some(word) { Ok(i + word.len()) } else { Err(Invalid) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The byte-at-a-time answer [`skip_plain`] must give.
    fn first_stop(body: &[u8], i: usize) -> usize {
        body[i..].iter().position(|&b| STRING_STOP[usize::from(b)]).map_or(body.len(), |at| i + at)
    }

    #[test]
    fn every_stop_byte_is_found_at_every_offset_of_a_word() {
        let stops = (0u8..0x20).chain([b'"', b'\\']);
        for stop in stops {
            for len in 0..24 {
                for at in 0..len {
                    // Plain bytes on both sides, including the ones a borrow could confuse.
                    let mut body: Vec<u8> =
                        (0..len).map(|n| [b'a', 0x21, 0x80, 0xff, b'#', b']'][n % 6]).collect();
                    body[at] = stop;
                    for start in 0..=at {
                        assert_eq!(
                            skip_plain(&body, start),
                            at,
                            "stop {stop:#x} at {at} of {len}, from {start}"
                        );
                    }
                }
                let plain = vec![b'x'; len];
                assert_eq!(skip_plain(&plain, 0), len);
            }
        }
    }

    #[test]
    fn delete_and_high_bytes_stop_only_for_the_log() {
        for len in 1..24 {
            for at in 0..len {
                for stop in [0x7f, 0x80, 0xe2, 0xff] {
                    let mut body: Vec<u8> = (0..len).map(|n| [b'a', 0x7e, 0x20][n % 3]).collect();
                    body[at] = stop;
                    for start in 0..=at {
                        assert_eq!(skip_unescaped::<true>(&body, start), at, "{stop:#x} at {at} of {len}");
                        assert_eq!(skip_unescaped::<false>(&body, start), len, "{stop:#x} is plain in JSON");
                    }
                    body[at] = b'"';
                    assert_eq!(skip_unescaped::<true>(&body, 0), at, "a quote still stops");
                }
            }
        }
    }

    /// What JavaScript's `JSON.parse` and Python's `json` read and PHP's
    /// `json_decode` refuses: a lone surrogate escape, and (for Python's
    /// bytes reader and `Response.json()`) a leading byte order mark.
    #[test]
    fn any_callers_reader_takes_lone_surrogates_and_a_leading_bom() {
        struct Strings(Vec<Range<usize>>);
        impl Visitor for Strings {
            type Ctx = ();
            fn key(&mut self, _: &[u8], _: (), _: StrToken) {}
            fn element(&mut self, _: ()) {}
            fn string(&mut self, _: &[u8], _: (), token: StrToken) {
                self.0.push(token.content());
            }
            fn number(&mut self, _: &[u8], _: (), _: Range<usize>) {}
        }
        for body in [&br#"{"s":"\ud800","t":"\udc00x","u":"\ud800\ud800"}"#[..], b"\xEF\xBB\xBF{\"s\":\"x\"}"]
        {
            assert!(scan(Reader::AnyCaller, body, (), &mut Strings(Vec::new())).is_ok(), "{body:?}");
            assert!(scan(Reader::Php, body, (), &mut Strings(Vec::new())).is_err(), "PHP refuses {body:?}");
        }
        let mut strings = Strings(Vec::new());
        scan(Reader::AnyCaller, b"\xEF\xBB\xBF[\"ab\"]", (), &mut strings).expect("valid");
        assert_eq!(
            (strings.0.len(), strings.0.first().cloned()),
            (1, Some(5..7)),
            "spans count the mark's bytes"
        );
        for broken in [
            &br#""\ud8""#[..],
            br#""\u12G4""#,
            b"\xEF\xBB\xBF",
            b"\xEF\xBB\xBF\xEF\xBB\xBF[]",
            b" \xEF\xBB\xBF[]",
        ] {
            assert!(scan(Reader::AnyCaller, broken, (), &mut Strings(Vec::new())).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn two_stops_in_one_word_give_the_first() {
        assert_eq!(skip_plain(b"ab\"c\\def", 0), 2);
        assert_eq!(skip_plain(b"ab\x00\"cdefgh", 0), 2);
        assert_eq!(skip_plain(b"abcdefg\\\"", 0), 7);
        assert_eq!(skip_plain(b"\"\"\"\"\"\"\"\"", 3), 3);
    }

    proptest! {
        #[test]
        fn skip_plain_agrees_with_a_byte_at_a_time_scan(body in proptest::collection::vec(any::<u8>(), 0..64), start in 0usize..64) {
            let start = start.min(body.len());
            prop_assert_eq!(skip_plain(&body, start), first_stop(&body, start));
        }

        #[test]
        fn strings_validate_as_serde_json_does(content in "[a-z\"\\\\\\x00-\\x1f\u{e9}\u{1F600}u0-9A-F]{0,24}") {
            let body = format!("\"{content}\"");
            struct Ignore;
            impl Visitor for Ignore {
                type Ctx = ();
                fn key(&mut self, _: &[u8], _: (), _: StrToken) {}
                fn element(&mut self, _: ()) {}
                fn string(&mut self, _: &[u8], _: (), _: StrToken) {}
                fn number(&mut self, _: &[u8], _: (), _: Range<usize>) {}
            }
            let ours = scan(Reader::Php, body.as_bytes(), (), &mut Ignore).is_ok();
            let serde = serde_json::from_str::<serde_json::Value>(&body).is_ok();
            prop_assert_eq!(ours, serde, "{:?}", body);
            // Any caller's reader takes all serde_json takes (and lone surrogates).
            prop_assert!(!serde || scan(Reader::AnyCaller, body.as_bytes(), (), &mut Ignore).is_ok());
        }
    }
}
