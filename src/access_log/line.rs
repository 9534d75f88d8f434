//! One access line, written by hand: text in tracing's layout
//! (`<time>  INFO tallyfy_proxy::access: request key=value ...`) or one JSON
//! object, with every string value quoted and escaped so that no caller-chosen
//! byte can end a value or forge a field. No allocation: numbers are written
//! with `itoa`/`ryu`-free arithmetic and the timestamp's second is cached.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::json::scan::skip_unescaped;

/// A field's value.
pub enum Value<'a> {
    Str(&'a str),
    Int(u64),
    Millis(std::time::Duration),
    Bool(bool),
    /// A token (a method): written as a JSON string, and bare in text.
    Bare(&'a str),
    /// The caller's address: as [`Value::Bare`].
    Peer(SocketAddr),
}

/// The line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Writes one line: `level` (`INFO`, `WARN`, `ERROR`), message `request`, and
/// the fields that are present.
pub fn write(out: &mut Vec<u8>, format: Format, level: &str, fields: &[(&str, Option<Value<'_>>)]) {
    let start = out.len();
    match format {
        Format::Text => {
            timestamp(out);
            out.extend_from_slice(if level.len() == 4 { b"  " } else { b" " });
            out.extend_from_slice(level.as_bytes());
            out.extend_from_slice(b" tallyfy_proxy::access: request");
            for (key, value) in fields {
                let Some(value) = value else { continue };
                out.push(b' ');
                out.extend_from_slice(key.as_bytes());
                out.push(b'=');
                match value {
                    Value::Str(s) => text_string(out, s),
                    Value::Int(n) => int(out, *n),
                    Value::Millis(d) => millis(out, *d),
                    Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
                    Value::Bare(s) => out.extend_from_slice(s.as_bytes()),
                    Value::Peer(peer) => address(out, peer),
                }
            }
        }
        Format::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(out);
            out.extend_from_slice(b"\",\"level\":\"");
            out.extend_from_slice(level.as_bytes());
            out.extend_from_slice(b"\",\"message\":\"request\"");
            for (key, value) in fields {
                let Some(value) = value else { continue };
                out.extend_from_slice(b",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
                match value {
                    Value::Str(s) => json_string(out, s),
                    Value::Int(n) => int(out, *n),
                    Value::Millis(d) => millis(out, *d),
                    Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
                    Value::Bare(s) => json_string(out, s),
                    Value::Peer(peer) => {
                        out.push(b'"');
                        address(out, peer);
                        out.push(b'"');
                    }
                }
            }
            out.extend_from_slice(b",\"target\":\"tallyfy_proxy::access\"}");
        }
    }
    debug_assert!(!out[start..].contains(&b'\n'), "one line");
    out.push(b'\n');
}

fn int(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Milliseconds with three decimals (microsecond resolution).
fn millis(out: &mut Vec<u8>, d: std::time::Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    int(out, micros / 1000);
    out.push(b'.');
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `a.b.c.d:port` written digit by digit; an IPv6 address through `Display`.
fn address(out: &mut Vec<u8>, peer: &SocketAddr) {
    match peer {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                int(out, u64::from(octet));
            }
            out.push(b':');
            int(out, u64::from(v4.port()));
        }
        SocketAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// A quoted string with `"`, `\`, control characters and the characters
/// `char::escape_debug` escapes (unprintable ones, and combining marks, which
/// `str`'s `Debug` escapes only at a string's start) written as tracing's text
/// format writes escapes: a line separator or a bidi override in a path cannot
/// rearrange or split the line a reader sees.
fn text_string(out: &mut Vec<u8>, s: &str) {
    quoted(
        out,
        s,
        |out, b| match short_escape(b) {
            Some(escape) => out.extend_from_slice(escape),
            None => {
                out.extend_from_slice(b"\\u{");
                hex2(out, b);
                out.push(b'}');
            }
        },
        |out, c| {
            use std::io::Write;
            let _ = write!(out, "{}", c.escape_debug());
        },
    );
}

/// As [`text_string`], in JSON's spelling (`\u2028`, surrogate pairs beyond
/// the first plane).
fn json_string(out: &mut Vec<u8>, s: &str) {
    quoted(
        out,
        s,
        |out, b| match short_escape(b) {
            Some(escape) => out.extend_from_slice(escape),
            None => {
                out.extend_from_slice(b"\\u00");
                hex2(out, b);
            }
        },
        |out, c| {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let [high, low] = unit.to_be_bytes();
                out.extend_from_slice(b"\\u");
                hex2(out, high);
                hex2(out, low);
            }
        },
    );
}

/// The escapes text and JSON spell alike.
fn short_escape(b: u8) -> Option<&'static [u8]> {
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        b'\n' => Some(b"\\n"),
        b'\r' => Some(b"\\r"),
        b'\t' => Some(b"\\t"),
        _ => None,
    }
}

/// `"s"`: the ASCII bytes a JSON string escapes, and the delete character,
/// written by `escape`; characters beyond ASCII that Rust's `Debug` would
/// escape (unprintable ones: line separators, bidi controls, zero-width
/// marks) written by `escape_char`, the printable ones kept; the runs between
/// copied whole (found eight bytes at a time).
fn quoted(
    out: &mut Vec<u8>,
    s: &str,
    escape: impl Fn(&mut Vec<u8>, u8),
    escape_char: impl Fn(&mut Vec<u8>, char),
) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run = 0;
    loop {
        let stop = skip_unescaped::<true>(bytes, run);
        out.extend_from_slice(&bytes[run..stop]);
        let Some(&b) = bytes.get(stop) else { break };
        if b.is_ascii() {
            escape(out, b);
            run = stop + 1;
            continue;
        }
        // The run before it is ASCII, so a character starts here.
        let Some(c) = s.get(stop..).and_then(|rest| rest.chars().next()) else { break };
        run = stop + c.len_utf8();
        if c.escape_debug().len() == 1 {
            out.extend_from_slice(&bytes[stop..run]);
        } else {
            escape_char(out, c);
        }
    }
    out.push(b'"');
}

fn hex2(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

thread_local! {
    /// The last second formatted (`YYYY-MM-DDTHH:MM:SS`) and its Unix time.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (UTC).
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let text = SECOND.with(|cached| {
        let (second, text) = cached.get();
        if second == secs {
            return text;
        }
        let text = civil(secs);
        cached.set((secs, text));
        text
    });
    out.extend_from_slice(&text);
    out.push(b'.');
    let micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SS` (proleptic Gregorian, UTC).
fn civil(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00";
    let put = |text: &mut [u8; 19], at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(&mut text, 0, 4, year as u64);
    put(&mut text, 5, 2, month as u64);
    put(&mut text, 8, 2, day as u64);
    put(&mut text, 11, 2, rem / 3600);
    put(&mut text, 14, 2, rem / 60 % 60);
    put(&mut text, 17, 2, rem % 60);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_time_matches_known_dates() {
        assert_eq!(&civil(0), b"1970-01-01T00:00:00");
        assert_eq!(&civil(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&civil(1_795_609_599), b"2026-11-25T12:26:39");
        assert_eq!(&civil(4_102_444_800), b"2100-01-01T00:00:00");
    }

    fn line(format: Format, fields: &[(&str, Option<Value<'_>>)]) -> String {
        let mut out = Vec::new();
        write(&mut out, format, "INFO", fields);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn text_values_are_quoted_and_cannot_forge_fields() {
        let forged = "x\" identity=idB status=200\nnext";
        let text = line(
            Format::Text,
            &[
                ("method", Some(Value::Bare("GET"))),
                ("peer", Some(Value::Peer(SocketAddr::from(([10, 0, 255, 7], 65_535))))),
                ("request_id", Some(Value::Str(forged))),
                ("status", Some(Value::Int(200))),
                ("latency_ms", Some(Value::Millis(Duration::from_micros(1_234_567)))),
                ("upstream_status", None),
                ("complete", Some(Value::Bool(true))),
            ],
        );
        assert!(text.ends_with(
            " INFO tallyfy_proxy::access: request method=GET peer=10.0.255.7:65535 request_id=\"x\\\" identity=idB status=200\\nnext\" status=200 latency_ms=1234.567 complete=true\n"
        ), "{text}");
        assert_eq!(text.matches('\n').count(), 1);
        assert_eq!(text.as_bytes()[26], b'Z', "microsecond UTC timestamp: {text}");
    }

    proptest::proptest! {
        /// Escaping found eight bytes at a time escapes exactly what a
        /// character-by-character pass picks, wherever it falls in a word.
        #[test]
        fn every_special_character_is_escaped_wherever_it_falls(
            s in "[a-z\u{0}-\u{1f}\"\\\\\u{7f}é😀\u{2028}\u{202e}\u{200b}\u{e0001}]{0,40}"
        ) {
            let mut expected = String::from("\"");
            for c in s.chars() {
                match c {
                    '\u{0}'..='\u{1f}' | '"' | '\\' | '\u{7f}' => expected.push('<'),
                    '\u{2028}' | '\u{202e}' | '\u{200b}' | '\u{e0001}' => expected.push('#'),
                    _ => expected.push(c),
                }
            }
            expected.push('"');
            let mut out = Vec::new();
            quoted(&mut out, &s, |out, _| out.push(b'<'), |out, _| out.push(b'#'));
            proptest::prop_assert_eq!(String::from_utf8(out).expect("UTF-8"), expected);
        }
    }

    #[test]
    fn unprintable_characters_cannot_rearrange_a_line() {
        // A line separator, a right-to-left override and a zero-width space
        // in a path; an accent and an emoji stay as they are.
        let path = "/api/caf\u{e9}\u{2028}status=200\u{202e}x\u{200b}\u{1f600}";
        let text = line(Format::Text, &[("path", Some(Value::Str(path)))]);
        assert!(
            text.ends_with(" path=\"/api/caf\u{e9}\\u{2028}status=200\\u{202e}x\\u{200b}\u{1f600}\"\n"),
            "{text}"
        );
        let json = line(Format::Json, &[("path", Some(Value::Str(path)))]);
        assert!(
            json.contains("\"path\":\"/api/caf\u{e9}\\u2028status=200\\u202ex\\u200b\u{1f600}\""),
            "{json}"
        );
        let parsed: serde_json::Value = serde_json::from_str(json.trim_end()).expect("one JSON object");
        assert_eq!(parsed["path"], path);
        // Beyond the first plane, JSON spells a surrogate pair.
        let tag = line(Format::Json, &[("path", Some(Value::Str("\u{e0001}")))]);
        assert!(tag.contains(r#""path":"\udb40\udc01""#), "{tag}");
        let parsed: serde_json::Value = serde_json::from_str(tag.trim_end()).expect("one JSON object");
        assert_eq!(parsed["path"], "\u{e0001}");
    }

    #[test]
    fn json_lines_parse_and_keep_every_value() {
        let text = line(
            Format::Json,
            &[
                ("path", Some(Value::Str("/api/\u{1}x\"\\"))),
                ("status", Some(Value::Int(0))),
                ("peer", Some(Value::Peer(SocketAddr::from(([127, 0, 0, 1], 9))))),
                ("peer6", Some(Value::Peer("[::1]:443".parse().expect("address")))),
                ("method", Some(Value::Bare("PATCH"))),
                ("identity", Some(Value::Str("tab\there \u{7f} é"))),
                ("error_code", None),
            ],
        );
        let json: serde_json::Value = serde_json::from_str(text.trim_end()).expect("one JSON object");
        assert_eq!(json["path"], "/api/\u{1}x\"\\");
        assert_eq!(json["status"], 0);
        assert_eq!(json["peer"], "127.0.0.1:9");
        assert_eq!(json["peer6"], "[::1]:443");
        assert_eq!(json["method"], "PATCH");
        assert_eq!(json["identity"], "tab\there \u{7f} é");
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["target"], "tallyfy_proxy::access");
        assert!(json.get("error_code").is_none());
    }
}
