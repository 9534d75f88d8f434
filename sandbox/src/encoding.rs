//! Small text codecs: percent-decoding, form and query parsing, hex.

use std::fmt::Write as _;

/// Percent-decodes `input` (and `+` as a space in form/query context). A `%`
/// not followed by two hex digits stays literal, as PHP's `urldecode` does.
/// `None` when the result is not UTF-8.
pub(super) fn percent_decode(input: &str, plus_is_space: bool) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i + 1..i + 3) {
            Some(&[high, low]) if bytes[i] == b'%' => hex_pair(high, low),
            _ => None,
        };
        if let Some(byte) = escaped {
            out.push(byte);
            i += 3;
            continue;
        }
        match bytes[i] {
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_pair(high: u8, low: u8) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(high)? * 16 + digit(low)?) as u8)
}

/// `application/x-www-form-urlencoded` pairs; `None` when not decodable.
pub(super) fn parse_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(name, true)?, percent_decode(value, true)?))
        })
        .collect()
}

/// The first non-empty value of `name` in form pairs.
pub(super) fn form_value<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, v)| n == name && !v.is_empty()).map(|(_, v)| v.as_str())
}

/// The decoded value of `name` in a raw query string.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(n, true)? == name).then(|| percent_decode(v, true)).flatten()
    })
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// `chars` random lowercase hex characters (rounded up to an even count).
pub(super) fn random_hex(chars: usize) -> String {
    let mut bytes = vec![0u8; chars.div_ceil(2)];
    rand::fill(&mut bytes[..]);
    hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_and_plus() {
        assert_eq!(percent_decode("a%40b.com", false).as_deref(), Some("a@b.com"));
        assert_eq!(percent_decode("a+b%2", true).as_deref(), Some("a b%2"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%ff", false), None);
    }

    #[test]
    fn parses_forms_and_queries() {
        let form = parse_form(b"grant_type=password&username=a%40b.c&password=x+y&empty=").expect("form");
        assert_eq!(form_value(&form, "username"), Some("a@b.c"));
        assert_eq!(form_value(&form, "password"), Some("x y"));
        assert_eq!(form_value(&form, "empty"), None);
        assert_eq!(query_param(Some("page=2&per_page=5"), "per_page").as_deref(), Some("5"));
        assert_eq!(query_param(None, "page"), None);
        assert_eq!(random_hex(32).len(), 32);
    }
}
