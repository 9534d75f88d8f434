//! Property tests: `rewrite_json` against the DOM reference, byte preservation, YDM idempotence,
//! validation agreeing with serde_json, and the hand-written parser against jiff's own formatting.

use jiff::tz::{Offset, TimeZone};
use jiff::{Timestamp, fmt::strtime};
use proptest::prelude::*;
use serde_json::Value;

use super::gen_json::{J, Rng, documents, render, tokens};
use super::reference::reference_rewrite;
use crate::dates::{DateRules, InputOrder, convert, convert_field, may_need_rewrite, rewrite_json};

const ZONES: [&str; 4] = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"];

/// Whether PHP's `json_decode` (what Tallyfy reads a body with) reads `bytes`,
/// as far as serde_json can tell: the two agree on everything but a number
/// beyond a double (PHP's infinity, serde_json's error, which may hide a later
/// fault: `1e999.0`), which gives `None` (that case has tests of its own), and
/// depth (the documents here nest far below either limit).
fn php_reads(bytes: &[u8]) -> Option<bool> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(_) => Some(true),
        Err(error) if error.to_string().starts_with("number out of range") => None,
        Err(_) => Some(false),
    }
}

fn rules() -> impl Strategy<Value = DateRules> {
    (0..ZONES.len(), any::<bool>()).prop_map(|(z, ydm)| DateRules {
        timezone: TimeZone::get(ZONES[z]).expect("bundled zone"),
        input_order: if ydm { InputOrder::Ydm } else { InputOrder::Ymd },
        ..DateRules::default()
    })
}

fn keys() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "deadline",
            "started_at",
            "external_date_creation",
            "prerun",
            "taskdata",
            "tasks",
            "value",
            "unit",
            "a1b2",
            "",
        ])
        .prop_map(String::from),
        "[a-z_]{1,4}",
    ]
    .boxed()
}

/// Date strings in every accepted form, plus near misses and plain text.
fn date_strings() -> BoxedStrategy<String> {
    let (year, a, b, h, mi, s) = (1999i32..2032, 0i32..14, 0i32..33, 0i32..25, 0i32..61, 0i32..62);
    let sep = prop::sample::select(vec!["T", " ", "t", "_"]);
    let frac = prop::sample::select(vec!["", "", ".000", ".5", ",123456789", ".1234567890", "."]);
    let zone =
        prop::sample::select(vec!["Z", "z", "+02:00", "-0500", "+05:30", "-00:00", "+24:00", " meeting", ""]);
    prop_oneof![
        (year.clone(), a.clone(), b.clone(), sep, (h, mi, s), frac, zone).prop_map(
            |(y, a, b, sep, (h, mi, s), frac, zone)| format!(
                "{y:04}-{a:02}-{b:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{zone}"
            )
        ),
        (year, a, b).prop_map(|(y, a, b)| format!("{y:04}-{a:02}-{b:02}")),
        (0i64..4_000_000_000, -720i32..840).prop_map(|(secs, off)| {
            let tz = Offset::from_seconds(off * 60).unwrap_or(Offset::UTC).to_time_zone();
            let zdt = Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH).to_zoned_datetime(tz);
            jiff::fmt::rfc2822::to_string(&zdt).unwrap_or_default()
        }),
        "[0-9]{8,12}",
        prop::sample::select(vec![
            "Wed, 15 Jul 2025 17:00:00 +0000",
            "2025-06-30 meeting",
            "17:00:00",
            "2025-05-01:2025-05-31",
            "Acme Corp",
            "caf\u{e9} \u{1F600} \"quoted\" back\\slash /path\n",
        ])
        .prop_map(String::from),
        "\\PC{0,8}",
    ]
    .boxed()
}

fn doc_and_text() -> impl Strategy<Value = (J, String)> {
    (documents(keys(), date_strings()), any::<u64>(), prop::sample::select(vec![0u64, 0, 5, 50])).prop_map(
        |(doc, seed, pct)| {
            let text = render(&doc, &mut Rng::new(seed), pct);
            (doc, text)
        },
    )
}

fn decoded(token: &[u8]) -> Option<String> {
    serde_json::from_slice::<String>(token).ok()
}

/// Indices of tokens that differ; panics (via prop_assert in the caller) when the token streams do not align.
fn differing(a: &[u8], b: &[u8]) -> Option<Vec<usize>> {
    let (ta, tb) = (tokens(a), tokens(b));
    (ta.len() == tb.len()).then(|| (0..ta.len()).filter(|&i| ta[i] != tb[i]).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(768))]

    #[test]
    fn matches_reference_preserves_bytes_and_is_idempotent((_doc, text) in doc_and_text(), rules in rules()) {
        let input = text.as_bytes();
        let rewrite = rewrite_json(input, &rules).expect("generated documents are valid");
        prop_assert_eq!(rewrite.body.is_some(), rewrite.dates_rewritten > 0);
        let output = rewrite.body.clone().unwrap_or_else(|| input.to_vec());

        // (1) same result as the DOM reference
        let parsed_in: Value = serde_json::from_slice(input).expect("valid");
        let parsed_out: Value = serde_json::from_slice(&output).expect("output stays valid JSON");
        prop_assert_eq!(parsed_out, reference_rewrite(parsed_in, &rules));

        // (2) only the rewritten tokens differ, each becoming a plain string with the converted value
        let changed = differing(input, &output).expect("token streams align");
        prop_assert_eq!(changed.len(), rewrite.dates_rewritten);
        let (ti, to) = (tokens(input), tokens(&output));
        for &i in &changed {
            let new = decoded(to[i]).expect("a string");
            prop_assert!(!to[i].contains(&b'\\'));
            let old = decoded(ti[i]).unwrap_or_else(|| String::from_utf8_lossy(ti[i]).into_owned());
            let expected = [convert_field(&old, &rules), convert(&old, &rules)];
            prop_assert!(expected.contains(&Some(new.clone())), "{} -> {}", old, new);
        }

        // (3) a YDM pass over the output leaves every rewritten value alone (and, after a YDM
        // first pass, changes nothing at all)
        let ydm = DateRules { input_order: InputOrder::Ydm, ..rules.clone() };
        let again = rewrite_json(&output, &ydm).expect("valid");
        let output2 = again.body.unwrap_or_else(|| output.clone());
        let changed2 = differing(&output, &output2).expect("token streams align");
        prop_assert!(changed2.iter().all(|i| !changed.contains(i)));
        if rules.input_order == InputOrder::Ydm {
            prop_assert!(changed2.is_empty());
        }
    }

    /// (4) a mutated document is rejected exactly when PHP rejects it (when it is scanned).
    #[test]
    fn validation_agrees_with_php((_doc, text) in doc_and_text(), cut in any::<prop::sample::Index>(),
        mutation in 0..3u8, byte in prop::sample::select(b"{}[],:\"\\ 0-.eEtx\x01\xff".to_vec())) {
        let mut bytes = format!("{{\"deadline\":{text}}}").into_bytes();
        let at = cut.index(bytes.len());
        match mutation {
            0 => bytes.truncate(at),
            1 => { bytes.remove(at); }
            _ => bytes.insert(at, byte),
        }
        let ours = rewrite_json(&bytes, &DateRules::default());
        if may_need_rewrite(&bytes, &DateRules::default()) {
            let Some(php) = php_reads(&bytes) else { return Ok(()) };
            prop_assert_eq!(ours.is_ok(), php, "{:?}", String::from_utf8_lossy(&bytes));
        } else {
            prop_assert_eq!(ours.map(|r| r.body), Ok(None));
        }
    }

    /// Random JSON-ish bytes after a date field: our validator and PHP's agree.
    #[test]
    fn validator_agrees_on_random_bytes(tail in prop::collection::vec(
        prop::sample::select(b"{}[],:\"\\/ \n0123456789-+.eEtrufalsn\\u00dD8cC".to_vec()), 0..24)) {
        let mut bytes = b"{\"deadline\":".to_vec();
        bytes.extend_from_slice(&tail);
        if let Some(php) = php_reads(&bytes) {
            prop_assert_eq!(rewrite_json(&bytes, &DateRules::default()).is_ok(), php);
        }
    }

    /// RFC 3339 with any offset: the hand-written parser gives the instant jiff formatted.
    #[test]
    fn offsets_give_the_exact_instant(secs in -2_000_000_000i64..8_000_000_000, nanos in 0i32..1_000_000_000,
        off_min in -1439i32..1440, rules in rules()) {
        let ts = Timestamp::new(secs, nanos).expect("in range");
        let offset = Offset::from_seconds(off_min * 60).expect("valid offset");
        let input = strtime::format("%Y-%m-%dT%H:%M:%S%.f%:z", &ts.to_zoned_datetime(offset.to_time_zone()))
            .expect("formats");
        let expected = strtime::format(&rules.request_format, &ts.to_zoned_datetime(rules.timezone.clone()))
            .expect("formats");
        prop_assert_eq!(convert(&input, &rules).unwrap_or_else(|| input.clone()), expected);
    }

    /// Naive wall times are read in the configured zone with jiff's compatible disambiguation.
    #[test]
    fn naive_times_use_the_zone(secs in 0i64..4_000_000_000, rules in rules()) {
        let dt = rules.timezone.to_datetime(Timestamp::from_second(secs).expect("in range"));
        let (a, b) = match rules.input_order {
            InputOrder::Ymd => (dt.month(), dt.day()),
            InputOrder::Ydm => (dt.day(), dt.month()),
        };
        let input = format!("{:04}-{a:02}-{b:02} {:02}:{:02}:{:02}", dt.year(), dt.hour(), dt.minute(), dt.second());
        let ts = rules.timezone.to_ambiguous_timestamp(dt).compatible().expect("resolves");
        let expected = strtime::format(&rules.request_format, &ts.to_zoned_datetime(rules.timezone.clone()))
            .expect("formats");
        prop_assert_eq!(convert(&input, &rules).unwrap_or_else(|| input.clone()), expected);
    }
}
