//! The names a verified client certificate vouches for: URI SANs (SPIFFE IDs) and
//! DNS SANs; the subject CN only when the certificate has no SAN at all (as RFC
//! 6125 treats CNs), so a CN cannot impersonate a SPIFFE ID. `client_cert`
//! identity rules match against them.

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Names in the certificate; empty when it cannot be parsed (rustls has already
/// verified it, so that would be a certificate no rule can name anyway).
pub fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                names.push((*uri).to_owned());
            }
        }
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    if names.is_empty() {
        for cn in parsed.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_owned());
            }
        }
    }
    names
}
