//! `[listen] tls = { cert, key, client_ca, client_auth }`: TLS on the proxy
//! listener, and mTLS when a client CA is given.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use toml::Spanned;

use super::ctx::Ctx;
use super::raw::RawListenTls;
use super::{ConfigError, ListenTls};

pub(super) fn validate(ctx: &Ctx<'_>, spanned: &Spanned<RawListenTls>) -> Result<ListenTls, ConfigError> {
    let raw = spanned.get_ref();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(ctx, &raw.cert, "listen.tls.cert")?;
    let key_path = ctx.base_dir().join(raw.key.get_ref());
    let key = pem_file(&key_path).and_then(|pem| PrivateKeyDer::from_pem_slice(&pem)).map_err(|e| {
        ctx.at(
            &raw.key,
            "listen.tls.key",
            format!("cannot read a PEM private key from {}: {e}", key_path.display()),
        )
    })?;
    let client_cert_required = match raw.client_auth.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "optional")) => false,
        Some((_, "required")) => true,
        Some((v, other)) => {
            return Err(ctx.at(
                v,
                "listen.tls.client_auth",
                format!("must be \"optional\" or \"required\", not {other:?}"),
            ));
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ctx.at(spanned, "listen.tls", e.to_string()))?;
    let mut anchors = crate::client_cert::Anchors::default();
    let builder = match &raw.client_ca {
        None if client_cert_required => {
            return Err(ctx.at(spanned, "listen.tls.client_auth", "\"required\" needs client_ca"));
        }
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = read_certs(ctx, ca, "listen.tls.client_ca")?;
            anchors = crate::client_cert::Anchors::new(&certs);
            for cert in certs {
                roots.add(cert).map_err(|e| ctx.at(ca, "listen.tls.client_ca", e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if client_cert_required { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(
                verifier.build().map_err(|e| ctx.at(ca, "listen.tls.client_ca", e.to_string()))?,
            )
        }
    };
    let mut server_config = builder
        .with_single_cert(certs, key)
        .map_err(|e| ctx.at(&raw.cert, "listen.tls.cert", format!("certificate and key do not fit: {e}")))?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if raw.client_ca.is_some() {
        // No session is resumed where client certificates name identities: a
        // resumed session carries the certificate it began with, unchecked,
        // so one expired (or no longer trusted) since would go on naming its
        // identity, ticket after ticket. Each connection verifies its own.
        server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server_config.send_tls13_tickets = 0;
    }
    Ok(ListenTls {
        server_config: Arc::new(server_config),
        client_cert_required,
        verifies_client_certs: raw.client_ca.is_some(),
        anchors,
        fingerprint: fingerprint(ctx, raw),
        files: [Some(&raw.cert), Some(&raw.key), raw.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| std::path::PathBuf::from(path.get_ref()))
            .collect(),
    })
}

fn read_certs(
    ctx: &Ctx<'_>,
    path: &Spanned<String>,
    key: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let full = ctx.base_dir().join(path.get_ref());
    let certs = pem_file(&full)
        .and_then(|pem| CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            ctx.at(path, key, format!("cannot read PEM certificates from {}: {e}", full.display()))
        })?;
    if certs.is_empty() {
        return Err(ctx.at(path, key, format!("{} holds no PEM certificate", full.display())));
    }
    Ok(certs)
}

/// SHA-256 over the files' bytes (they were just read successfully).
fn fingerprint(ctx: &Ctx<'_>, raw: &RawListenTls) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for path in [Some(&raw.cert), Some(&raw.key), raw.client_ca.as_ref()].into_iter().flatten() {
        let path = ctx.base_dir().join(path.get_ref());
        hash.update(super::sources::read_regular(&path, PEM_FILE_MAX).unwrap_or_default());
    }
    hash.finalize().into()
}

/// The most a PEM file (a certificate chain, a key, a CA bundle) may hold.
pub(super) const PEM_FILE_MAX: u64 = 16 * 1024 * 1024;

/// A PEM file's bytes, read as a regular file only (see [`super::sources::read_regular`]).
pub(super) fn pem_file(path: &std::path::Path) -> Result<Vec<u8>, rustls_pki_types::pem::Error> {
    let io = |e: std::io::Error| rustls_pki_types::pem::Error::Io(e);
    let bytes = super::sources::read_regular(path, PEM_FILE_MAX).map_err(io)?;
    if bytes.len() as u64 > PEM_FILE_MAX {
        return Err(io(std::io::Error::other("larger than 16 MiB")));
    }
    Ok(bytes)
}
