//! Table tests of `convert` / `convert_field`: every input form, zones, DST edges, look-alikes.

use jiff::tz::TimeZone;

use crate::dates::{DateRules, InputOrder, convert, convert_field};

fn rules(tz: &str, order: InputOrder) -> DateRules {
    let timezone = TimeZone::get(tz).expect("bundled tz database has the zone");
    DateRules { timezone, input_order: order, ..DateRules::default() }
}

/// Asserts each `(input, expected)` with `convert` (`None`: left alone).
fn check(rules: &DateRules, table: &[(&str, Option<&str>)]) {
    for &(input, expected) in table {
        assert_eq!(convert(input, rules).as_deref(), expected, "input {input:?} in {:?}", rules.timezone);
    }
}

#[test]
fn utc_every_input_form() {
    check(
        &DateRules::default(),
        &[
            // the specification's examples
            ("2025-07-15T17:00:00Z", Some("2025-15-07 17:00:00")),
            ("2025-08-01T12:00:00+02:00", Some("2025-01-08 10:00:00")),
            ("2025-07-01T09:00:00-05:00", Some("2025-01-07 14:00:00")),
            ("2025-08-15T00:00:00.000Z", Some("2025-15-08 00:00:00")),
            ("2024-11-05 08:30:00", Some("2024-05-11 08:30:00")),
            // RFC 3339 / ISO 8601 variants
            ("2025-07-15t17:00:00z", Some("2025-15-07 17:00:00")),
            ("2025-07-15 17:00:00Z", Some("2025-15-07 17:00:00")),
            ("2025-07-15T19:00:00+0200", Some("2025-15-07 17:00:00")),
            ("2025-07-15T17:00:00-00:00", Some("2025-15-07 17:00:00")),
            ("2025-07-15T17:00:00.123456789Z", Some("2025-15-07 17:00:00")),
            ("2025-07-15T17:00:00,5Z", Some("2025-15-07 17:00:00")),
            ("2025-07-15T17:00Z", Some("2025-15-07 17:00:00")),
            ("2025-07-15T23:59:60Z", Some("2025-15-07 23:59:59")),
            // naive, date-only
            ("2024-11-05T08:30:00", Some("2024-05-11 08:30:00")),
            ("2024-11-05T08:30:00.25", Some("2024-05-11 08:30:00")),
            ("2024-11-05T08:30", Some("2024-05-11 08:30:00")),
            ("2025-06-30", Some("2025-30-06 00:00:00")),
            // RFC 2822
            ("Tue, 15 Jul 2025 17:00:00 +0000", Some("2025-15-07 17:00:00")),
            ("15 Jul 2025 19:00:00 +0200", Some("2025-15-07 17:00:00")),
            ("Tue, 15 Jul 2025 17:00:00 GMT", Some("2025-15-07 17:00:00")),
            // leap day
            ("2024-02-29T12:00:00Z", Some("2024-29-02 12:00:00")),
            ("2024-02-29", Some("2024-29-02 00:00:00")),
        ],
    );
}

#[test]
fn look_alikes_pass_unchanged() {
    check(
        &DateRules::default(),
        &[
            ("2025-15-07 17:00:00", None), // already the request format (month 15 is no month)
            ("2025-02-29", None),
            ("2025-02-29T12:00:00Z", None),
            ("2025-13-45", None),
            ("2025-06-30 meeting", None),
            // text around an RFC 2822 date, which jiff's parser would take as a comment or folding
            ("Tue, 15 Jul 2025 17:00:00 +0000 (bring laptop)", None),
            ("Tue, 15 Jul 2025 (call) 17:00:00 +0000", None),
            (" Tue, 15 Jul 2025 17:00:00 +0000", None),
            ("Tue,\t15 Jul 2025 17:00:00 +0000\t", None),
            ("Tue, 15 Jul 2025\r\n 17:00:00 +0000", None),
            ("17:00:00", None),
            ("", None),
            ("Prepare Q3 report", None),
            ("2025-05-01:2025-05-31", None),
            ("deadline_before=2025-06-30", None),
            ("status=active&deadline_before=2025-06-30", None),
            (" 2025-06-30", None),
            ("2025-06-30 ", None),
            ("2025-7-15", None),
            ("20250715", None),
            ("2025-07-15T24:00:00Z", None),
            ("2025-07-15T17:00:00+24:00", None),
            ("2025-07-15T17:00:00+02", None),
            ("2025-07-15T17:00:00.Z", None),
            ("2025-07-15T17:00:00.1234567891Z", None),
            ("2025-07-15T17:00:61Z", None),
            ("2025-07-15T17:00:00Z trailing", None),
            ("Wed, 15 Jul 2025 17:00:00 +0000", None), // wrong weekday
            ("1752598800", None),                      // epoch only in fields: see convert_field
            ("２０２５-07-15", None),
        ],
    );
}

#[test]
fn epoch_seconds_only_for_fields() {
    let r = DateRules::default();
    assert_eq!(convert_field("1752598800", &r).as_deref(), Some("2025-15-07 17:00:00"));
    assert_eq!(convert_field("100000000", &r).as_deref(), Some("1973-03-03 09:46:40"));
    assert_eq!(convert_field("99999999", &r), None); // 8 digits
    assert_eq!(convert_field("175259880000", &r), None); // 12 digits (milliseconds are not read)
    assert_eq!(convert_field("2025-07-15T17:00:00Z", &r).as_deref(), Some("2025-15-07 17:00:00"));
    assert_eq!(convert("1752598800", &r), None);
}

#[test]
fn ambiguous_values_follow_input_order() {
    let ymd = DateRules::default();
    let ydm = DateRules { input_order: InputOrder::Ydm, ..DateRules::default() };
    assert_eq!(convert("2025-03-04 10:00:00", &ymd).as_deref(), Some("2025-04-03 10:00:00"));
    assert_eq!(convert("2025-03-04 10:00:00", &ydm), None); // 3 April, already in the request format
    assert_eq!(convert("2025-15-07 17:00:00", &ydm), None);
    assert_eq!(convert("2025-15-07", &ydm).as_deref(), Some("2025-15-07 00:00:00"));
    assert_eq!(convert("2025-15-07T17:00:00", &ydm).as_deref(), Some("2025-15-07 17:00:00"));
    // With an offset the value is RFC 3339, always year-month-day.
    assert_eq!(convert("2025-03-04T10:00:00Z", &ydm).as_deref(), Some("2025-04-03 10:00:00"));
    assert_eq!(convert("2025-15-07T17:00:00Z", &ydm), None);
}

#[test]
fn europe_berlin() {
    check(
        &rules("Europe/Berlin", InputOrder::Ymd),
        &[
            ("2025-07-15T17:00:00Z", Some("2025-15-07 19:00:00")), // CEST
            ("2025-01-15T17:00:00Z", Some("2025-15-01 18:00:00")), // CET
            ("2025-07-15 17:00:00", Some("2025-15-07 17:00:00")),  // naive: wall time in Berlin
            // spring forward 2025-03-30 02:00 -> 03:00: compatible moves forward by the gap
            ("2025-03-30 02:30:00", Some("2025-30-03 03:30:00")),
            ("2025-03-30 01:59:59", Some("2025-30-03 01:59:59")),
            ("2025-03-30 03:00:00", Some("2025-30-03 03:00:00")),
            // fall back 2025-10-26 03:00 -> 02:00: compatible takes the earlier instant (CEST)
            ("2025-10-26 02:30:00", Some("2025-26-10 02:30:00")),
            ("2025-10-26T00:30:00Z", Some("2025-26-10 02:30:00")), // first 02:30 (CEST)
            ("2025-10-26T01:30:00Z", Some("2025-26-10 02:30:00")), // second 02:30 (CET)
            ("2024-02-29T23:30:00Z", Some("2024-01-03 00:30:00")),
        ],
    );
}

#[test]
fn america_new_york() {
    check(
        &rules("America/New_York", InputOrder::Ymd),
        &[
            ("2025-07-15T17:00:00Z", Some("2025-15-07 13:00:00")), // EDT
            ("2025-01-15T17:00:00Z", Some("2025-15-01 12:00:00")), // EST
            ("2025-07-01T09:00:00-05:00", Some("2025-01-07 10:00:00")),
            ("2025-03-09 02:30:00", Some("2025-09-03 03:30:00")), // gap
            ("2025-11-02 01:30:00", Some("2025-02-11 01:30:00")), // overlap, earlier (EDT)
            ("2025-11-02T05:30:00Z", Some("2025-02-11 01:30:00")), // the EDT 01:30
            ("2025-11-02T06:30:00Z", Some("2025-02-11 01:30:00")), // the EST 01:30
            ("2025-06-30", Some("2025-30-06 00:00:00")),
        ],
    );
}

#[test]
fn asia_kolkata() {
    check(
        &rules("Asia/Kolkata", InputOrder::Ymd),
        &[
            ("2025-07-15T17:00:00Z", Some("2025-15-07 22:30:00")),
            ("2025-07-15T23:45:00Z", Some("2025-16-07 05:15:00")),
            ("2025-07-15 17:00:00", Some("2025-15-07 17:00:00")),
            ("Tue, 15 Jul 2025 17:00:00 +0000", Some("2025-15-07 22:30:00")),
        ],
    );
    let ydm = rules("Asia/Kolkata", InputOrder::Ydm);
    assert_eq!(convert("2025-15-07 17:00:00", &ydm), None);
}

#[test]
fn custom_formats() {
    let iso = DateRules { request_format: "%Y-%m-%d %H:%M:%S".into(), ..DateRules::default() };
    assert_eq!(convert("2025-07-15T17:00:00Z", &iso).as_deref(), Some("2025-07-15 17:00:00"));
    assert_eq!(convert("2025-07-15 17:00:00", &iso), None);
    let zoned = DateRules {
        request_format: "%Y-%m-%dT%H:%M:%S%:z".into(),
        ..rules("Europe/Berlin", InputOrder::Ymd)
    };
    assert_eq!(convert("2025-07-15T17:00:00Z", &zoned).as_deref(), Some("2025-07-15T19:00:00+02:00"));
    assert!(DateRules::default().validate().is_ok());
    assert!(zoned.validate().is_ok());
    let broken = DateRules { request_format: "%Y-%d-%m %H:%M:%S %J".into(), ..DateRules::default() };
    assert!(broken.validate().is_err());
    assert_eq!(convert("2025-07-15T17:00:00Z", &broken), None);
}
