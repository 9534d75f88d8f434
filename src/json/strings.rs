//! JSON string contents: decoding escapes, writing plain strings, and the escape check of the pre-scans.
//!
//! Decoding assumes the raw bytes were accepted by [`super::scan`] (valid UTF-8, valid escapes,
//! paired surrogates); on anything else it returns `None` rather than panicking.

use std::borrow::Cow;

use super::scan::hex4;

/// Iterates the characters of raw string content, decoding escapes.
/// Yields each character with the raw index just after it.
pub(crate) struct JsonChars<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl<'a> JsonChars<'a> {
    pub fn new(raw: &'a [u8]) -> Self {
        JsonChars { raw, pos: 0 }
    }
}

impl Iterator for JsonChars<'_> {
    type Item = (char, usize);

    fn next(&mut self) -> Option<(char, usize)> {
        let raw = self.raw;
        let first = *raw.get(self.pos)?;
        let (c, len) = if first == b'\\' {
            decode_escape(raw, self.pos)?
        } else {
            // Valid UTF-8 was checked by the scanner; decode one character.
            let len = match first {
                0x00..=0x7F => 1,
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let s = std::str::from_utf8(raw.get(self.pos..self.pos + len)?).ok()?;
            (s.chars().next()?, len)
        };
        self.pos += len;
        Some((c, self.pos))
    }
}

/// Decodes the escape at `at` (a backslash); returns the character and the escape's raw length.
fn decode_escape(raw: &[u8], at: usize) -> Option<(char, usize)> {
    let c = match raw.get(at + 1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let unit = hex4(raw, at + 2)?;
            if (0xD800..0xDC00).contains(&unit) {
                if raw.get(at + 6..at + 8)? != b"\\u" {
                    return None;
                }
                let low = hex4(raw, at + 8)?;
                let code =
                    0x10000 + ((u32::from(unit) - 0xD800) << 10) + u32::from(low).checked_sub(0xDC00)?;
                return Some((char::from_u32(code)?, 12));
            }
            return Some((char::from_u32(u32::from(unit))?, 6));
        }
        _ => return None,
    };
    Some((c, 2))
}

/// The decoded content of a string token. Borrows when there are no escapes.
pub(crate) fn decode(raw: &[u8], escaped: bool) -> Option<Cow<'_, str>> {
    if !escaped {
        return std::str::from_utf8(raw).ok().map(Cow::Borrowed);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = JsonChars::new(raw);
    let mut consumed = 0;
    for (c, end) in chars.by_ref() {
        out.push(c);
        consumed = end;
    }
    (consumed == raw.len()).then_some(Cow::Owned(out))
}

/// Appends `s` as JSON string content (no quotes), escaping only what JSON requires.
pub(crate) fn push_escaped(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1F => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            }
            _ => out.push(b),
        }
    }
}

/// The set of ASCII bytes occurring in `names` (the pre-scans' "could an escape spell one of these?").
pub(crate) fn ascii_set<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> [bool; 128] {
    let mut set = [false; 128];
    for name in names {
        for &b in name {
            if b < 0x80 {
                set[usize::from(b)] = true;
            }
        }
    }
    set
}

/// Whether `body` has a backslash escape that decodes to an ASCII byte in `set`.
///
/// A key or value can only spell a needle without containing its plain bytes through such an
/// escape, so a pre-scan that found no plain needle and gets `false` here may skip the full scan.
/// Conservative: an escaped backslash (`\\u0064`) may give a false `true`, never a false `false`.
pub(crate) fn escape_may_hide(body: &[u8], set: &[bool; 128]) -> bool {
    memchr::memchr_iter(b'\\', body).any(|at| {
        let decoded = match body.get(at + 1) {
            Some(b'u') => match hex4(body, at + 2) {
                Some(unit) if unit < 0x80 => unit as u8,
                _ => return false,
            },
            Some(b'b') => 0x08,
            Some(b'f') => 0x0C,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(&other) => other,
            None => return false,
        };
        decoded < 0x80 && set[usize::from(decoded)]
    })
}
