//! PHP's multipart syntax (`main/rfc1867.c`), as far as the screen needs it:
//! the boundary of a content type, the line that starts a part, a part's header
//! entries, and the `name` parameters of its `Content-Disposition`.

use memchr::memmem;

use super::super::{PARAM, php_name};

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

pub(super) enum Line {
    /// The line after `--boundary` has not ended yet.
    Incomplete,
    /// `--boundary` then more than a line end: not a part.
    Other,
    /// A part starts; the line end is this many bytes long.
    Boundary(usize),
}

/// What follows a `--boundary`, as PHP's `find_boundary` compares it: the line
/// (CR LF or LF cut off, and ended early by a NUL) must be exactly `--boundary`.
/// The first `searched` bytes of `rest` are known to hold no line feed.
pub(super) fn boundary_line(rest: &[u8], searched: usize) -> Line {
    match rest {
        [] | [b'\r'] => Line::Incomplete,
        [b'\n', ..] => Line::Boundary(1),
        [b'\r', b'\n', ..] => Line::Boundary(2),
        [0, ..] => {
            let from = searched.max(1);
            match memchr::memchr(b'\n', super::unsearched(rest, from)) {
                Some(newline) => Line::Boundary(from + newline + 1),
                None => Line::Incomplete,
            }
        }
        _ => Line::Other,
    }
}

/// A part's header entries, gathered as PHP's `multipart_buffer_headers` does:
/// a line with a colon starts an entry, a line without one (or starting with
/// white space) continues the previous one.
#[derive(Debug, Clone, Default)]
pub(super) struct PartHeaders {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl PartHeaders {
    pub(super) fn add_line(&mut self, line: &[u8]) {
        let colon = if line.first().is_some_and(|&b| is_c_space(b)) {
            None
        } else {
            line.iter().position(|&b| b == b':')
        };
        match colon {
            Some(colon) => {
                let value = &line[colon + 1..];
                let value = &value[value.iter().position(|&b| !is_c_space(b)).unwrap_or(value.len())..];
                self.entries.push((line[..colon].to_vec(), value.to_vec()));
            }
            None => {
                if let Some((_, value)) = self.entries.last_mut() {
                    value.extend_from_slice(line);
                }
            }
        }
    }

    /// Whether any `Content-Disposition` names a field PHP registers as
    /// `_method` (PHP reads the first; every one is judged).
    pub(super) fn names_override(&self) -> bool {
        self.entries
            .iter()
            .filter(|(key, _)| key.trim_ascii().eq_ignore_ascii_case(b"content-disposition"))
            .any(|(_, value)| field_names(value).iter().any(|name| php_name(name).0 == PARAM))
    }
}

/// C's `isspace`.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Every `name=` parameter of a `Content-Disposition` value, as PHP reads each.
pub(super) fn field_names(value: &[u8]) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    for pair in split_unquoted(value.trim_ascii_start(), b';') {
        let pair = pair.trim_ascii_start();
        let Some(eq) = split_unquoted(pair, b'=').next().map(<[u8]>::len).filter(|&n| n < pair.len()) else {
            continue;
        };
        if pair[..eq].eq_ignore_ascii_case(b"name") {
            names.push(unquote(pair[eq + 1..].trim_ascii_start()));
        }
    }
    names
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
