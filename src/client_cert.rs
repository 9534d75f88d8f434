//! The names a verified client certificate vouches for: URI SANs (SPIFFE IDs) and
//! DNS SANs; the subject CN only when the certificate has no SAN at all (as RFC
//! 6125 treats CNs), and never a CN that could be read as a URI (one holding
//! `:` or `/`), so a CN cannot impersonate a SPIFFE ID. `client_cert` identity
//! rules match against them.

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
    let san = match parsed.subject_alternative_name() {
        Ok(san) => san,
        // A SAN extension that cannot be read (or is there twice) names nothing,
        // and its CN does not stand in for it.
        Err(_) => return names,
    };
    let has_san = san.is_some();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                names.push((*uri).to_owned());
            }
        }
        // A DNS name holds no `:` or `/`: one that does (a DNS SAN reading
        // `spiffe://...`, which no CA without name constraints checks) would
        // pass for a URI SAN, and names nothing.
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name
                && !dns.contains([':', '/'])
            {
                names.push((*dns).to_owned());
            }
        }
    }
    // Only a certificate with no SAN extension is named by its CN: one whose
    // SANs are all of kinds no rule names (an IP address, an email) or were
    // dropped above is not, or a CA that checks SANs but not CNs could issue
    // a certificate passing for any CN-named identity.
    if !has_san {
        for cn in parsed.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str()
                && !cn.contains([':', '/'])
            {
                names.push(cn.to_owned());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with `cn` as its subject CN and `sans` (URIs
    /// when they hold `://`, DNS names otherwise).
    fn certificate(cn: &str, sans: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.contains("://") {
                true => rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*san).expect("ia5")),
                false => rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*san).expect("ia5")),
            })
            .collect();
        params.self_signed(&key).expect("certificate").der().clone()
    }

    #[test]
    fn sans_are_named_and_a_cn_only_without_them() {
        let spiffe = "spiffe://cluster.local/ns/billing/sa/app";
        assert_eq!(names(&certificate("app.example", &[spiffe, "app.internal"])), [spiffe, "app.internal"]);
        assert_eq!(names(&certificate("app.example", &[])), ["app.example"]);
    }

    #[test]
    fn a_cn_never_stands_in_for_sans_no_rule_names() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "payments-app");
        params.subject_alt_names = vec![
            rcgen::SanType::IpAddress("10.9.9.9".parse().expect("ip")),
            rcgen::SanType::Rfc822Name(rcgen::string::Ia5String::try_from("x@example.com").expect("ia5")),
        ];
        let only_ip_and_email = params.self_signed(&key).expect("certificate").der().clone();
        assert!(names(&only_ip_and_email).is_empty(), "{:?}", names(&only_ip_and_email));
        let dropped = certificate("payments-app", &["x/y"]);
        assert!(names(&dropped).is_empty(), "a dropped DNS SAN does not let the CN in");
    }

    #[test]
    fn a_dns_name_shaped_like_a_uri_names_nothing() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = ["spiffe://cluster.local/ns/billing/sa/app", "urn:x", "app.internal"]
            .into_iter()
            .map(|dns| rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(dns).expect("ia5")))
            .collect();
        let cert = params.self_signed(&key).expect("certificate").der().clone();
        assert_eq!(names(&cert), ["app.internal"]);
    }

    #[test]
    fn a_cn_shaped_like_a_uri_names_nothing() {
        for cn in ["spiffe://cluster.local/ns/billing/sa/app", "urn:x", "a/b"] {
            assert!(names(&certificate(cn, &[])).is_empty(), "{cn}");
        }
    }
}
