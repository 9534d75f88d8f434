//! A streaming, validating JSON scanner: no DOM, no allocation per token.
//!
//! The scanner walks the body once, iteratively (an explicit stack, so deep nesting cannot overflow the
//! call stack), and reports object keys, string values and number values to a [`Visitor`] together with
//! their byte spans. Each container carries a small, visitor-defined context (`Visitor::Ctx`): the context
//! of the value a key or array element introduces is computed from the context of its container, so a
//! visitor can track "am I inside `prerun`?" without building a key path.
//!
//! Validation is as strict as `serde_json::from_slice::<serde_json::Value>`: UTF-8, string escapes
//! (including surrogate pairing), control characters, the number grammar, literals, structure,
//! trailing bytes, numbers overflowing f64 and the nesting limit of 127 containers all agree with
//! serde_json.

use std::ops::Range;

/// The body is not valid JSON (or nests deeper than [`MAX_DEPTH`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

/// Deepest container nesting accepted; the same limit serde_json applies (128 minus the root).
pub(crate) const MAX_DEPTH: usize = 127;

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
pub(crate) fn scan<V: Visitor>(body: &[u8], root: V::Ctx, visitor: &mut V) -> Result<(), Invalid> {
    if std::str::from_utf8(body).is_err() {
        return Err(Invalid);
    }
    let mut stack: Vec<Frame<V::Ctx>> = Vec::with_capacity(16);
    let mut i = 0;
    let mut ctx = root;
    'value: loop {
        i = skip_ws(body, i);
        match body.get(i).copied() {
            Some(open @ (b'{' | b'[')) => {
                if stack.len() >= MAX_DEPTH {
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
                    (i, ctx) = read_key(body, i, ctx, visitor)?;
                    continue 'value;
                } else {
                    ctx = visitor.element(ctx);
                    continue 'value;
                }
            }
            Some(b'"') => {
                let (end, escaped) = scan_string(body, i)?;
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
                    (i, ctx) = read_key(body, skip_ws(body, i + 1), frame.ctx, visitor)?;
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
fn read_key<V: Visitor>(body: &[u8], i: usize, obj: V::Ctx, v: &mut V) -> Result<(usize, V::Ctx), Invalid> {
    if body.get(i) != Some(&b'"') {
        return Err(Invalid);
    }
    let (end, escaped) = scan_string(body, i)?;
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
pub(crate) fn scan_string(body: &[u8], i: usize) -> Result<(usize, bool), Invalid> {
    let mut i = i + 1;
    let mut escaped = false;
    loop {
        while let Some(&b) = body.get(i) {
            if STRING_STOP[b as usize] {
                break;
            }
            i += 1;
        }
        match body.get(i) {
            Some(b'"') => return Ok((i + 1, escaped)),
            Some(b'\\') => {
                escaped = true;
                i = scan_escape(body, i)?;
            }
            _ => return Err(Invalid), // end of input or a raw control character
        }
    }
}

/// Validates the escape whose backslash is at `i`; returns the index after it.
fn scan_escape(body: &[u8], i: usize) -> Result<usize, Invalid> {
    match body.get(i + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
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
    let (mut i, mut exponent) = (start, false);
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
        exponent = true;
    }
    // Like serde_json, reject numbers that overflow f64 (`1e309`); only long or exponent forms can.
    if exponent || i - start > 308 {
        let text = std::str::from_utf8(&body[start..i]).map_err(|_| Invalid)?;
        if text.parse::<f64>().map_or(true, f64::is_infinite) {
            return Err(Invalid);
        }
    }
    Ok(i)
}

fn literal(body: &[u8], i: usize, word: &[u8]) -> Result<usize, Invalid> {
    if body.get(i..i + word.len()) == Some(word) { Ok(i + word.len()) } else { Err(Invalid) }
}
