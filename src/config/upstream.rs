//! `[upstream]`: where Tallyfy is, how to reach it and which client header to add.

use http::HeaderValue;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::ConfigError;
use super::Upstream;
use super::ctx::{Ctx, http_url, millis};
use super::raw::RawUpstream;

pub const DEFAULT_TOKEN_PATH: &str = "/api/oauth/token";
pub const DEFAULT_CLIENT_HEADER: &str = "APIClient";

pub(super) fn validate(ctx: &Ctx<'_>, raw: &RawUpstream) -> Result<Upstream, ConfigError> {
    let base = http_url(ctx, &raw.base_url, "upstream.base_url")?;
    if base.query().is_some() {
        return Err(ctx.at(&raw.base_url, "upstream.base_url", "must not have a query string"));
    }
    let path_prefix = base.path().trim_end_matches('/').to_owned();
    // Read as Tallyfy reads a path (a caller's is refused for the same), and
    // its last word in any case, percent-decoded (`/API`, `/ap%69`, `/api/.`).
    let mut last = None;
    for segment in crate::target::segments(&path_prefix).filter(|_| !path_prefix.is_empty()) {
        last = Some(
            segment.map_err(|why| ctx.at(&raw.base_url, "upstream.base_url", format!("its path: {why}")))?,
        );
    }
    if last.is_some_and(|last| last.eq_ignore_ascii_case("api")) {
        return Err(ctx.at(&raw.base_url, "upstream.base_url", "must not end in /api (\"https://go.tallyfy.com\"): the caller's /api/... path is appended as received"));
    }
    let scheme = base.scheme().cloned().expect("http_url checked the scheme");
    // As Tallyfy writes it in its own links, which are found byte for byte.
    let authority = crate::target::canonical_authority(
        &scheme,
        base.authority().expect("http_url checked the authority"),
    );
    let token_url = match &raw.token_url {
        Some(url) => {
            let token_url = http_url(ctx, url, "upstream.token_url")?;
            if scheme == http::uri::Scheme::HTTPS && token_url.scheme() != Some(&http::uri::Scheme::HTTPS) {
                // Client secrets and passwords would go in clear beside an
                // upstream that is spoken to over TLS: a typo, not a choice.
                return Err(ctx.at(url, "upstream.token_url", "must be https:// when base_url is"));
            }
            token_url
        }
        None => format!("{scheme}://{authority}{path_prefix}{DEFAULT_TOKEN_PATH}").parse().map_err(|e| {
            ctx.at(&raw.base_url, "upstream.token_url", format!("cannot derive from base_url: {e}"))
        })?,
    };
    let (ca_file, extra_roots) = match &raw.ca_file {
        None => (None, Vec::new()),
        Some(path) => {
            let full = ctx.base_dir().join(path.get_ref());
            let certs = super::listen_tls::pem_file(&full)
                .and_then(|pem| CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    ctx.at(
                        path,
                        "upstream.ca_file",
                        format!("cannot read PEM certificates from {}: {e}", full.display()),
                    )
                })?;
            if certs.is_empty() {
                return Err(ctx.at(
                    path,
                    "upstream.ca_file",
                    format!("{} holds no PEM certificate", full.display()),
                ));
            }
            // Read as the upstream's TLS client will read them: a certificate
            // it cannot use fails here, not when `run` builds that client.
            let mut roots = rustls::RootCertStore::empty();
            for (index, cert) in certs.iter().enumerate() {
                roots.add(cert.clone()).map_err(|e| {
                    ctx.at(
                        path,
                        "upstream.ca_file",
                        format!(
                            "certificate {} in {} is not a usable CA certificate: {e}",
                            index + 1,
                            full.display()
                        ),
                    )
                })?;
            }
            (Some(full), certs)
        }
    };
    let client_header = match &raw.client_header {
        None => HeaderValue::from_static(DEFAULT_CLIENT_HEADER),
        Some(v) => HeaderValue::from_str(v.get_ref()).ok().filter(|h| !h.is_empty()).ok_or_else(|| {
            ctx.at(v, "upstream.client_header", "must be a non-empty, visible-ASCII header value")
        })?,
    };
    Ok(Upstream {
        scheme,
        authority,
        path_prefix,
        base_url: raw.base_url.get_ref().clone(),
        token_url,
        extra_roots,
        ca_file,
        client_header,
        connect_timeout: millis(ctx, raw.connect_timeout_ms.as_ref(), "upstream.connect_timeout_ms", 2_000)?,
        request_timeout: millis(ctx, raw.request_timeout_ms.as_ref(), "upstream.request_timeout_ms", 30_000)?,
        pool_idle_timeout: millis(
            ctx,
            raw.pool_idle_timeout_ms.as_ref(),
            "upstream.pool_idle_timeout_ms",
            90_000,
        )?,
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(64),
    })
}
