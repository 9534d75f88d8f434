//! Date rewriting in JSON bodies: a pre-scan, then one streaming pass that records edits.

use std::ops::Range;

use memchr::memmem;

use super::convert::{convert_value, format};
use super::parse::epoch_seconds;
use super::{DateRules, Rewrite, RewriteError};
use crate::json::scan::{self as json_scan, StrToken, Visitor};
use crate::json::strings::{ascii_set, decode, escape_may_hide, push_escaped};
use crate::json::{Edit, splice};

/// Rewrites the date values of a JSON body (see the module docs for which values).
///
/// Date-free bodies (per [`may_need_rewrite`]) return `Ok` with `body: None` without being validated.
pub fn rewrite_json(body: &[u8], rules: &DateRules) -> Result<Rewrite, RewriteError> {
    if !may_need_rewrite(body, rules) {
        return Ok(Rewrite::default());
    }
    let mut visitor = DateVisitor { rules, edits: Vec::new() };
    json_scan::scan(json_scan::Reader::Php, body, Ctx::Plain, &mut visitor)
        .map_err(|_| RewriteError::InvalidJson)?;
    Ok(Rewrite { dates_rewritten: visitor.edits.len(), body: splice(body, &visitor.edits) })
}

/// Cheap pre-scan: `false` means no key in the body can be one of the configured field or form-object
/// names, so [`rewrite_json`] would change nothing. Searches for each `"name"` with quotes, then for any
/// escape that could spell a name character (a key like `"dead\u006cine"`).
pub fn may_need_rewrite(body: &[u8], rules: &DateRules) -> bool {
    let names = || rules.fields.iter().chain(&rules.form_objects).map(String::as_bytes);
    let mut needle = Vec::with_capacity(64);
    for name in names() {
        needle.clear();
        needle.push(b'"');
        needle.extend_from_slice(name);
        needle.push(b'"');
        if memmem::find(body, &needle).is_some() {
            return true;
        }
    }
    escape_may_hide(body, &ascii_set(names()))
}

/// What a value is to the date rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Not a date position.
    Plain,
    /// The value of a `fields` key outside form objects.
    Field,
    /// The value of a `form_objects` key: containers below it are form content.
    FormKey,
    /// Anywhere inside a form object.
    Form,
}

struct DateVisitor<'r> {
    rules: &'r DateRules,
    edits: Vec<Edit>,
}

/// Longest raw string worth decoding: every accepted form is shorter.
const MAX_DATE_LEN: usize = 64;

impl Visitor for DateVisitor<'_> {
    type Ctx = Ctx;

    fn key(&mut self, body: &[u8], object: Ctx, key: StrToken) -> Ctx {
        if matches!(object, Ctx::Form | Ctx::FormKey) {
            return Ctx::Form;
        }
        let Some(key) = decode(key.raw(body), key.escaped) else {
            return Ctx::Plain;
        };
        let key = key.as_ref();
        if self.rules.form_objects.iter().any(|name| name == key) {
            Ctx::FormKey
        } else if self.rules.fields.iter().any(|name| name == key) {
            Ctx::Field
        } else {
            Ctx::Plain
        }
    }

    fn element(&mut self, array: Ctx) -> Ctx {
        if matches!(array, Ctx::Form | Ctx::FormKey) { Ctx::Form } else { Ctx::Plain }
    }

    fn string(&mut self, body: &[u8], ctx: Ctx, token: StrToken) {
        let allow_epoch = match ctx {
            Ctx::Field => true,
            Ctx::Form => false,
            Ctx::Plain | Ctx::FormKey => return,
        };
        let raw = token.raw(body);
        if raw.len() < 9 || raw.len() > MAX_DATE_LEN * 6 {
            return; // shorter than any date; longer than any date even fully \u-escaped
        }
        let Some(value) = decode(raw, token.escaped) else { return };
        if let Some(new) = convert_value(&value, self.rules, allow_epoch) {
            let mut bytes = Vec::with_capacity(new.len());
            push_escaped(&mut bytes, &new);
            self.edits.push(Edit { range: token.content(), bytes });
        }
    }

    fn number(&mut self, body: &[u8], ctx: Ctx, span: Range<usize>) {
        if ctx != Ctx::Field {
            return;
        }
        let digits = &body[span.clone()];
        if !(9..=11).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
            return;
        }
        if let Some(new) = epoch_seconds(digits).and_then(|ts| format(ts, self.rules)) {
            let mut bytes = Vec::with_capacity(new.len() + 2);
            bytes.push(b'"');
            push_escaped(&mut bytes, &new);
            bytes.push(b'"');
            self.edits.push(Edit { range: span, bytes });
        }
    }
}
