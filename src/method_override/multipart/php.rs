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

/// Every `name=` parameter of a `Content-Disposition` value, as PHP's
/// `rfc1867_post_handler` reads each: pairs split at `;` by `php_ap_getword`
/// (a run of `;` is one separator), C white space skipped before each, a pair
/// with an `=` split at its first one (a run of `=` again one separator), its
/// key compared whole, and the value read by `php_ap_getword_conf`. So
/// `name==_method` and `name=\x0b_method` name `_method`, as PHP registers them.
pub(super) fn field_names(value: &[u8]) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    let mut rest = skip_c_space(value);
    while !rest.is_empty() {
        let (pair, after) = getword(rest, b';');
        rest = skip_c_space(after);
        if pair.contains(&b'=') {
            let (key, value) = getword(pair, b'=');
            if key.eq_ignore_ascii_case(b"name") {
                names.push(getword_conf(value));
            }
        }
    }
    names
}

fn skip_c_space(text: &[u8]) -> &[u8] {
    &text[text.iter().position(|&b| !is_c_space(b)).unwrap_or(text.len())..]
}

/// `php_ap_getword`: the text up to the first `stop` outside single or double
/// quotes (a backslash escapes the quote inside), and what follows the run of
/// `stop`s there; the whole text and nothing when there is no `stop`.
fn getword(text: &[u8], stop: u8) -> (&[u8], &[u8]) {
    let mut i = 0;
    while i < text.len() && text[i] != stop {
        let quote = text[i];
        i += 1;
        if quote == b'"' || quote == b'\'' {
            while i < text.len() && text[i] != quote {
                i += if text[i] == b'\\' && text.get(i + 1) == Some(&quote) { 2 } else { 1 };
            }
            i += 1;
        }
    }
    if i >= text.len() {
        return (text, &[]);
    }
    let after = text[i..].iter().position(|&b| b != stop).map_or(text.len(), |n| i + n);
    (&text[..i], &text[after..])
}

/// `php_ap_getword_conf`: after C white space, a quoted value up to its
/// closing quote, or an unquoted one up to the next C white space; a backslash
/// escapes a backslash (and, quoted, the quote).
fn getword_conf(value: &[u8]) -> Vec<u8> {
    let value = skip_c_space(value);
    let (text, quote) = match value.first() {
        Some(&quote @ (b'"' | b'\'')) => (&value[1..], Some(quote)),
        _ => (&value[..value.iter().position(|&b| is_c_space(b)).unwrap_or(value.len())], None),
    };
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() && Some(text[i]) != quote {
        if text[i] == b'\\' && text.get(i + 1).is_some_and(|&next| next == b'\\' || Some(next) == quote) {
            i += 1;
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::field_names;

    #[test]
    fn names_are_read_as_php_reads_them() {
        let names = |value: &[u8]| field_names(value);
        let one = |name: &[u8]| vec![name.to_vec()];
        assert_eq!(names(b"form-data; name=\"a\""), one(b"a"));
        assert_eq!(names(b"form-data; name==b"), one(b"b"), "a run of = is one separator");
        assert_eq!(names(b"form-data;;;name=c"), one(b"c"), "and a run of ;");
        assert_eq!(names(b"form-data;\x0bname=\x0bd\x0be"), one(b"d"), "C white space");
        assert_eq!(names(b"form-data; name =x"), Vec::<Vec<u8>>::new(), "the key is compared whole");
        assert_eq!(names(b"form-data; name=\"a\\\"b\\\\c\""), one(b"a\"b\\c"), "escapes, quoted");
        assert_eq!(names(b"form-data; name=a\\\\b\\c"), one(b"a\\b\\c"), "and unquoted");
        assert_eq!(names(b"form-data; x=\"; name=no\"; name=yes"), one(b"yes"), "quotes hide a ;");
        assert_eq!(names(b"form-data; name=\"open; x=y"), one(b"open; x=y"), "to the end when unclosed");
        assert_eq!(names(b"form-data; \"name=q\""), Vec::<Vec<u8>>::new(), "quotes hide an =");
        assert_eq!(names(b"form-data; name=a; NAME='b'"), vec![b"a".to_vec(), b"b".to_vec()]);
    }
}
