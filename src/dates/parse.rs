//! Reading one value as a point in time: the accepted input forms.
//!
//! * RFC 3339 / ISO 8601: `YYYY-MM-DD` `T`|`t`|space `HH:MM[:SS[.fraction]]` then `Z`|`z`|`±HH:MM`|`±HHMM`.
//!   With an offset the date is always year-month-day.
//! * Naive (no offset): the same without the offset, and date-only `YYYY-MM-DD` (midnight). The two
//!   middle numbers are read in [`InputOrder`]; the wall time is read in the configured zone.
//! * RFC 2822 (`Tue, 15 Jul 2025 17:00:00 +0000`) through jiff's parser.
//! * Epoch seconds, 9 to 11 ASCII digits, only when the caller allows it (top-level date fields).
//!
//! Anything else, including out-of-range fields (`2025-13-45`), trailing text (`2025-06-30 meeting`)
//! or surrounding whitespace, is not a date. Seconds `60` (a leap second) are read as `59`.

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::fmt::rfc2822;
use jiff::tz::Offset;

use super::InputOrder;

/// A parsed value: an exact instant, or a wall-clock time still to be placed in the configured zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parsed {
    Instant(Timestamp),
    Local(DateTime),
}

/// Whether `b` could be an RFC 2822 date and nothing else. jiff's parser also
/// takes a comment after the date and white space around it, so
/// `Tue, 15 Jul 2025 17:00:00 +0000 (bring laptop)` would parse, and its
/// rewrite would lose the text: a value holding a parenthesis or a line break,
/// or white space at either end, is text, not a date.
fn rfc2822_alone(b: &[u8]) -> bool {
    let (Some(first), Some(last)) = (b.first(), b.last()) else { return false };
    !first.is_ascii_whitespace()
        && !last.is_ascii_whitespace()
        && !b.iter().any(|&c| matches!(c, b'(' | b')' | b'\r' | b'\n'))
}

/// Parses `s` in any accepted form.
pub(super) fn parse(s: &str, order: InputOrder, allow_epoch: bool) -> Option<Parsed> {
    let b = s.as_bytes();
    if allow_epoch && (9..=11).contains(&b.len()) && b.iter().all(u8::is_ascii_digit) {
        return epoch_seconds(b).map(Parsed::Instant);
    }
    if b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' {
        return iso(b, order);
    }
    if (16..=64).contains(&b.len()) && b.contains(&b':') && rfc2822_alone(b) {
        static RFC2822: rfc2822::DateTimeParser = rfc2822::DateTimeParser::new();
        return RFC2822.parse_timestamp(b).ok().map(Parsed::Instant);
    }
    None
}

/// Seconds since the Unix epoch, from ASCII digits.
pub(super) fn epoch_seconds(digits: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(digits).ok()?;
    Timestamp::from_second(s.parse().ok()?).ok()
}

/// A cursor over ASCII bytes with the few primitives the ISO grammar needs.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    /// `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<i32> {
        let part = self.b.get(self.i..self.i + n)?;
        let mut v = 0i32;
        for &d in part {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i32::from(d - b'0');
        }
        self.i += n;
        Some(v)
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.b.get(self.i) == Some(&byte);
        self.i += usize::from(hit);
        hit
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn done(&self) -> bool {
        self.i == self.b.len()
    }
}

fn iso(b: &[u8], order: InputOrder) -> Option<Parsed> {
    let mut c = Cursor { b, i: 0 };
    let year = c.digits(4)?;
    let (first, second) = (c.eat(b'-').then(|| c.digits(2))??, c.eat(b'-').then(|| c.digits(2))??);
    let naive_date = |order| match order {
        InputOrder::Ymd => (first, second),
        InputOrder::Ydm => (second, first),
    };
    if c.done() {
        let (month, day) = naive_date(order);
        return local(year, month, day, (0, 0, 0, 0)).map(Parsed::Local);
    }
    if !matches!(c.peek(), Some(b'T' | b't' | b' ')) {
        return None;
    }
    c.i += 1;
    let hour = c.digits(2)?;
    let minute = c.eat(b':').then(|| c.digits(2))??;
    let (mut second_, mut nanos) = (0, 0);
    if c.eat(b':') {
        second_ = c.digits(2)?;
        if second_ == 60 {
            second_ = 59; // a leap second: jiff has none, keep it in the same minute
        }
        if matches!(c.peek(), Some(b'.' | b',')) {
            c.i += 1;
            nanos = fraction(&mut c)?;
        }
    }
    let time = (hour, minute, second_, nanos);
    if c.done() {
        let (month, day) = naive_date(order);
        return local(year, month, day, time).map(Parsed::Local);
    }
    let offset_seconds = match c.peek()? {
        b'Z' | b'z' => {
            c.i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            c.i += 1;
            let h = c.digits(2)?;
            c.eat(b':');
            let m = c.digits(2)?;
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            if sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    if !c.done() {
        return None;
    }
    let dt = local(year, first, second, time)?;
    Offset::from_seconds(offset_seconds).ok()?.to_timestamp(dt).ok().map(Parsed::Instant)
}

/// 1 to 9 fractional digits as nanoseconds.
fn fraction(c: &mut Cursor<'_>) -> Option<i32> {
    let start = c.i;
    let mut nanos = 0i32;
    while let Some(d @ b'0'..=b'9') = c.peek() {
        if c.i - start == 9 {
            return None;
        }
        nanos = nanos * 10 + i32::from(d - b'0');
        c.i += 1;
    }
    let len = c.i - start;
    if len == 0 {
        return None;
    }
    Some(nanos * 10i32.pow((9 - len) as u32))
}

/// A validated civil date-time (jiff checks month lengths and leap years).
fn local(year: i32, month: i32, day: i32, (h, mi, s, ns): (i32, i32, i32, i32)) -> Option<DateTime> {
    DateTime::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
        i8::try_from(h).ok()?,
        i8::try_from(mi).ok()?,
        i8::try_from(s).ok()?,
        ns,
    )
    .ok()
}
