//! The connection to Tallyfy: connections over rustls (HTTP/1.1 spoken by the
//! request's own task, [`http1`]; HTTP/2 by hyper; ALPN chooses) pooled per
//! runtime thread ([`pool`]), the upstream URI for a request, and timeouts.
//!
//! This is the only place requests leave the proxy for the API, and the URI it
//! builds always names the configured upstream: the caller's target contributes its
//! path and query, byte for byte, and nothing else.

use std::path::PathBuf;

use http::HeaderValue;
use rustls_pki_types::CertificateDer;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Response, Uri};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::body::{DataOnly, Prefixed, Progress, Tracked};
use crate::error::ProxyError;
use crate::method_override::multipart::{Refused, Screened};
use crate::server::CallerBody;

mod http1;
mod outbound;
mod pool;
mod returning;

pub use outbound::{Outbound, Tenant};
use pool::{Pool, SendError};
pub use returning::UpstreamBody;

/// The caller's body streamed: what was already read, then the rest (its
/// trailers dropped), cut off at the size limit and screened for method
/// overrides when the identity needs it.
pub type StreamedBody = Prefixed<Screened<Limited<DataOnly<CallerBody>>>>;

/// The body sent upstream: a kept (replayable) body, or the caller's body streamed.
pub type RequestBody = Either<Full<Bytes>, StreamedBody>;

/// What the client actually sends: the body, reporting its progress.
type SentBody = Tracked<RequestBody>;

/// Where Tallyfy is and how to talk to it (`[upstream]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path of `base_url` without its trailing slash (usually empty); the caller's
    /// path and query are appended to it byte for byte.
    pub path_prefix: String,
    /// `base_url` as configured, for messages and `check`.
    pub base_url: String,
    /// The OAuth token endpoint; the only other host the proxy ever talks to.
    pub token_url: http::Uri,
    /// Extra trusted roots from `ca_file`, on top of the webpki roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub ca_file: Option<PathBuf>,
    /// Value of `X-Tallyfy-Client` on every upstream request.
    pub client_header: HeaderValue,
    pub connect_timeout: Duration,
    /// From sending the request until the response head has arrived.
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

pub struct Upstream {
    /// Connections per thread that sends requests: a request uses connections
    /// its own thread owns, never handing off to another thread's connection
    /// task (`pool_max_idle_per_host` is per thread).
    pool: Pool,
    client_header: HeaderValue,
    scheme: Scheme,
    authority: Authority,
    path_prefix: String,
    request_timeout: Duration,
    body_limit: u64,
}

impl Upstream {
    /// Builds the client. `body_limit` is only used to word the 413 when a streamed
    /// body turns out too large.
    pub fn new(config: &Settings, body_limit: u64) -> Result<Upstream, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(&config.extra_roots)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let origin = Uri::builder()
            .scheme(config.scheme.clone())
            .authority(config.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| rustls::Error::General(format!("upstream origin: {e}")))?;
        Ok(Upstream {
            pool: Pool::new(
                https,
                origin,
                config.connect_timeout,
                config.pool_idle_timeout,
                config.pool_max_idle_per_host,
            ),
            client_header: config.client_header.clone(),
            scheme: config.scheme.clone(),
            authority: config.authority.clone(),
            path_prefix: config.path_prefix.clone(),
            request_timeout: config.request_timeout,
            body_limit,
        })
    }

    /// `scheme://host[/prefix]` of Tallyfy, as it writes absolute links.
    pub fn base(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path_prefix)
    }

    /// `scheme://host` of Tallyfy.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// The `X-Tallyfy-Client` value every upstream request carries.
    pub fn client_header(&self) -> &HeaderValue {
        &self.client_header
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The upstream URI for a caller's target: configured scheme and host, the
    /// caller's path and query exactly as received.
    pub fn uri_for(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let received =
            target.path_and_query().ok_or(ProxyError::BadRequest("the request target has no path"))?;
        let path_and_query = if self.path_prefix.is_empty() {
            received.clone()
        } else {
            PathAndQuery::try_from(format!("{}{}", self.path_prefix, received.as_str()))
                .map_err(|e| ProxyError::Internal(format!("prefixed path: {e}")))?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|e| ProxyError::Internal(format!("upstream URI: {e}")))
    }

    /// The path of an upstream URI (one [`Upstream::uri_for`] made) as the
    /// caller sent it, the `base_url` path taken off: the path the request was
    /// admitted on, so a 429 is remembered under the same org and limit.
    pub fn received_path<'a>(&self, uri: &'a Uri) -> &'a str {
        uri.path().strip_prefix(self.path_prefix.as_str()).unwrap_or(uri.path())
    }

    /// Sends the request `outbound` holds (its URI from [`Upstream::uri_for`])
    /// and waits for the response head. `upstream.request_timeout_ms` bounds
    /// Tallyfy's silence: the time since the request body last moved (so a long
    /// upload is not a timeout while it flows) until the response head arrives.
    /// The response body streams on afterwards.
    pub async fn send(&self, outbound: &mut Outbound) -> Result<Response<UpstreamBody>, ProxyError> {
        let Outbound { request, progress, tenant } = outbound;
        let response = self.pool.send(request, *tenant);
        tokio::pin!(response);
        loop {
            let deadline = progress.last() + self.request_timeout;
            tokio::select! {
                result = &mut response => return result.map_err(|error| self.classify(&error, progress)),
                () = tokio::time::sleep_until(deadline.into()) => {
                    if progress.last() + self.request_timeout <= Instant::now() {
                        return Err(ProxyError::UpstreamTimeout(self.request_timeout));
                    }
                }
            }
        }
    }

    /// What a failed send was: the caller's body, when it failed (whatever
    /// the protocol made of that: hyper's HTTP/2 client only resets the
    /// stream, and says why nowhere), else Tallyfy's side.
    fn classify(&self, error: &SendError, progress: &Progress) -> ProxyError {
        if let Some(failure) = progress.failure() {
            return self.judge_failure(failure, true);
        }
        let (error, callers): (&(dyn StdError + 'static), bool) = match error {
            SendError::Connect(error) => return ProxyError::UpstreamUnreachable(chain(&**error)),
            SendError::Http1(error) => (error, error.is_callers()),
            // A failing body is in `progress`; hyper's other "user" errors
            // (a request dropped when the connection went away) are not the caller's.
            SendError::Http2(error) => (error, false),
            SendError::Spent => return ProxyError::Internal("a request was sent twice".into()),
        };
        self.judge_failure(error, callers)
    }

    /// `error` as the caller's answer: its body's limit, an override refused,
    /// or its body failing (`callers`), else Tallyfy's connection failing.
    fn judge_failure(&self, error: &(dyn StdError + 'static), callers: bool) -> ProxyError {
        if find_source::<LengthLimitError>(error).is_some() {
            return ProxyError::BodyTooLarge { limit: self.body_limit };
        }
        match find_source::<Refused>(error) {
            Some(Refused::Method(_)) => {
                return ProxyError::Forbidden(
                    "this identity may not use the method its _method override names",
                );
            }
            Some(Refused::Unreadable(unreadable)) => return ProxyError::OverrideUnreadable(unreadable.0),
            None => {}
        }
        let detail = chain(error);
        // A failing request body is the caller's (it hung up mid-upload).
        if callers {
            return ProxyError::BodyRead(detail);
        }
        ProxyError::UpstreamBroken(detail)
    }
}

/// rustls with the ring provider, webpki roots plus the configured extra roots.
/// No ALPN: the upstream connector builder sets h2 + http/1.1 itself, and the
/// token endpoint is spoken to over HTTP/1.1.
pub fn tls_config(
    extra_roots: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn find_source<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// `outer: inner: innermost`, for the log line.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base: &str) -> Upstream {
        let source = format!(
            "[listen]\nproxy = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n[upstream]\nbase_url = \"{base}\"\n\
             [[credentials]]\nname = \"c\"\nkind = \"personal_token\"\ntoken = \"t\"\n\
             [[identities]]\nname = \"i\"\ncredential = \"c\"\nmatch = {{ any = true }}\n"
        );
        let config =
            crate::config::Config::parse(&source, "t.toml".as_ref(), &|_| None).expect("valid config");
        Upstream::new(&config.upstream, 1).expect("TLS config builds")
    }

    #[tokio::test]
    async fn the_upstream_uri_keeps_path_and_query_byte_for_byte() {
        let up = upstream("https://go.tallyfy.com");
        let target: Uri = "/api/organizations/o/tasks?q=a%20b&x=%2F&empty=".parse().expect("uri");
        let uri = up.uri_for(&target).expect("builds");
        assert_eq!(uri.to_string(), "https://go.tallyfy.com/api/organizations/o/tasks?q=a%20b&x=%2F&empty=");
    }

    #[tokio::test]
    async fn absolute_form_targets_never_choose_the_host() {
        let up = upstream("http://127.0.0.1:9000/prefix/");
        let target: Uri = "http://evil.example/api/me?x=1".parse().expect("uri");
        let uri = up.uri_for(&target).expect("builds");
        assert_eq!(uri.to_string(), "http://127.0.0.1:9000/prefix/api/me?x=1");
    }
}
