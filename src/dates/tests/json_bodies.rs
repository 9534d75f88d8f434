//! Table tests of `rewrite_json`, `may_need_rewrite` and `rewrite_form` on whole bodies.

use crate::dates::{
    DateRules, InputOrder, Rewrite, RewriteError, may_need_rewrite, rewrite_form, rewrite_json,
};

/// Rewrites with default rules; returns the new body as text (the input when unchanged) and the count.
fn json(body: &str) -> (String, usize) {
    let r = rewrite_json(body.as_bytes(), &DateRules::default()).expect("valid JSON");
    let out = r.body.map_or_else(|| body.to_owned(), |b| String::from_utf8(b).expect("UTF-8"));
    (out, r.dates_rewritten)
}

fn form(body: &str) -> (String, usize) {
    let r = rewrite_form(body.as_bytes(), &DateRules::default());
    (r.body.map_or_else(|| body.to_owned(), |b| String::from_utf8(b).expect("UTF-8")), r.dates_rewritten)
}

#[test]
fn specification_examples() {
    let task = r#"{"title":"Prepare Q3 report","task_type":"task","owners":{"users":[1001],"guests":[],"groups":[]},
      "deadline":"2025-09-30T17:00:00Z","started_at":"2025-09-01T09:00:00+02:00"}"#;
    let expected = r#"{"title":"Prepare Q3 report","task_type":"task","owners":{"users":[1001],"guests":[],"groups":[]},
      "deadline":"2025-30-09 17:00:00","started_at":"2025-01-09 07:00:00"}"#;
    assert_eq!(json(task), (expected.to_owned(), 2));

    let run = r#"{"checklist_id":"f7e6","name":"Onboarding - Acme",
      "prerun":{"a1b2":"Acme Corp","9f2b":"2025-07-01T09:00:00-05:00"},
      "tasks":{"0a1b":{"deadline":"2025-07-15T17:00:00Z"}}}"#;
    let expected = r#"{"checklist_id":"f7e6","name":"Onboarding - Acme",
      "prerun":{"a1b2":"Acme Corp","9f2b":"2025-01-07 14:00:00"},
      "tasks":{"0a1b":{"deadline":"2025-15-07 17:00:00"}}}"#;
    assert_eq!(json(run), (expected.to_owned(), 2));

    let put = r#"{"deadline":"2025-08-01T12:00:00+02:00","taskdata":{"8c01":"2025-08-15T00:00:00.000Z","e423":"normal text"}}"#;
    let expected = r#"{"deadline":"2025-01-08 10:00:00","taskdata":{"8c01":"2025-15-08 00:00:00","e423":"normal text"}}"#;
    assert_eq!(json(put), (expected.to_owned(), 2));

    let guest = r#"{"email":"client@acme.com","external_date_creation":"2024-11-05 08:30:00"}"#;
    assert_eq!(
        json(guest).0,
        r#"{"email":"client@acme.com","external_date_creation":"2024-05-11 08:30:00"}"#
    );
}

#[test]
fn look_alikes_and_non_date_positions_stay() {
    for body in [
        r#"{"steps":[{"deadline":{"value":2,"unit":"days","option":"from"},"start_date":{"value":1,"unit":"days"}}]}"#,
        r#"{"deadline":null,"started_at":true,"external_date_creation":1.5e9}"#,
        r#"{"deadline":"soon","title":"2025-07-15T17:00:00Z","prerun":"2025-07-15T17:00:00Z"}"#,
        r#"{"deadline":["2025-07-15T17:00:00Z"],"notes":{"when":"2025-07-15T17:00:00Z"}}"#,
        r#"{"taskdata":{"f":"1752598800","g":1752598800,"h":"deadline_before=2025-06-30"}}"#,
        r#"{"deadline":"2025-15-07 17:00:00","deadline":-1752598800,"started_at":175259880000}"#,
        r#"{"2025-07-15T17:00:00Z":"deadline"}"#,
        // a form answer that starts with a date but holds more text (found in review: it lost the text)
        r#"{"prerun":{"f":"Tue, 15 Jul 2025 17:00:00 +0000 (bring laptop)"}}"#,
    ] {
        assert_eq!(json(body), (body.to_owned(), 0), "{body}");
    }
}

#[test]
fn form_objects_nest_and_fields_match_at_any_depth() {
    let body = r#"{ "prerun" : [ {"x": ["2025-06-30", 7, {"deadline":"1752598800"}]} ], "a":{"b":{"started_at" : 1752598800 }}}"#;
    let expected = r#"{ "prerun" : [ {"x": ["2025-30-06 00:00:00", 7, {"deadline":"1752598800"}]} ], "a":{"b":{"started_at" : "2025-15-07 17:00:00" }}}"#;
    assert_eq!(json(body), (expected.to_owned(), 2));
}

#[test]
fn escapes_in_keys_and_values() {
    // escaped key, escaped value, other escapes preserved byte for byte
    let body = "{\"dead\\u006cine\":\"2025-07-15T17\\u003a00:00Z\",\"t\":\"a\\/b\\n\\u00e9\"}";
    let expected = "{\"dead\\u006cine\":\"2025-15-07 17:00:00\",\"t\":\"a\\/b\\n\\u00e9\"}";
    assert!(may_need_rewrite(body.as_bytes(), &DateRules::default()));
    assert_eq!(json(body), (expected.to_owned(), 1));
    // non-ASCII escapes alone do not defeat the pre-scan
    assert!(!may_need_rewrite(br#"{"t":"caf\u00e9 \ud83d\ude00"}"#, &DateRules::default()));
}

#[test]
fn idempotent_for_ydm() {
    let body = r#"{"deadline":"2025-03-04 10:00:00","prerun":{"a":"2025-07-15T17:00:00Z"}}"#;
    let (once, n) = json(body);
    assert_eq!(
        (once.as_str(), n),
        (r#"{"deadline":"2025-04-03 10:00:00","prerun":{"a":"2025-15-07 17:00:00"}}"#, 2)
    );
    let ydm = DateRules { input_order: InputOrder::Ydm, ..DateRules::default() };
    assert_eq!(rewrite_json(once.as_bytes(), &ydm), Ok(Rewrite::default()));
}

#[test]
fn invalid_json_is_reported_when_a_candidate_is_present() {
    let rules = DateRules::default();
    for body in [
        r#"{"deadline":"2025-07-15T17:00:00Z""#,
        r#"{"deadline":"2025-07-15T17:00:00Z",}"#,
        r#"{"deadline":"2025-07-15T17:00:00Z"} x"#,
        r#"{"deadline":01}"#,
        r#"{"deadline":tru}"#,
        r#"{"deadline":"\x"}"#,
        "{\"deadline\":\"\u{1}\"}",
        r#"{"deadline":"\ud800"}"#,
        r#"{"deadline" "x"}"#,
        r#"["deadline"]]"#,
    ] {
        assert_eq!(rewrite_json(body.as_bytes(), &rules), Err(RewriteError::InvalidJson), "{body}");
    }
    // Date-free bodies are not validated: forwarded untouched either way.
    assert_eq!(rewrite_json(b"{not json", &rules), Ok(Rewrite::default()));
}

/// A request body is read as PHP's `json_decode` reads it (Laravel's default
/// depth, 512, allows 511 containers; a number beyond f64 is infinity), not as serde_json:
/// a body Tallyfy reads and the scan refused would keep its dates unrewritten.
#[test]
fn request_bodies_are_read_as_php_reads_them() {
    let rules = DateRules::default();
    for (depth, read) in [(127, true), (128, true), (511, true), (512, false), (100_000, false)] {
        let body =
            format!("{}{{\"deadline\":\"2025-03-04\"}}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
        let rewritten = rewrite_json(body.as_bytes(), &rules);
        assert_eq!(rewritten.is_ok(), read, "{depth} containers");
        if read {
            assert_eq!(rewritten.expect("read").dates_rewritten, 1, "{depth} containers");
        }
    }
    let huge = br#"{"deadline":"2025-03-04 10:00:00","x":1e400,"y":-1e999}"#;
    let broken = br#"{"deadline":"2025-03-04 10:00:00","x":1e999.0}"#;
    assert_eq!(rewrite_json(broken, &rules), Err(RewriteError::InvalidJson), "a fraction after the exponent");
    let rewritten = rewrite_json(huge, &rules).expect("PHP reads it (INF)");
    assert_eq!(
        rewritten.body.expect("rewritten"),
        br#"{"deadline":"2025-04-03 10:00:00","x":1e400,"y":-1e999}"#
    );
}

/// Names PHP folds into a date field's (a leading space, `.` for `_`, a NUL
/// ending the name) are dates too: Tallyfy reads them as that field.
#[test]
fn form_names_are_read_as_php_registers_them() {
    assert_eq!(
        form("+deadline=2025-03-04+10%3A00%3A00&started.at=2025-03-04&deadline%00x=2025-03-04&%20prerun.x[f]=2025-03-04"),
        (
            "+deadline=2025-04-03+10%3A00%3A00&started.at=2025-04-03+00%3A00%3A00&deadline%00x=2025-04-03+00%3A00%3A00&%20prerun.x[f]=2025-03-04"
                .to_owned(),
            3
        )
    );
    assert_eq!(form("%20prerun[f]=2025-03-04"), ("%20prerun[f]=2025-04-03+00%3A00%3A00".to_owned(), 1));
    assert_eq!(form("dead_line=2025-03-04&deadlinex=2025-03-04").1, 0, "other names stay");
    // After an unclosed `[`, PHP 8 folds ` `, `.` and `[` too: each is
    // `external_date_creation`.
    for name in [
        "external[date.creation",
        "external[date+creation",
        "external[date[creation",
        "external%5Bdate.creation",
    ] {
        let (rewritten, count) = form(&format!("{name}=2024-11-05+08%3A30%3A00"));
        assert_eq!((rewritten, count), (format!("{name}=2024-05-11+08%3A30%3A00"), 1), "{name}");
    }
}

#[test]
fn form_bodies() {
    assert_eq!(
        form("a=b&prerun[abc]=2025-07-15T17:00:00Z&deadline=2025-08-01T12%3A00%3A00%2B02%3A00&x"),
        ("a=b&prerun[abc]=2025-15-07+17%3A00%3A00&deadline=2025-01-08+10%3A00%3A00&x".to_owned(), 2)
    );
    assert_eq!(
        form("tasks%5Bs1%5D%5Bdeadline%5D=2025-07-15+17%3A00%3A00&taskdata[f][]=2025-06-30&started_at=1752598800"),
        (
            "tasks%5Bs1%5D%5Bdeadline%5D=2025-15-07+17%3A00%3A00&taskdata[f][]=2025-30-06+00%3A00%3A00&started_at=2025-15-07+17%3A00%3A00"
                .to_owned(),
            3
        )
    );
    for body in [
        "deadline_before=2025-06-30&created=2025-05-01:2025-05-31",
        "prerun=2025-07-15T17:00:00Z&title=2025-07-15T17:00:00Z&deadline=soon",
        "prerun[a]=1752598800&deadline=2025-15-07+17%3A00%3A00&deadline=%ZZ&deadline",
        "",
    ] {
        assert_eq!(form(body), (body.to_owned(), 0), "{body}");
    }
}
