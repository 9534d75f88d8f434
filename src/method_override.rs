//! Laravel's method override, read as Tallyfy's stack reads it, so a `methods`
//! policy judges the method Tallyfy will act on.
//!
//! Symfony (under Laravel) treats a `POST` as another method when it carries an
//! override: the `X-HTTP-Method-Override` header (stripped for every request by
//! [`crate::headers`]) or a `_method` parameter in the body or the query string.
//! PHP builds those parameters with its own rules, which this module follows:
//! percent-decoding and `+` in urlencoded data; names cut at a NUL, leading
//! spaces dropped, and `.` or ` ` turned into `_` (so `.method` is `_method`); a
//! JSON body's top-level keys (Laravel reads any content type holding `/json` or
//! `+json` as JSON); multipart fields by their `Content-Disposition` name (see
//! [`multipart`]). The value is upper-cased and must be letters only.
//!
//! A request of an identity with a `methods` rule that carries an override is
//! judged by the overriding method as well; an override that cannot be read is
//! refused (400) rather than guessed.

pub mod multipart;

use std::borrow::Cow;

use http::{HeaderMap, Method};
use memchr::memmem;

use crate::json::scan::{self as json_scan, StrToken, Visitor};
use crate::json::strings::{ascii_set, decode, escape_may_hide};

/// The parameter Symfony reads.
const PARAM: &[u8] = b"_method";

/// Why an override could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable(pub &'static str);

/// How PHP and Laravel will read a request body's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// Laravel's `isJson()`: the content type holds `/json` or `+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// A form whose content type also says JSON: PHP fills `$_POST`, Laravel
    /// reads JSON; both readings are judged.
    FormOrJson,
    /// `multipart/form-data` with its boundary as PHP finds it (`None`: no boundary).
    Multipart(Option<Vec<u8>>),
    /// PHP builds no parameters from it.
    Opaque,
}

/// The kind of `headers`' body, in PHP's terms: the content type's essence is
/// lower-cased and ends at `;`, `,` or a space. White space around the value is
/// left out first, as any HTTP/1.1 server in front of PHP leaves it out (an
/// HTTP/2 value may carry it). Two `Content-Type` headers, or a multipart one
/// that also says JSON, cannot be judged.
pub fn body_kind(headers: &HeaderMap) -> Result<BodyKind, Unreadable> {
    let mut values = headers.get_all(http::header::CONTENT_TYPE).iter();
    let Some(value) = values.next().map(|v| v.as_bytes().trim_ascii()) else {
        return Ok(BodyKind::Opaque);
    };
    if values.next().is_some() {
        return Err(Unreadable("a body with two Content-Type headers cannot be judged"));
    }
    let essence_end = value.iter().position(|b| b";, ".contains(b)).unwrap_or(value.len());
    let essence = value[..essence_end].to_ascii_lowercase();
    let json = memmem::find(value, b"/json").is_some() || memmem::find(value, b"+json").is_some();
    Ok(match (essence.as_slice(), json) {
        (b"multipart/form-data", false) => BodyKind::Multipart(multipart::boundary(value)),
        (b"multipart/form-data", true) => {
            return Err(Unreadable("a multipart body whose content type also says JSON cannot be judged"));
        }
        (b"application/x-www-form-urlencoded", false) => BodyKind::Form,
        (b"application/x-www-form-urlencoded", true) => BodyKind::FormOrJson,
        (_, true) => BodyKind::Json,
        (_, false) => BodyKind::Opaque,
    })
}

/// The method an override value names, as Symfony reads it: upper-cased, ASCII
/// letters only.
pub fn parse_method(value: &[u8]) -> Result<Method, Unreadable> {
    let bad = Unreadable("a _method override must name a method in letters");
    if value.is_empty() || value.len() > 32 || !value.iter().all(u8::is_ascii_alphabetic) {
        return Err(bad);
    }
    Method::from_bytes(&value.to_ascii_uppercase()).map_err(|_| bad)
}

/// A request variable's name as PHP registers it (`php_register_variable_ex`):
/// cut at a NUL, leading spaces skipped, ` ` and `.` turned into `_` up to the
/// first `[`. Returns the name and whether it is an array (`name[...]`); an
/// unclosed `[` becomes `_`, and so does every ` `, `.` and `[` after it (PHP 8:
/// `external[date.creation` is `external_date_creation`).
pub fn php_name(raw: &[u8]) -> (Cow<'_, [u8]>, bool) {
    let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
    let start = raw.iter().position(|&b| b != b' ').unwrap_or(raw.len());
    let raw = &raw[start..];
    let bracket = raw.iter().position(|&b| b == b'[');
    let base_end = bracket.unwrap_or(raw.len());
    let needs_fold = raw[..base_end].iter().any(|&b| b == b' ' || b == b'.');
    match bracket {
        Some(at) if raw[at..].contains(&b']') => (fold(&raw[..at], needs_fold), true),
        Some(at) => {
            let mut name = fold(&raw[..at], needs_fold).into_owned();
            name.push(b'_');
            name.extend(
                raw[at + 1..].iter().map(|&b| if matches!(b, b' ' | b'.' | b'[') { b'_' } else { b }),
            );
            (Cow::Owned(name), false)
        }
        None => (fold(raw, needs_fold), false),
    }
}

/// The whole name PHP registers: [`php_name`]'s base, then an array's
/// brackets as written (`tasks[s1][deadline]`, ` started.at` as `started_at`).
pub fn php_full_name(raw: &[u8]) -> Cow<'_, [u8]> {
    let (base, array) = php_name(raw);
    let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
    match raw.iter().position(|&b| b == b'[') {
        Some(bracket) if array => {
            let mut name = base.into_owned();
            name.extend_from_slice(&raw[bracket..]);
            Cow::Owned(name)
        }
        _ => base,
    }
}

fn fold(name: &[u8], needed: bool) -> Cow<'_, [u8]> {
    if !needed {
        return Cow::Borrowed(name);
    }
    Cow::Owned(name.iter().map(|&b| if b == b' ' || b == b'.' { b'_' } else { b }).collect())
}

/// Whether a decoded parameter name is the override, and whether PHP reads it
/// as an array (unreadable as a method).
fn is_param(decoded_name: &[u8]) -> Option<bool> {
    let (name, array) = php_name(decoded_name);
    (&*name == PARAM).then_some(array)
}

/// Every `_method` value in a form body, whose pairs PHP always splits at `&`.
pub fn in_urlencoded(data: &[u8]) -> Result<Vec<Method>, Unreadable> {
    in_pairs(data, |b| b == b'&')
}

/// Every `_method` value in a query string, read both ways PHP may split it:
/// at `&` (`arg_separator.input`'s default), and at `&` or `;` (a setting older
/// hosts use, which would make `?x=1;_method=DELETE` a `DELETE`). Either
/// reading's method is judged, and either one unreadable is refused.
pub fn in_query(query: &[u8]) -> Result<Vec<Method>, Unreadable> {
    let mut methods = in_urlencoded(query)?;
    if query.contains(&b';') {
        methods.extend(in_pairs(query, |b| b == b'&' || b == b';')?);
    }
    Ok(methods)
}

fn in_pairs(data: &[u8], separator: impl Fn(u8) -> bool) -> Result<Vec<Method>, Unreadable> {
    // Fast path: no `method` (in any spelling) means no override.
    if memmem::find(data, b"method").is_none() && !data.contains(&b'%') {
        return Ok(Vec::new());
    }
    let mut methods = Vec::new();
    for pair in data.split(|&b| separator(b)) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        match is_param(&form_decode(name)) {
            None => {}
            Some(true) => return Err(Unreadable("a _method override must be a single value, not an array")),
            Some(false) => methods.push(parse_method(&form_decode(value))?),
        }
    }
    Ok(methods)
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn form_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'+') && !raw.contains(&b'%') {
        return Cow::Borrowed(raw);
    }
    let plussed: Vec<u8> = raw.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect();
    Cow::Owned(percent_encoding::percent_decode(&plussed).collect())
}

/// Every `_method` value among a JSON body's top-level keys. A body that cannot
/// hold one is not parsed; one that may but does not parse is [`Unreadable`].
pub fn in_json(body: &[u8]) -> Result<Vec<Method>, Unreadable> {
    let spelled = memmem::find(body, PARAM).is_some();
    if !spelled && !escape_may_hide(body, &ascii_set([PARAM])) {
        return Ok(Vec::new());
    }
    let mut visitor = TopLevel { values: Vec::new(), unreadable: false };
    json_scan::scan(json_scan::Reader::Php, body, Depth::Root, &mut visitor)
        .map_err(|_| Unreadable("a JSON body that may carry _method must be valid JSON"))?;
    if visitor.unreadable {
        return Err(Unreadable("a _method override must be a JSON string"));
    }
    visitor.values.iter().map(|value| parse_method(value.as_bytes())).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    Root,
    Override,
    Other,
}

struct TopLevel {
    values: Vec<String>,
    unreadable: bool,
}

impl Visitor for TopLevel {
    type Ctx = Depth;

    fn key(&mut self, body: &[u8], object: Depth, key: StrToken) -> Depth {
        // An object as the value: no method (as an array is not).
        self.unreadable |= object == Depth::Override;
        let is_override = object == Depth::Root
            && decode(key.raw(body), key.escaped).is_some_and(|name| name.as_bytes() == PARAM);
        if is_override { Depth::Override } else { Depth::Other }
    }

    fn element(&mut self, array: Depth) -> Depth {
        // `["DELETE"]`: Laravel reads no method from an array; neither is it
        // judged as one here.
        self.unreadable |= array == Depth::Override;
        Depth::Other
    }

    fn string(&mut self, body: &[u8], ctx: Depth, token: StrToken) {
        if ctx == Depth::Override {
            match decode(token.raw(body), token.escaped) {
                Some(value) => self.values.push(value.into_owned()),
                None => self.unreadable = true,
            }
        }
    }

    fn number(&mut self, _body: &[u8], ctx: Depth, _span: std::ops::Range<usize>) {
        if ctx == Depth::Override {
            self.unreadable = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn php_folds_names_the_way_its_variables_are_registered() {
        assert_eq!(php_name(b"_method"), (Cow::Borrowed(&b"_method"[..]), false));
        assert_eq!(&*php_name(b".method").0, b"_method");
        assert_eq!(&*php_name(b"  .method").0, b"_method", "leading spaces are dropped");
        assert_eq!(&*php_name(b"_method\0junk").0, b"_method", "cut at NUL");
        assert_eq!(php_name(b"_method[]"), (Cow::Borrowed(&b"_method"[..]), true));
        assert_eq!(&*php_name(b"_method[").0, b"_method_", "an unclosed [ becomes _");
        // PHP 8 folds what follows an unclosed [ too.
        for name in [&b"external[date.creation"[..], b"external[date creation", b"external[date[creation"] {
            assert_eq!(php_name(name), (Cow::Borrowed(&b"external_date_creation"[..]), false));
        }
        assert_eq!(&*php_name(b" method").0, b"method");
    }

    #[test]
    fn urlencoded_overrides_are_found_in_every_spelling() {
        for data in [
            &b"_method=DELETE"[..],
            b"a=1&_method=delete",
            b"%5Fmethod=DELETE",
            b"%5fmethod=DeLeTe",
            b".method=DELETE",
            b"+.method=DELETE",
            b"_%6Dethod=DELETE",
            b"_method%00x=DELETE",
        ] {
            assert_eq!(in_urlencoded(data), Ok(vec![Method::DELETE]), "{}", String::from_utf8_lossy(data));
        }
        assert_eq!(in_urlencoded(b"title=my+method&x=1"), Ok(vec![]));
        assert_eq!(in_urlencoded(b"methods=1&a_method=DELETE"), Ok(vec![]));
        assert!(in_urlencoded(b"_method[]=DELETE").is_err(), "an array is unreadable");
        assert!(in_json(br#"{"_method":["DELETE"]}"#).is_err(), "in JSON too");
        assert!(in_json(br#"{"_method":{"m":"DELETE"}}"#).is_err(), "and an object");
        assert_eq!(in_json(br#"{"a":{"_method":"DELETE"},"b":["_method"]}"#), Ok(vec![]), "not at the top");
        assert!(in_urlencoded(b"_method=DEL%20ETE").is_err(), "letters only");
        assert!(in_urlencoded(b"_method=").is_err());
    }

    #[test]
    fn a_query_is_read_at_semicolons_too_and_a_form_is_not() {
        assert_eq!(in_query(b"x=1;_method=DELETE"), Ok(vec![Method::DELETE]));
        assert_eq!(in_urlencoded(b"x=1;_method=DELETE"), Ok(vec![]), "a form body: `&` alone");
        assert_eq!(in_query(b"_method=PUT&x=1"), Ok(vec![Method::PUT]), "once, with no `;`");
        assert!(in_query(b"_method=PUT;x").is_err(), "`PUT;x` read at `&` alone is no method");
        assert_eq!(in_query(b"a=1;b=2"), Ok(vec![]));
    }

    #[test]
    fn json_overrides_are_top_level_keys_however_escaped() {
        assert_eq!(in_json(br#"{"_method":"DELETE","x":1}"#), Ok(vec![Method::DELETE]));
        assert_eq!(in_json(br#"{"\u005fmethod":"put"}"#), Ok(vec![Method::PUT]));
        assert_eq!(in_json(br#"{"_m\u0065thod":"PATCH"}"#), Ok(vec![Method::PATCH]));
        assert_eq!(in_json(br#"{"a":{"_method":"DELETE"}}"#), Ok(vec![]), "nested keys are data");
        assert_eq!(in_json(br#"{"title":"_method"}"#), Ok(vec![]));
        assert_eq!(in_json(br#"{"title":"x"}"#), Ok(vec![]));
        assert!(in_json(br#"{"_method":5}"#).is_err());
        // Read as PHP reads it: a number beyond a double is infinity, 200 containers deep is data.
        assert_eq!(in_json(br#"{"_method":"DELETE","x":1e400}"#), Ok(vec![Method::DELETE]));
        let deep = format!(r#"{{"_method":"DELETE","x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(in_json(deep.as_bytes()), Ok(vec![Method::DELETE]));
        assert!(in_json(br#"{"_method":"DELETE""#).is_err(), "invalid JSON that may carry it");
        assert_eq!(
            in_json(br#"{"title":"#),
            Ok(vec![]),
            "invalid JSON that cannot carry it is Tallyfy's to answer"
        );
    }

    #[test]
    fn body_kinds_follow_php_and_laravel() {
        let kind = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
            body_kind(&h).expect("readable")
        };
        assert_eq!(kind("application/json"), BodyKind::Json);
        assert_eq!(kind("text/json; charset=utf-8"), BodyKind::Json);
        assert_eq!(kind("application/vnd.api+json"), BodyKind::Json);
        assert_eq!(kind("Application/X-WWW-Form-Urlencoded ; charset=utf-8"), BodyKind::Form);
        assert_eq!(kind("multipart/form-data; boundary=abc"), BodyKind::Multipart(Some(b"abc".to_vec())));
        assert_eq!(kind("text/plain"), BodyKind::Opaque);
        assert_eq!(kind("application/x-www-form-urlencoded; x=/json"), BodyKind::FormOrJson);
        let mut two = HeaderMap::new();
        two.append(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        two.append(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        assert!(body_kind(&two).is_err(), "two Content-Types");
        let mut mixed = HeaderMap::new();
        mixed.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("multipart/form-data; boundary=x/json"),
        );
        assert!(body_kind(&mixed).is_err(), "multipart that says JSON");
    }
}
