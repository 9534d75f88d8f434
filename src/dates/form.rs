//! Date rewriting in `application/x-www-form-urlencoded` bodies.
//!
//! Names use the bracket convention PHP/Laravel read: `deadline`, `tasks[step][deadline]`,
//! `prerun[field_id]`, `taskdata[field_id][]`. A pair is a date candidate when
//! * some segment other than the last is a `form_objects` name (form content: no epoch forms), or
//! * otherwise, its last segment is a `fields` name (epoch-seconds strings accepted).
//!
//! Names and values are decoded (`+` is a space, `%XX` a byte; a malformed `%` stays literal).
//! Only changed values are re-encoded, as a browser would: ASCII letters, digits and `*-._` stay,
//! a space becomes `+`, every other byte `%XX` (so `:` is `%3A`). All other bytes stay as they came.

use std::borrow::Cow;

use super::convert::convert_value;
use super::{DateRules, Rewrite};
use crate::json::{Edit, splice};
use crate::method_override::php_full_name;

/// Rewrites the date values of a form body. Never fails: anything unreadable is left alone.
pub fn rewrite_form(body: &[u8], rules: &DateRules) -> Rewrite {
    let mut edits = Vec::new();
    let mut start = 0;
    for pair in body.split(|&b| b == b'&') {
        let pair_start = start;
        start += pair.len() + 1;
        let Some(eq) = memchr::memchr(b'=', pair) else { continue };
        let Some(allow_epoch) = classify(&decode_component(&pair[..eq]), rules) else { continue };
        let value = decode_component(&pair[eq + 1..]);
        let Ok(value) = std::str::from_utf8(&value) else { continue };
        if let Some(new) = convert_value(value, rules, allow_epoch) {
            let range = pair_start + eq + 1..pair_start + pair.len();
            edits.push(Edit { range, bytes: encode_component(new.as_bytes()) });
        }
    }
    Rewrite { dates_rewritten: edits.len(), body: splice(body, &edits) }
}

/// Pre-scan of a form body's start (it may end mid-pair): `true` when some pair's
/// name is a date position, so the whole body would need rewriting.
pub fn form_may_need_rewrite(body: &[u8], rules: &DateRules) -> bool {
    body.split(|&b| b == b'&').any(|pair| {
        let name = memchr::memchr(b'=', pair).map_or(pair, |eq| &pair[..eq]);
        classify(&decode_component(name), rules).is_some()
    })
}

/// `Some(allow_epoch)` when the decoded name, as PHP registers it ([`php_full_name`]: `+deadline`,
/// `dead.line`, `deadline%00x` fold to names Tallyfy reads), is a date position: `Some(false)` inside
/// a form object, `Some(true)` for a field, `None` otherwise.
fn classify(name: &[u8], rules: &DateRules) -> Option<bool> {
    let name = php_full_name(name);
    let segments = segments(&name);
    let (last, parents) = segments.split_last()?;
    let is = |names: &[String], seg: &[u8]| names.iter().any(|n| n.as_bytes() == seg);
    if parents.iter().any(|seg| is(&rules.form_objects, seg)) {
        Some(false)
    } else if is(&rules.fields, last) {
        Some(true)
    } else {
        None
    }
}

/// `a[b][c]` -> `a`, `b`, `c`. Parsing stops at the first malformed bracket (its rest is ignored).
fn segments(name: &[u8]) -> Vec<&[u8]> {
    let base_end = memchr::memchr(b'[', name).unwrap_or(name.len());
    let mut out = vec![&name[..base_end]];
    let mut rest = &name[base_end..];
    while let Some(inner) = rest.strip_prefix(b"[") {
        let Some(close) = memchr::memchr(b']', inner) else { break };
        out.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    out
}

/// Decodes one name or value: `+` to space, `%XX` to its byte; a malformed `%` stays as it is.
fn decode_component(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.iter().any(|&b| b == b'+' || b == b'%') {
        return Cow::Borrowed(raw);
    }
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match (b, hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// Encodes a value as `application/x-www-form-urlencoded` does.
fn encode_component(value: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(b),
            b' ' => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xF)]]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_the_bracket_convention() {
        assert_eq!(segments(b"deadline"), [&b"deadline"[..]]);
        assert_eq!(segments(b"tasks[s1][deadline]"), [&b"tasks"[..], b"s1", b"deadline"]);
        assert_eq!(segments(b"taskdata[f][]"), [&b"taskdata"[..], b"f", b""]);
        assert_eq!(segments(b"a[b"), [&b"a"[..]]);
    }

    #[test]
    fn components_round_trip() {
        assert_eq!(&*decode_component(b"a+b%3Ac%zz%4"), b"a b:c%zz%4");
        assert_eq!(encode_component(b"2025-15-07 17:00:00"), b"2025-15-07+17%3A00%3A00");
    }
}
