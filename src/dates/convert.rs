//! One value to the request format: parse, place in the configured zone, format.
//!
//! Zone rules (all via jiff's tz database, bundled into the binary):
//! * a value with an offset (or `Z`, RFC 2822, epoch seconds) is an exact instant; it is shown in
//!   `rules.timezone` at that instant (DST-correct for named zones);
//! * a naive value is a wall-clock time in `rules.timezone`, resolved with jiff's *compatible*
//!   disambiguation: a time in a spring-forward gap moves forward by the gap's length
//!   (02:30 on a day where 02:00 jumps to 03:00 becomes 03:30), and a time in a fall-back overlap
//!   takes the earlier of its two instants (the one still on summer time), which formats back to the
//!   same wall-clock time.

use jiff::Timestamp;
use jiff::fmt::strtime;

use super::parse::{Parsed, parse};
use super::{DEFAULT_REQUEST_FORMAT, DateRules};

/// The request-format text for `value`, or `None` when it is not a date or is already exactly that text.
pub(super) fn convert_value(value: &str, rules: &DateRules, allow_epoch: bool) -> Option<String> {
    let parsed = parse(value, rules.input_order, allow_epoch)?;
    let out = format(instant(parsed, rules)?, rules)?;
    (out != value).then_some(out)
}

/// The exact instant of a parsed value; naive values are read in `rules.timezone`.
pub(super) fn instant(parsed: Parsed, rules: &DateRules) -> Option<Timestamp> {
    match parsed {
        Parsed::Instant(ts) => Some(ts),
        Parsed::Local(dt) => rules.timezone.to_ambiguous_timestamp(dt).compatible().ok(),
    }
}

/// `ts` as wall-clock time in `rules.timezone`, written with `rules.request_format`.
/// `None` only when the format string itself cannot be applied (see [`DateRules::validate`]).
pub(super) fn format(ts: Timestamp, rules: &DateRules) -> Option<String> {
    if rules.request_format == DEFAULT_REQUEST_FORMAT
        && let Some(text) = tallyfy_format(ts, rules)
    {
        return Some(text);
    }
    let zoned = ts.to_zoned_datetime(rules.timezone.clone());
    strtime::format(&rules.request_format, &zoned).ok()
}

/// Tallyfy's `YYYY-DD-MM HH:MM:SS`, digit by digit: what strftime makes of
/// [`DEFAULT_REQUEST_FORMAT`] without reading the format each time (a year
/// before 0 is left to strftime, which signs it).
fn tallyfy_format(ts: Timestamp, rules: &DateRules) -> Option<String> {
    let dt = rules.timezone.to_offset(ts).to_datetime(ts);
    let year = u16::try_from(dt.year()).ok()?;
    let mut text = [0u8; 19];
    let mut put = |at: usize, value: u16, width: usize| {
        let mut value = value;
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, dt.day().unsigned_abs().into(), 2);
    put(8, dt.month().unsigned_abs().into(), 2);
    put(11, dt.hour().unsigned_abs().into(), 2);
    put(14, dt.minute().unsigned_abs().into(), 2);
    put(17, dt.second().unsigned_abs().into(), 2);
    for (at, separator) in [(4, b'-'), (7, b'-'), (10, b' '), (13, b':'), (16, b':')] {
        text[at] = separator;
    }
    String::from_utf8(text.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn by_strftime(ts: Timestamp, rules: &DateRules) -> String {
        strtime::format(DEFAULT_REQUEST_FORMAT, &ts.to_zoned_datetime(rules.timezone.clone()))
            .expect("format")
    }

    proptest! {
        #[test]
        fn the_default_format_is_written_as_strftime_writes_it(
            seconds in Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/St_Johns", "Asia/Kathmandu", "Pacific/Kiritimati"]),
        ) {
            let ts = Timestamp::from_second(seconds).expect("in range");
            let rules = DateRules { timezone: jiff::tz::TimeZone::get(zone).expect("zone"), ..DateRules::default() };
            prop_assert_eq!(format(ts, &rules), Some(by_strftime(ts, &rules)));
        }
    }

    #[test]
    fn the_first_and_last_years_match_strftime_and_negative_ones_are_left_to_it() {
        let rules = DateRules::default();
        let year_zero = Timestamp::from_second(-62_135_596_800 - 86_400).expect("0000-12-31");
        assert_eq!(format(year_zero, &rules), Some("0000-31-12 00:00:00".to_owned()));
        assert_eq!(format(Timestamp::MAX, &rules), Some(by_strftime(Timestamp::MAX, &rules)));
        let negative = Timestamp::from_second(-62_200_000_000).expect("year -2");
        assert_eq!(tallyfy_format(negative, &rules), None);
        assert_eq!(format(negative, &rules), Some(by_strftime(negative, &rules)));
        let moment = Timestamp::from_second(1_759_251_600).expect("2025-09-30T17:00:00Z");
        assert_eq!(format(moment, &rules), Some("2025-30-09 17:00:00".to_owned()), "day before month");
    }
}
