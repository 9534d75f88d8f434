//! Talks to Tallyfy's token endpoint (Laravel Passport, form-encoded grants) and
//! to the application user-token and provisioning routes.
//!
//! Every answer is classified: a token, a refusal with its OAuth error code, a
//! server error, or a malformed body (JSON, empty, HTML: all seen in the wild).
//! Nothing here retries; the refresher decides when to try again. Errors carry
//! no secret: bodies are reduced to their OAuth error code.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

mod answer;

pub use answer::{FetchError, Issued, MIN_LIFETIME, parse_token, refusal};

use super::{OAuthClient, Provision, Settings};
use crate::headers::X_TALLYFY_CLIENT;
use crate::secret::Secret;
use crate::upstream;

#[derive(Debug, thiserror::Error)]
pub enum IssuerSetupError {
    #[error("TLS setup for the token endpoint failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP client for the token endpoint: {0}")]
    Client(#[from] reqwest::Error),
}

pub struct Issuer {
    http: reqwest::Client,
    token_url: String,
    /// `scheme://authority[/prefix]` of the API, for the application routes.
    api_base: String,
    client_header: HeaderValue,
    default_lifetime: Duration,
}

impl Issuer {
    pub fn new(upstream: &upstream::Settings, tokens: &Settings) -> Result<Issuer, IssuerSetupError> {
        let tls = crate::upstream::tls_config(&upstream.extra_roots)?;
        let builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(tokens.fetch_timeout)
            .connect_timeout(upstream.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("tallyfy-proxy/", env!("CARGO_PKG_VERSION")));
        Ok(Issuer {
            http: builder.build()?,
            token_url: upstream.token_url.to_string(),
            api_base: format!("{}://{}{}", upstream.scheme, upstream.authority, upstream.path_prefix),
            client_header: upstream.client_header.clone(),
            default_lifetime: tokens.default_lifetime,
        })
    }

    pub async fn client_credentials(
        &self,
        client: &OAuthClient,
        scope: Option<&str>,
    ) -> Result<Issued, FetchError> {
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client.id.as_str()),
            ("client_secret", client.secret.expose()),
        ];
        form.extend(scope.map(|s| ("scope", s)));
        self.grant(&form).await
    }

    pub async fn password(
        &self,
        client: &OAuthClient,
        username: &str,
        password: &Secret,
        scope: Option<&str>,
    ) -> Result<Issued, FetchError> {
        let mut form = vec![
            ("grant_type", "password"),
            ("client_id", client.id.as_str()),
            ("client_secret", client.secret.expose()),
            ("username", username),
            ("password", password.expose()),
        ];
        form.extend(scope.map(|s| ("scope", s)));
        self.grant(&form).await
    }

    pub async fn refresh(&self, client: &OAuthClient, refresh_token: &Secret) -> Result<Issued, FetchError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
            ("client_id", client.id.as_str()),
            ("client_secret", client.secret.expose()),
        ];
        self.grant(&form).await
    }

    /// `POST /api/applications/{org}/users/{email}/token` with the application token.
    pub async fn mint_user_token(
        &self,
        application_token: &HeaderValue,
        org: &str,
        email: &str,
    ) -> Result<Issued, FetchError> {
        let url = format!("{}/api/applications/{org}/users/{}/token", self.api_base, encode_segment(email));
        let request = self.application_request(reqwest::Method::POST, &url, application_token);
        self.token_from(request.send().await).await
    }

    /// `POST /api/applications/{org}/users`: creates the user a mint could not find.
    pub async fn provision_user(
        &self,
        application_token: &HeaderValue,
        org: &str,
        email: &str,
        provision: &Provision,
    ) -> Result<(), FetchError> {
        let url = format!("{}/api/applications/{org}/users", self.api_base);
        let mut body = serde_json::json!({
            "first_name": provision.first_name,
            "last_name": provision.last_name,
            "email": email,
        });
        if let Some(role) = &provision.role {
            body["role"] = role.as_str().into();
        }
        if let Some(timezone) = &provision.timezone {
            body["timezone"] = timezone.as_str().into();
        }
        let response = self
            .application_request(reqwest::Method::POST, &url, application_token)
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = bounded_body(response).await.unwrap_or_default();
        Err(refusal(status, &body))
    }

    fn application_request(
        &self,
        method: reqwest::Method,
        url: &str,
        token: &HeaderValue,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header(http::header::AUTHORIZATION, token.clone())
            .header(X_TALLYFY_CLIENT, self.client_header.clone())
            .header(http::header::ACCEPT, "application/json")
    }

    async fn grant(&self, form: &[(&str, &str)]) -> Result<Issued, FetchError> {
        // `X-Tallyfy-Client` too: Tallyfy documents it as mandatory on every call.
        let request = self
            .http
            .post(&self.token_url)
            .header(X_TALLYFY_CLIENT, self.client_header.clone())
            .header(http::header::ACCEPT, "application/json")
            .form(form);
        self.token_from(request.send().await).await
    }

    async fn token_from(
        &self,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Issued, FetchError> {
        token_answer(sent.map_err(transport)?, self.default_lifetime).await
    }
}

/// A token endpoint's answer: the token, or the refusal its status says.
async fn token_answer(response: reqwest::Response, default_lifetime: Duration) -> Result<Issued, FetchError> {
    let status = response.status();
    if !status.is_success() {
        // Refused whatever its body: a long or broken one only loses its code.
        let body = bounded_body(response).await.unwrap_or_default();
        return Err(refusal(status, &body));
    }
    // A JWT's `exp` is read against Tallyfy's clock: the proxy's own may run
    // ahead of it (by more than a token's life, none would ever do).
    let tallyfy_now = tallyfy_clock(response.headers());
    let body = bounded_body(response).await?;
    parse_token(&body, default_lifetime, tallyfy_now.unwrap_or_else(unix_now))
}

/// Tallyfy's clock (unix seconds), from an answer's `Date`.
fn tallyfy_clock(headers: &http::HeaderMap) -> Option<u64> {
    let date = headers.get(http::header::DATE)?.to_str().ok()?;
    u64::try_from(jiff::fmt::rfc2822::parse(date).ok()?.timestamp().as_second()).ok()
}

/// A token answer (or a refusal) longer than this is not read: the fetch fails.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A token endpoint's answer, read up to [`MAX_ANSWER_BYTES`]: a longer one
/// fails the fetch instead of filling memory.
async fn bounded_body(mut response: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(FetchError::Malformed("the answer is longer than 64 KiB"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn transport(error: reqwest::Error) -> FetchError {
    if error.is_timeout() {
        return FetchError::Timeout;
    }
    // reqwest errors name the URL, never the form body or headers.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    FetchError::Transport(text)
}

fn encode_segment(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: Vec<u8>) -> reqwest::Response {
        let mut response = http::Response::new(body);
        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
        reqwest::Response::from(response)
    }

    #[tokio::test]
    async fn answers_are_read_up_to_64_kib_and_a_refusal_keeps_its_status_whatever_its_body() {
        let hour = Duration::from_secs(3600);
        let token = br#"{"access_token":"abc","expires_in":60}"#.to_vec();
        assert!(token_answer(answer(200, token), hour).await.is_ok());
        let padded = format!(r#"{{"access_token":"abc","pad":"{}"}}"#, "x".repeat(MAX_ANSWER_BYTES));
        let long = token_answer(answer(200, padded.into_bytes()), hour).await;
        assert!(matches!(long, Err(FetchError::Malformed(_))), "{long:?}");
        let refused = token_answer(answer(401, vec![b' '; 2 * MAX_ANSWER_BYTES]), hour).await;
        assert!(matches!(refused, Err(FetchError::Refused { status: 401, .. })), "{refused:?}");
    }

    /// Without `expires_in`, a JWT's `exp` is read against Tallyfy's `Date`,
    /// not the proxy's clock: a proxy clock years ahead (this test's `exp` is
    /// in 2001) still gives the token its hour.
    #[tokio::test]
    async fn a_jwts_expiry_is_read_against_tallyfys_clock() {
        use base64::Engine;
        let hour = Duration::from_secs(3600);
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1000003600}"#);
        let body = format!(r#"{{"access_token":"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"}}"#).into_bytes();
        let mut dated = http::Response::new(body.clone());
        // 1,000,000,000 seconds: Sun, 09 Sep 2001 01:46:40 GMT.
        dated
            .headers_mut()
            .insert(http::header::DATE, "Sun, 09 Sep 2001 01:46:40 GMT".parse().expect("value"));
        let issued = token_answer(reqwest::Response::from(dated), hour).await.expect("a valid token");
        assert_eq!(issued.lifetime, hour);
        let undated = token_answer(answer(200, body), hour).await;
        assert!(
            matches!(undated, Err(FetchError::Malformed(_))),
            "against the proxy's clock it expired: {undated:?}"
        );
    }

    #[test]
    fn emails_are_encoded_as_one_path_segment() {
        assert_eq!(encode_segment("jane.doe+ops@example.com"), "jane%2Edoe%2Bops%40example%2Ecom");
    }
}
