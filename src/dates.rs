//! Date rewriting for request bodies: legacy clients send ISO 8601 / RFC 3339 (and a few other forms);
//! Tallyfy's specification wants `YYYY-DD-MM HH:MM:SS` (the configurable [`DateRules::request_format`]).
//!
//! Pure and byte-level: the functions take body bytes and return new bytes only when a date changed.
//! Output differs from input only inside the rewritten values; every other byte (whitespace, key order,
//! number spelling, escapes, unknown fields, duplicate keys) is copied as it came.
//!
//! Which values are dates:
//! * **fields**: the value of any key named in [`DateRules::fields`], at any depth (so
//!   `tasks.{step}.deadline` too), when it is a string that parses as a date, or an epoch-seconds
//!   string of 9 to 11 digits, or a JSON integer of 9 to 11 digits. An integer is the one non-string
//!   that changes: it is replaced by a JSON *string* in the request format. Objects (template step
//!   deadlines such as `{"value":2,"unit":"days"}`), arrays, other numbers, booleans stay as they are.
//! * **form objects**: inside the object or array under a key named in [`DateRules::form_objects`]
//!   (`prerun`, `taskdata`), every string at any depth that parses as a date (no epoch forms: an opaque
//!   form value of digits is not a date). The direct value of such a key, when it is a string, is not.
//!   Keys inside a form object are never treated as fields.
//!
//! Accepted input forms and zone handling: see `parse.rs` and `convert.rs`.

use std::sync::Arc;

mod convert;
mod form;
mod json;
mod parse;
#[cfg(test)]
pub(crate) mod tests;

pub use form::{form_may_need_rewrite, rewrite_form};
pub use json::{may_need_rewrite, rewrite_json};

/// Request date normalisation (`[dates]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    /// The rules for identities without their own `date_input_order`.
    pub rules: Arc<DateRules>,
    /// Bodies that may hold dates are buffered up to this size; a larger one that
    /// needs rewriting is refused with 413.
    pub max_body_bytes: u64,
}

/// How the two middle numbers of a naive `YYYY-xx-yy` value are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputOrder {
    /// Year-month-day (ISO 8601); the default.
    #[default]
    Ymd,
    /// Year-day-month: for apps that already speak Tallyfy's specified format, so their values pass as-is.
    Ydm,
}

/// The configuration of date rewriting; built once from config.
#[derive(Debug, Clone)]
pub struct DateRules {
    /// jiff strftime format of the values sent upstream; default `%Y-%d-%m %H:%M:%S`.
    pub request_format: String,
    /// Naive inputs are read in this zone and output is written in it; default UTC.
    pub timezone: jiff::tz::TimeZone,
    /// Keys whose values are dates; default `deadline`, `started_at`, `external_date_creation`.
    pub fields: Vec<String>,
    /// Keys whose nested string values are dates when they parse as one; default `prerun`, `taskdata`.
    pub form_objects: Vec<String>,
    /// How naive `YYYY-xx-yy` values are read; default [`InputOrder::Ymd`].
    pub input_order: InputOrder,
}

/// Tallyfy's specified request format: `YYYY-DD-MM HH:MM:SS`.
pub const DEFAULT_REQUEST_FORMAT: &str = "%Y-%d-%m %H:%M:%S";

impl Default for DateRules {
    fn default() -> Self {
        DateRules {
            request_format: DEFAULT_REQUEST_FORMAT.to_owned(),
            timezone: jiff::tz::TimeZone::UTC,
            fields: ["deadline", "started_at", "external_date_creation"].map(String::from).to_vec(),
            form_objects: ["prerun", "taskdata"].map(String::from).to_vec(),
            input_order: InputOrder::Ymd,
        }
    }
}

impl DateRules {
    /// Checks that `request_format` can format a date (call at config load). A format that fails here
    /// would make every conversion return `None`, i.e. silently forward dates unchanged.
    pub fn validate(&self) -> Result<(), String> {
        let sample = jiff::Timestamp::UNIX_EPOCH;
        convert::format(sample, self)
            .map(drop)
            .ok_or_else(|| format!("date request_format {:?} cannot format a date", self.request_format))
    }
}

/// The result of a rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rewrite {
    /// `None`: nothing changed, forward the very same bytes.
    pub body: Option<Vec<u8>>,
    /// How many values were replaced.
    pub dates_rewritten: usize,
}

/// Why a body could not be rewritten. The caller forwards it untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RewriteError {
    /// The body is not valid JSON as PHP reads it (truncated, bad token, bad UTF-8, nesting deeper than 511).
    /// Only reported when the pre-scan found a candidate; date-free bodies are not validated.
    #[error("request body is not valid JSON")]
    InvalidJson,
}

/// One value to the request format, with the rules for values inside form objects (no epoch forms).
/// `None`: not a date, or already exactly the request-format text; leave it alone.
pub fn convert(value: &str, rules: &DateRules) -> Option<String> {
    convert::convert_value(value, rules, false)
}

/// Like [`convert()`], with the rules for a key named in `fields`: also epoch seconds (9 to 11 digits).
pub fn convert_field(value: &str, rules: &DateRules) -> Option<String> {
    convert::convert_value(value, rules, true)
}
