//! Reading the `exp` claim of a JWT-shaped access token (Laravel Passport issues
//! them). The signature is not checked: the proxy only wants to know when Tallyfy
//! will stop accepting the token, and Tallyfy does the verifying.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The `exp` claim (unix seconds), if `token` is a JWT that has one.
pub fn expiry(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match &claims["exp"] {
        serde_json::Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn reads_exp_from_the_payload() {
        assert_eq!(expiry(&jwt(r#"{"sub":"1","exp":1767225600}"#)), Some(1_767_225_600));
        assert_eq!(expiry(&jwt(r#"{"exp":1767225600.5}"#)), Some(1_767_225_600));
    }

    #[test]
    fn opaque_or_broken_tokens_have_no_expiry() {
        assert_eq!(expiry("opaque-personal-token"), None);
        assert_eq!(expiry(&jwt(r#"{"sub":"1"}"#)), None);
        assert_eq!(expiry("a.!!!.c"), None);
        assert_eq!(expiry(&jwt("not json")), None);
        assert_eq!(expiry("a.b.c.d"), None);
    }
}
