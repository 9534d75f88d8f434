//! Test support shared by the dates and links property tests: a JSON document generator that renders
//! with random whitespace and random (valid) escapes, and an independent lexer for token comparison.

use proptest::prelude::*;

/// A JSON document before rendering.
#[derive(Debug, Clone)]
pub(crate) enum J {
    Null,
    Bool(bool),
    /// A number, already spelled as JSON.
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

/// Numbers: small, epoch-sized (9 to 11 digits), negative, fractions, exponents.
pub(crate) fn numbers() -> BoxedStrategy<String> {
    prop_oneof![
        any::<i32>().prop_map(|n| n.to_string()),
        (100_000_000u64..99_999_999_999).prop_map(|n| n.to_string()),
        (10_000_000u64..999_999_999_999).prop_map(|n| n.to_string()),
        Just("-1752598800".to_owned()),
        Just("1752598800.0".to_owned()),
        Just("1.7525988e9".to_owned()),
        Just("-0".to_owned()),
        Just("0.5E-3".to_owned()),
    ]
    .boxed()
}

/// Documents with keys and strings from the given strategies, nested up to a few levels.
pub(crate) fn documents(keys: BoxedStrategy<String>, strings: BoxedStrategy<String>) -> BoxedStrategy<J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        numbers().prop_map(J::Num),
        strings.clone().prop_map(J::Str),
        strings.prop_map(J::Str),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((keys.clone(), inner), 0..6).prop_map(J::Obj),
        ]
    })
    .boxed()
}

/// A tiny deterministic RNG (xorshift) so one proptest seed drives all rendering choices.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Renders `j` as JSON text; `escape_pct` is the chance (0..=100) of escaping a character that
/// needs no escape; whitespace between tokens is random.
pub(crate) fn render(j: &J, rng: &mut Rng, escape_pct: u64) -> String {
    let mut out = String::new();
    ws(&mut out, rng);
    render_value(j, rng, escape_pct, &mut out);
    ws(&mut out, rng);
    out
}

fn ws(out: &mut String, rng: &mut Rng) {
    out.push_str(["", "", "", " ", "\n", "\t", "\r\n  "][rng.below(7) as usize]);
}

fn render_value(j: &J, rng: &mut Rng, pct: u64, out: &mut String) {
    match j {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Num(n) => out.push_str(n),
        J::Str(s) => render_str(s, rng, pct, out),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(out, rng);
                render_value(item, rng, pct, out);
                ws(out, rng);
            }
            out.push(']');
        }
        J::Obj(members) => {
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(out, rng);
                render_str(k, rng, pct, out);
                ws(out, rng);
                out.push(':');
                ws(out, rng);
                render_value(v, rng, pct, out);
                ws(out, rng);
            }
            out.push('}');
        }
    }
}

fn render_str(s: &str, rng: &mut Rng, pct: u64, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || rng.below(100) < pct => match (c, rng.below(2)) {
                ('/', 0) => out.push_str("\\/"),
                ('\n', 0) => out.push_str("\\n"),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            },
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Splits valid JSON text into tokens (strings with quotes, numbers/literals, punctuation, whitespace
/// runs), independently of the scanner under test. The tokens concatenate to the input.
pub(crate) fn tokens(text: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let start = i;
        match text[i] {
            b'"' => {
                i += 1;
                while text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b' ' | b'\n' | b'\r' | b'\t' => {
                while i < text.len() && matches!(text[i], b' ' | b'\n' | b'\r' | b'\t') {
                    i += 1;
                }
            }
            b'{' | b'}' | b'[' | b']' | b',' | b':' => i += 1,
            _ => {
                while i < text.len() && (text[i].is_ascii_alphanumeric() || b"+-.".contains(&text[i])) {
                    i += 1;
                }
            }
        }
        out.push(&text[start..i]);
    }
    out
}
