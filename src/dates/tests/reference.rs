//! The reference implementation: the same date rules applied to a `serde_json::Value` DOM.

use serde_json::Value;

use crate::dates::{DateRules, convert, convert_field};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Plain,
    Field,
    FormKey,
    Form,
}

/// Applies the date rules to a parsed document, as `rewrite_json` must.
pub(crate) fn reference_rewrite(mut doc: Value, rules: &DateRules) -> Value {
    walk(&mut doc, Ctx::Plain, rules);
    doc
}

fn in_form(ctx: Ctx) -> bool {
    matches!(ctx, Ctx::Form | Ctx::FormKey)
}

fn walk(value: &mut Value, ctx: Ctx, rules: &DateRules) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                let child_ctx = if in_form(ctx) {
                    Ctx::Form
                } else if rules.form_objects.contains(key) {
                    Ctx::FormKey
                } else if rules.fields.contains(key) {
                    Ctx::Field
                } else {
                    Ctx::Plain
                };
                walk(child, child_ctx, rules);
            }
        }
        Value::Array(items) => {
            let child_ctx = if in_form(ctx) { Ctx::Form } else { Ctx::Plain };
            for item in items {
                walk(item, child_ctx, rules);
            }
        }
        Value::String(s) => {
            let new = match ctx {
                Ctx::Field => convert_field(s, rules),
                Ctx::Form => convert(s, rules),
                Ctx::Plain | Ctx::FormKey => None,
            };
            if let Some(new) = new {
                *s = new;
            }
        }
        Value::Number(n) if ctx == Ctx::Field => {
            let digits = n.to_string();
            if n.is_u64()
                && (9..=11).contains(&digits.len())
                && let Some(new) = convert_field(&digits, rules)
            {
                *value = Value::String(new);
            }
        }
        _ => {}
    }
}
