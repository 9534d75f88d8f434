//! The names a verified client certificate vouches for: URI SANs (SPIFFE IDs) and
//! DNS SANs; the subject CN only when the certificate has no SAN at all (as RFC
//! 6125 treats CNs), and never a CN that could be read as a URI (one holding
//! `:` or `/`), so a CN cannot impersonate a SPIFFE ID. A URI SAN is a URI
//! only with a scheme (`spiffe:`), so it cannot pass for a DNS name either.
//! `client_cert` identity rules match against them.
//!
//! Under a CA that carries name constraints, only DNS SANs name a certificate:
//! they are the one form the verifier (webpki) holds to those constraints. A
//! CN is checked against none, and a URI against none that limits DNS names,
//! so a sub-CA confined to `billing.internal` could otherwise issue a
//! certificate naming any identity.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What the configured client CAs (`listen.tls.client_ca`) say about the names
/// they vouch for: the subjects of those that carry name constraints, read
/// once when the config is loaded.
#[derive(Debug, Clone, Default)]
pub struct Anchors {
    constrained_subjects: Arc<[Box<[u8]>]>,
}

impl Anchors {
    pub fn new(roots: &[CertificateDer<'_>]) -> Self {
        let constrained_subjects = roots
            .iter()
            .filter_map(|root| X509Certificate::from_der(root.as_ref()).ok())
            .filter(|(_, root)| constrains_names(root))
            .map(|(_, root)| root.subject().as_raw().into())
            .collect();
        Anchors { constrained_subjects }
    }
}

/// Whether a CA certificate carries a name constraints extension (one that
/// cannot be read counts: the verifier would have refused what it limits).
fn constrains_names(ca: &X509Certificate<'_>) -> bool {
    !matches!(ca.name_constraints(), Ok(None))
}

/// Names the leaf of a verified `chain` vouches for (the leaf, then the
/// intermediates the caller presented); empty when it cannot be parsed
/// (rustls has already verified it, so that would be a certificate no rule
/// can name anyway).
pub fn names(chain: &[CertificateDer<'_>], anchors: &Anchors) -> Vec<String> {
    let Some(Ok((_, parsed))) = chain.first().map(|leaf| X509Certificate::from_der(leaf.as_ref())) else {
        return Vec::new();
    };
    // Constrained when an intermediate presented (or one that cannot be
    // read) carries name constraints, or any certificate presented was issued
    // by an anchor that does (matched by name: any anchor of that name
    // counts). The verified path is a part of what was presented, whatever
    // else a caller adds or however it orders it, so every path through a
    // constrained CA is caught.
    let intermediates: Vec<_> = chain[1..]
        .iter()
        .map(|cert| X509Certificate::from_der(cert.as_ref()).map(|(_, cert)| cert))
        .collect();
    let by_constrained_anchor =
        |issuer: &[u8]| anchors.constrained_subjects.iter().any(|subject| **subject == *issuer);
    let constrained = by_constrained_anchor(parsed.issuer().as_raw())
        || intermediates.iter().any(|cert| match cert {
            Ok(cert) => constrains_names(cert) || by_constrained_anchor(cert.issuer().as_raw()),
            Err(_) => true,
        });
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
            if let GeneralName::URI(uri) = name
                && !constrained
                && has_scheme(uri)
            {
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
    if !has_san && !constrained {
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

/// Whether `uri` starts with a scheme and its `:` (RFC 3986: a letter, then
/// letters, digits, `+`, `-` or `.`).
fn has_scheme(uri: &str) -> bool {
    let Some((scheme, _)) = uri.split_once(':') else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|first| first.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
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
        assert_eq!(
            names(&[certificate("app.example", &[spiffe, "app.internal"])], &Anchors::default()),
            [spiffe, "app.internal"]
        );
        assert_eq!(names(&[certificate("app.example", &[])], &Anchors::default()), ["app.example"]);
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
        let named = names(&[only_ip_and_email], &Anchors::default());
        assert!(named.is_empty(), "{named:?}");
        let dropped = certificate("payments-app", &["x/y"]);
        assert!(
            names(&[dropped], &Anchors::default()).is_empty(),
            "a dropped DNS SAN does not let the CN in"
        );
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
        assert_eq!(names(&[cert], &Anchors::default()), ["app.internal"]);
    }

    #[test]
    fn a_cn_shaped_like_a_uri_names_nothing() {
        for cn in ["spiffe://cluster.local/ns/billing/sa/app", "urn:x", "a/b"] {
            assert!(names(&[certificate(cn, &[])], &Anchors::default()).is_empty(), "{cn}");
        }
    }

    /// A root, a sub-CA under it confined to `billing.internal`, and a leaf
    /// the sub-CA issued with `cn` and `sans` (as [`certificate`] reads them).
    fn under_a_confined_ca(cn: &str, sans: &[&str]) -> [CertificateDer<'static>; 3] {
        let root_key = rcgen::KeyPair::generate().expect("key");
        let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let sub_key = rcgen::KeyPair::generate().expect("key");
        let mut sub_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        sub_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        sub_params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("billing.internal".to_owned())],
            excluded_subtrees: Vec::new(),
        });
        let sub = sub_params.signed_by(&sub_key, &root_issuer).expect("sub-CA");
        let sub_issuer = rcgen::Issuer::new(sub_params, sub_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        leaf_params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        leaf_params.subject_alt_names = sans
            .iter()
            .map(|san| match san.contains(':') {
                true => rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*san).expect("ia5")),
                false => rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*san).expect("ia5")),
            })
            .collect();
        let leaf = leaf_params.signed_by(&leaf_key, &sub_issuer).expect("leaf");
        [leaf.der().clone(), sub.der().clone(), root.der().clone()]
    }

    #[test]
    fn under_a_ca_that_constrains_names_only_dns_names_name_a_certificate() {
        let spiffe = "spiffe://cluster.local/ns/payments/sa/app";
        let [leaf, sub, _] = under_a_confined_ca("payments.internal", &[spiffe, "billing.internal"]);
        let none = Anchors::default();
        assert_eq!(names(&[leaf.clone(), sub.clone()], &none), ["billing.internal"], "the sub-CA presented");
        let anchors = Anchors::new(std::slice::from_ref(&sub));
        assert_eq!(
            names(std::slice::from_ref(&leaf), &anchors),
            ["billing.internal"],
            "the sub-CA an anchor"
        );
        // Anything else presented after the leaf changes nothing.
        let junk = certificate("junk", &[]);
        assert_eq!(names(&[leaf.clone(), junk.clone()], &anchors), ["billing.internal"], "junk after it");
        assert_eq!(names(&[leaf.clone(), junk, sub], &anchors), ["billing.internal"], "and the sub-CA too");
        let [cn_only, sub, root] = under_a_confined_ca("payments.internal", &[]);
        assert!(names(&[cn_only.clone(), sub.clone()], &none).is_empty(), "no CN under constraints");
        assert!(names(&[cn_only, sub], &Anchors::new(&[root])).is_empty());
        // An unconstrained chain: as before.
        let plain = certificate("payments.internal", &[spiffe]);
        assert_eq!(names(&[plain], &none), [spiffe]);
    }

    #[test]
    fn a_uri_san_without_a_scheme_names_nothing() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = ["payments.internal", "1x:y", "spiffe://a/b", "urn:x"]
            .into_iter()
            .map(|uri| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(uri).expect("ia5")))
            .collect();
        let cert = params.self_signed(&key).expect("certificate").der().clone();
        assert_eq!(names(&[cert], &Anchors::default()), ["spiffe://a/b", "urn:x"]);
    }
}
