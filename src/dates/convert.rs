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

use super::DateRules;
use super::parse::{Parsed, parse};

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
    let zoned = ts.to_zoned_datetime(rules.timezone.clone());
    strtime::format(&rules.request_format, &zoned).ok()
}
