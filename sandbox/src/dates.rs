//! Tallyfy's two date formats: request dates must match the configured strftime
//! format exactly (default `%Y-%d-%m %H:%M:%S`, "YYYY-DD-MM"); response dates
//! are written `YYYY-MM-DDThh:mm:ss.000Z`. Naive times are UTC.

use jiff::civil::DateTime;
use jiff::{Span, Timestamp, tz::TimeZone};
use serde_json::Value;

use super::validation::{Errors, attribute};

const RESPONSE_FORMAT: &str = "%Y-%m-%dT%H:%M:%S.000Z";

/// Parses a request date: `value` must be a string that matches `format`
/// exactly (it must also format back to itself, so `2025-1-9` does not pass
/// for `%Y-%m-%d`).
pub(super) fn parse_request_date(format: &str, value: &str) -> Option<DateTime> {
    let parsed = DateTime::strptime(format, value).ok()?;
    (parsed.strftime(format).to_string() == value).then_some(parsed)
}

/// Validates the date field at `path`; on failure records Laravel's
/// `date_format` message.
pub(super) fn check(format: &str, path: &str, value: &Value, errors: &mut Errors) -> Option<DateTime> {
    let parsed = value.as_str().and_then(|text| parse_request_date(format, text));
    if parsed.is_none() {
        errors
            .add(path, format!("The {} does not match the format {}.", attribute(path), php_format(format)));
    }
    parsed
}

/// A required date field: absent/null is "required", otherwise [`check`].
pub(super) fn required(
    format: &str,
    object: &serde_json::Map<String, Value>,
    field: &str,
    errors: &mut Errors,
) -> Option<DateTime> {
    match object.get(field) {
        None | Some(Value::Null) => {
            errors.add(field, format!("The {} field is required.", attribute(field)));
            None
        }
        Some(value) => check(format, field, value, errors),
    }
}

/// An optional (nullable) date field.
pub(super) fn optional(
    format: &str,
    object: &serde_json::Map<String, Value>,
    field: &str,
    errors: &mut Errors,
) -> Option<DateTime> {
    match object.get(field) {
        None | Some(Value::Null) => None,
        Some(value) => check(format, field, value, errors),
    }
}

/// The strftime format as PHP `date()` letters, as Laravel prints it in messages.
pub(super) fn php_format(format: &str) -> String {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let php = match chars.next() {
            Some('Y') => "Y",
            Some('y') => "y",
            Some('m') => "m",
            Some('d') => "d",
            Some('e') => "j",
            Some('H') => "H",
            Some('I') => "h",
            Some('M') => "i",
            Some('S') => "s",
            Some('p') => "A",
            Some('b') => "M",
            Some('B') => "F",
            Some('F') => "Y-m-d",
            Some('T') => "H:i:s",
            Some('%') => "%",
            Some(other) => {
                out.push('%');
                out.push(other);
                continue;
            }
            None => "%",
        };
        out.push_str(php);
    }
    out
}

/// `YYYY-MM-DDThh:mm:ss.000Z`.
pub(super) fn response_date(datetime: DateTime) -> String {
    datetime.strftime(RESPONSE_FORMAT).to_string()
}

pub(super) fn response_date_value(datetime: Option<DateTime>) -> Value {
    datetime.map_or(Value::Null, |d| Value::String(response_date(d)))
}

/// The current UTC time, whole seconds.
pub(super) fn now() -> DateTime {
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH);
    TimeZone::UTC.to_datetime(now)
}

/// `datetime` plus `days` (saturating at the end of jiff's range).
pub(super) fn plus_days(datetime: DateTime, days: i64) -> DateTime {
    datetime.saturating_add(Span::new().days(days))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "%Y-%d-%m %H:%M:%S";

    #[test]
    fn request_dates_match_the_format_exactly() {
        let parsed = parse_request_date(SPEC, "2023-15-05 14:30:00").expect("spec example");
        assert_eq!(response_date(parsed), "2023-05-15T14:30:00.000Z");
        for bad in
            ["2025-09-30T17:00:00Z", "2023-05-15 14:30:00", "2023-15-05 14:30", "2023-15-05 14:30:00 ", ""]
        {
            assert!(parse_request_date(SPEC, bad).is_none(), "{bad}");
        }
        assert!(parse_request_date("%Y-%m-%d %H:%M:%S", "2023-05-15 14:30:00").is_some());
    }

    #[test]
    fn formats_translate_to_php_letters() {
        assert_eq!(php_format(SPEC), "Y-d-m H:i:s");
        assert_eq!(php_format("%FT%T%%"), "Y-m-dTH:i:s%");
    }

    #[test]
    fn a_bad_date_gets_laravels_message() {
        let mut errors = Errors::default();
        assert!(check(SPEC, "tasks.a.deadline", &Value::from("2025-07-15T17:00:00Z"), &mut errors).is_none());
        assert!(check(SPEC, "deadline", &Value::from(5), &mut errors).is_none());
        let reply = errors.finish().expect_err("422");
        assert_eq!(reply.status(), http::StatusCode::UNPROCESSABLE_ENTITY);
    }
}
