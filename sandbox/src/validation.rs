//! Laravel-style input validation: JSON object bodies, required fields, and the
//! 422 `{"message":"The given data was invalid.","errors":{...}}` shape.

use http::StatusCode;
use serde_json::{Map, Value};

use super::body::ReadBody;
use super::respond::{self, Reply};

/// Field errors collected across a request, keyed by dotted path.
#[derive(Default)]
pub(super) struct Errors(Map<String, Value>);

impl Errors {
    pub fn add(&mut self, path: &str, message: String) {
        let messages = self.0.entry(path.to_owned()).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = messages {
            list.push(Value::String(message));
        }
    }

    /// `Err(422)` when any error was added.
    pub fn finish(self) -> Result<(), Reply> {
        if self.0.is_empty() { Ok(()) } else { Err(unprocessable(self.0)) }
    }
}

/// 422 with Laravel's message and `errors`.
pub(super) fn unprocessable(errors: Map<String, Value>) -> Reply {
    respond::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &serde_json::json!({"message": "The given data was invalid.", "errors": errors}),
    )
}

/// 422 for a single field.
pub(super) fn invalid(path: &str, message: String) -> Reply {
    let mut errors = Errors::default();
    errors.add(path, message);
    unprocessable(errors.0)
}

/// How Laravel names a field in a message: `external_date_creation` -> `external date creation`.
pub(super) fn attribute(path: &str) -> String {
    path.replace('_', " ")
}

/// The body as a JSON object; an empty body is `{}`.
pub(super) fn json_object(body: &ReadBody) -> Result<Map<String, Value>, Reply> {
    if !body.complete() {
        return Err(respond::too_large());
    }
    if body.prefix.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&body.prefix) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(respond::bad_request("The request body must be a JSON object.")),
        Err(error) => Err(respond::bad_request(&format!("The request body is not valid JSON: {error}"))),
    }
}

/// A required non-empty string field.
pub(super) fn required_string(
    object: &Map<String, Value>,
    field: &str,
    errors: &mut Errors,
) -> Option<String> {
    match object.get(field) {
        None | Some(Value::Null) => {
            errors.add(field, format!("The {} field is required.", attribute(field)));
            None
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            errors.add(field, format!("The {} field is required.", attribute(field)));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.add(field, format!("The {} must be a string.", attribute(field)));
            None
        }
    }
}

/// An optional string field (absent or null is `None`).
pub(super) fn optional_string(
    object: &Map<String, Value>,
    field: &str,
    errors: &mut Errors,
) -> Option<String> {
    match object.get(field) {
        None | Some(Value::Null) => None,
        Some(_) => required_string(object, field, errors),
    }
}

/// Loose email syntax: one `@`, a non-empty local part, a dotted domain, no spaces.
pub(super) fn is_email(candidate: &str) -> bool {
    let Some((local, domain)) = candidate.split_once('@') else { return false };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !candidate.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Checks an `email` field's syntax (after `required_string`).
pub(super) fn check_email(field: &str, value: Option<&str>, errors: &mut Errors) {
    if value.is_some_and(|email| !is_email(email)) {
        errors.add(field, format!("The {} must be a valid email address.", attribute(field)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(is_email("a.b@example.com"));
        for bad in ["", "a", "a@b", "@b.com", "a@@b.com", "a b@c.com", "a@.com", "a@com."] {
            assert!(!is_email(bad), "{bad}");
        }
    }
}
