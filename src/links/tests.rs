//! Tests of link rewriting: tables for the forms Tallyfy emits, and a property test against a DOM reference.

use proptest::prelude::*;
use serde_json::Value;

use super::{InvalidJson, LinkRewrite, LinkRewriter};
use crate::dates::tests::gen_json::{Rng, documents, render, tokens};

const FROM: &str = "https://go.tallyfy.com/api/";
const TO: &str = "http://127.0.0.1:8080/api/";

fn rewriter() -> LinkRewriter {
    LinkRewriter::new("https://go.tallyfy.com", "http://127.0.0.1:8080/", true)
}

fn rewrite(body: &str) -> (String, usize) {
    let r = rewriter().rewrite_json(body.as_bytes()).expect("valid JSON");
    (r.body.map_or_else(|| body.to_owned(), |b| String::from_utf8(b).expect("UTF-8")), r.links_rewritten)
}

#[test]
fn pagination_links_plain_and_php_escaped() {
    let body = r#"{"data":[],"meta":{"pagination":{"total":30,"links":{"previous":"https://go.tallyfy.com/api/organizations/abc/runs?page=1","next":"https://go.tallyfy.com/api/organizations/abc/runs?page=3"}}}}"#;
    let expected = r#"{"data":[],"meta":{"pagination":{"total":30,"links":{"previous":"http://127.0.0.1:8080/api/organizations/abc/runs?page=1","next":"http://127.0.0.1:8080/api/organizations/abc/runs?page=3"}}}}"#;
    assert_eq!(rewrite(body), (expected.to_owned(), 2));

    let php = r#"{"links":{"next":"https:\/\/go.tallyfy.com\/api\/organizations\/abc\/runs?page=2"}}"#;
    let expected = r#"{"links":{"next":"http://127.0.0.1:8080/api/organizations\/abc\/runs?page=2"}}"#;
    assert_eq!(rewrite(php), (expected.to_owned(), 1));

    let mixed = "{\"a\":[\"https:\\/\\/go.tallyfy.com/api\\u002fx\", \"https://go.tallyfy.com\\/api\\/\"]}";
    assert_eq!(
        rewrite(mixed),
        ("{\"a\":[\"http://127.0.0.1:8080/api/x\", \"http://127.0.0.1:8080/api/\"]}".to_owned(), 2)
    );
}

#[test]
fn non_candidates_stay() {
    for body in [
        r#"{"meta":{"pagination":{"links":[]}}}"#,
        r#"{"text":"see https://go.tallyfy.com/api/x","u":"https://go.tallyfy.com/apix","v":"https://go.tallyfy.com/api"}"#,
        r#"{"https://go.tallyfy.com/api/key":1,"w":"http://go.tallyfy.com/api/x","x":"https://go.tallyfy.com.evil/api/x"}"#,
        r#"{"y":"https://staging.go.tallyfy.com/api/x","z":"HTTPS://go.tallyfy.com/api/x"}"#,
    ] {
        assert_eq!(rewrite(body), (body.to_owned(), 0), "{body}");
    }
}

#[test]
fn nested_and_escaped_host() {
    let body = "[{\"a\":{\"b\":[\"https://go.tallyfy.com/api/1\"]}},\"https://go\\u002etallyfy.com/api/2\"]";
    let expected = "[{\"a\":{\"b\":[\"http://127.0.0.1:8080/api/1\"]}},\"http://127.0.0.1:8080/api/2\"]";
    assert_eq!(rewrite(body), (expected.to_owned(), 2));
}

/// An answer some caller reads keeps no upstream link, whatever serde_json
/// would refuse: JavaScript's `JSON.parse` and Python's `json` read any
/// nesting, and a number beyond f64 as infinity. Both used to pass unrewritten.
#[test]
fn answers_past_serde_json_s_limits_are_rewritten_too() {
    let deep = format!("{}\"https://go.tallyfy.com/api/x\"{}", "[".repeat(200), "]".repeat(200));
    let expected = format!("{}\"http://127.0.0.1:8080/api/x\"{}", "[".repeat(200), "]".repeat(200));
    assert_eq!(rewrite(&deep), (expected, 1), "200 arrays deep");
    let huge = r#"{"total":1e400,"n":-1e99999,"next":"https://go.tallyfy.com/api/runs?page=2"}"#;
    let expected = r#"{"total":1e400,"n":-1e99999,"next":"http://127.0.0.1:8080/api/runs?page=2"}"#;
    assert_eq!(rewrite(huge), (expected.to_owned(), 1), "numbers past f64");
    let bad = br#"[1e400,01,"https://go.tallyfy.com/api/x"]"#;
    assert_eq!(rewriter().rewrite_json(bad), Err(InvalidJson), "the grammar still holds");
}

#[test]
fn invalid_json_only_when_scanned() {
    let r = rewriter();
    assert_eq!(r.rewrite_json(br#"{"next":"https://go.tallyfy.com/api/x""#), Err(InvalidJson));
    assert_eq!(r.rewrite_json(b"<html>maintenance</html>"), Ok(LinkRewrite::default()));
    assert!(!r.may_need_rewrite(br#"{"data":[{"name":"caf\u00e9"}]}"#));
}

fn link_strings() -> BoxedStrategy<String> {
    let base = prop::sample::select(vec![
        "https://go.tallyfy.com/api/",
        "https://go.tallyfy.com/api/organizations/0f1e/runs?page=",
        "https://go.tallyfy.com/api",
        "https://go.tallyfy.com/apix/",
        "see https://go.tallyfy.com/api/",
        "http://go.tallyfy.com/api/",
        "https://go.tallyfy.com.evil/api/",
        "https://staging.go.tallyfy.com/api/",
        "",
    ]);
    prop_oneof![(base, "[a-z0-9/?=&é]{0,10}").prop_map(|(b, rest)| format!("{b}{rest}")), "\\PC{0,6}",]
        .boxed()
}

fn keys() -> BoxedStrategy<String> {
    prop_oneof![Just("next".to_owned()), Just(FROM.to_owned()), "[a-z]{1,3}"].boxed()
}

/// The reference: replace the prefix of matching string values in the DOM.
fn reference(value: &mut Value) {
    match value {
        Value::String(s) if s.starts_with(FROM) => *s = format!("{TO}{}", &s[FROM.len()..]),
        Value::Array(items) => items.iter_mut().for_each(reference),
        Value::Object(map) => map.values_mut().for_each(reference),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn matches_reference_and_preserves_bytes(doc in documents(keys(), link_strings()), seed in any::<u64>(),
        pct in prop::sample::select(vec![0u64, 0, 10]), php in any::<bool>()) {
        let mut text = render(&doc, &mut Rng::new(seed), pct);
        if php {
            text = text.replace('/', "\\/"); // PHP's default: every slash escaped (always valid JSON)
        }
        let input = text.as_bytes();
        let r = rewriter().rewrite_json(input).expect("valid");
        prop_assert_eq!(r.body.is_some(), r.links_rewritten > 0);
        let output = r.body.unwrap_or_else(|| input.to_vec());

        let mut expected: Value = serde_json::from_slice(input).expect("valid");
        reference(&mut expected);
        prop_assert_eq!(serde_json::from_slice::<Value>(&output).expect("valid"), expected);

        let (ti, to) = (tokens(input), tokens(&output));
        prop_assert_eq!(ti.len(), to.len());
        let changed: Vec<usize> = (0..ti.len()).filter(|&i| ti[i] != to[i]).collect();
        prop_assert_eq!(changed.len(), r.links_rewritten);
        for i in changed {
            // `"` + new prefix, then the old token's raw bytes after its (possibly escaped) prefix
            let head = format!("\"{TO}");
            prop_assert!(to[i].starts_with(head.as_bytes()));
            prop_assert!(ti[i].ends_with(&to[i][head.len()..]));
        }
    }
}

proptest! {
    /// Holding a body as the chunks it arrived in never hides a link the whole
    /// body would show: the chunked pre-scan is at least as eager.
    #[test]
    fn the_chunked_prescan_sees_whatever_the_whole_body_shows(
        pieces in proptest::collection::vec(
            proptest::sample::select(vec!["go.tallyfy.com", "\\u0067", "\\u006F", "go.tal", "lyfy.com", "x", "\"", "\\/", "abc "]),
            0..24,
        ),
        cuts in proptest::collection::vec(0usize..200, 0..8),
    ) {
        let body = pieces.concat().into_bytes();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut at = 0;
        for cut in cuts.into_iter().chain([body.len()]) {
            chunks.push(bytes::Bytes::copy_from_slice(&body[at..cut]));
            at = cut;
        }
        let scan = super::LinkScan::new("https://go.tallyfy.com");
        if scan.may_need_rewrite(&body) {
            prop_assert!(scan.may_need_rewrite_chunks(&chunks), "{:?} in {:?}", String::from_utf8_lossy(&body), chunks);
        }
    }
}
