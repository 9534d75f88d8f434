//! Who is calling, and what it may reach: every matcher, unknown callers, policy,
//! the `current` org alias, and mTLS, against the sandbox Tallyfy.

mod support;

use std::time::Duration;

use support::{
    Credential, Identity, Match, Secret, TOKEN_ENV, TestConfig, client, start_proxy, start_sandbox, table,
};
use tallyfy_sandbox::fixtures::{ORG_ID, OTHER_ORG_ID, PERSONAL_TOKEN};

/// A personal-token credential `ops`, for the identities each test adds.
fn ops_config(base_url: &str) -> TestConfig {
    TestConfig::new(base_url).credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
}

#[tokio::test]
async fn api_keys_basic_and_source_rules_identify_callers() {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = ops_config(&sandbox.base_url())
        .identity(Identity::new("billing", "ops", Match::ApiKey("billing-key")))
        .identity(Identity::new("reports", "ops", Match::Basic { user: "reports", password: "pw" }))
        .identity(Identity::new("elsewhere", "ops", Match::Source(vec!["10.0.0.0/8"])));
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = format!("http://{}/api/me", proxy.proxy_addr());
    let http = client();

    for request in [
        http.get(&url).bearer_auth("billing-key"),
        http.get(&url).header("x-api-key", "billing-key"),
        http.get(&url).basic_auth("reports", Some("pw")),
    ] {
        let response = request.send().await.expect("answered");
        assert_eq!(response.status(), 200);
    }
    let received = sandbox.received();
    assert_eq!(received.len(), 3);
    for upstream in &received {
        assert_eq!(upstream.headers["authorization"], format!("Bearer {PERSONAL_TOKEN}").as_str());
        assert!(upstream.headers.get("x-api-key").is_none());
    }

    for request in [
        http.get(&url),
        http.get(&url).bearer_auth("wrong-key"),
        http.get(&url).basic_auth("reports", Some("guess")),
    ] {
        let response = request.send().await.expect("answered");
        assert_eq!(response.status(), 401);
        assert!(response.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "unknown_caller");
    }
    assert_eq!(sandbox.received().len(), 3, "unknown callers never reach Tallyfy");
}

#[tokio::test]
async fn source_rules_match_the_peer_address() {
    let sandbox = start_sandbox().await;
    // The IPv4-mapped spelling (as a dual-stack listener shows IPv4 peers)
    // names the same caller.
    for network in ["127.0.0.1/32", "::ffff:127.0.0.1/128", "::ffff:127.0.0.0/104"] {
        let dir = tempfile::tempdir().expect("dir");
        let config = ops_config(&sandbox.base_url()).identity(Identity::new(
            "sidecar",
            "ops",
            Match::Source(vec![network]),
        ));
        let proxy = start_proxy(&config.parse(dir.path())).await;
        let response =
            client().get(format!("http://{}/api/me", proxy.proxy_addr())).send().await.expect("answered");
        assert_eq!(response.status(), 200, "{network}");
    }
}

#[tokio::test]
async fn policy_violations_are_403_and_never_forwarded() {
    let sandbox = start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let narrow = Identity::new("narrow", "ops", Match::Any)
        .with("orgs", vec![ORG_ID])
        .with("methods", vec!["GET"])
        .with("paths", vec!["/api/organizations/{org}/tasks", "/api/me"])
        .with("org_alias", ORG_ID);
    let config = ops_config(&sandbox.base_url()).identity(narrow);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let base = format!("http://{}", proxy.proxy_addr());
    let http = client();

    for (method, path) in [
        (reqwest::Method::GET, format!("/api/organizations/{OTHER_ORG_ID}/tasks")),
        (reqwest::Method::POST, format!("/api/organizations/{ORG_ID}/tasks")),
        (reqwest::Method::GET, format!("/api/organizations/{ORG_ID}/runs")),
        (reqwest::Method::GET, "/api/mentions".to_owned()), // "/api/me" is a segment prefix, not a string prefix
        (reqwest::Method::GET, format!("/api/%6Frganizations/{OTHER_ORG_ID}/tasks")),
    ] {
        let response = http.request(method.clone(), format!("{base}{path}")).send().await.expect("answered");
        assert_eq!(response.status(), 403, "{method} {path}");
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    assert!(sandbox.received().is_empty(), "no refused request reached Tallyfy");

    let response = http
        .get(format!("{base}/api/organizations/current/tasks?per_page=3"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let forwarded = sandbox.received();
    assert_eq!(
        forwarded.last().expect("forwarded").uri,
        format!("/api/organizations/{ORG_ID}/tasks?per_page=3")
    );
}

/// A CA, a server certificate for 127.0.0.1, a client certificate with a
/// SPIFFE URI SAN and one with no SAN and the SPIFFE ID as its CN, all fresh
/// for the test. Returns PEM texts.
struct Pki {
    root: Root,
    client_cert: String,
    client_key: String,
    /// Certificate and key: no SAN, the SPIFFE ID as its CN.
    cn_client: String,
    /// Certificate and key: `payments-app` as its CN, no SAN.
    payments_cn: String,
    /// Certificate and key: `payments-app` as its CN, and only an IP address SAN.
    payments_cn_ip_san: String,
    /// Certificate and key: the SPIFFE URI SAN, valid for three seconds from
    /// when the PKI was made.
    short_lived: String,
}

/// A fresh CA, and a server certificate for 127.0.0.1 it signed (PEM).
struct Root {
    ca: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    server_cert: String,
    server_key: String,
}

fn root() -> Root {
    root_confined_to(None)
}

/// [`root`], its CA confined to DNS names under `dns` when given.
fn root_confined_to(dns: Option<&str>) -> Root {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.name_constraints = dns.map(|dns| rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName(dns.to_owned())],
        excluded_subtrees: Vec::new(),
    });
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    Root { ca: ca.pem(), issuer, server_cert: server.pem(), server_key: server_key.serialize_pem() }
}

/// A proxy on TLS with `root`'s server certificate, verifying client
/// certificates against its CA, with `identities` (credential `ops`); its
/// `/api/me` URL, and the client rustls needs.
async fn mtls_proxy(
    sandbox: &str,
    root: &Root,
    identities: Vec<Identity>,
) -> (tallyfy_proxy::app::Running, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("dir");
    for (file, pem) in
        [("ca.pem", &root.ca), ("server.pem", &root.server_cert), ("server.key", &root.server_key)]
    {
        std::fs::write(dir.path().join(file), pem).expect("write");
    }
    let tls =
        table([("cert", "server.pem".into()), ("key", "server.key".into()), ("client_ca", "ca.pem".into())]);
    let config =
        identities.into_iter().fold(ops_config(sandbox).set("listen", "tls", tls), TestConfig::identity);
    let proxy = start_proxy(&config.parse(dir.path())).await;
    let url = format!("https://127.0.0.1:{}/api/me", proxy.proxy_addr().port());
    let _ = rustls::crypto::ring::default_provider().install_default();
    (proxy, dir, url)
}

/// The status of `GET url` from a client that trusts `root`'s CA and presents
/// `pem` (its certificate, any more certificates, and its key).
async fn status_over_mtls(root: &Root, pem: &str, url: &str) -> reqwest::StatusCode {
    let ca = reqwest::Certificate::from_pem(root.ca.as_bytes()).expect("CA");
    let identity = reqwest::Identity::from_pem(pem.as_bytes()).expect("identity");
    let client = reqwest::Client::builder().tls_certs_only([ca]).identity(identity).build().expect("client");
    client.get(url).send().await.expect("answered over mTLS").status()
}

fn pki() -> Pki {
    let root = root();
    let issuer = &root.issuer;
    let client_key = rcgen::KeyPair::generate().expect("key");
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/billing/sa/app").expect("ia5"),
    )];
    let client = client_params.signed_by(&client_key, issuer).expect("client cert");
    let cn_key = rcgen::KeyPair::generate().expect("key");
    let mut cn_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    cn_params.distinguished_name.push(rcgen::DnType::CommonName, "spiffe://cluster.local/ns/billing/sa/app");
    let cn_client = cn_params.signed_by(&cn_key, issuer).expect("CN-only client cert");
    let payments = |sans: Vec<rcgen::SanType>| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "payments-app");
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, issuer).expect("client cert");
        format!("{}{}", cert.pem(), key.serialize_pem())
    };
    let short_key = rcgen::KeyPair::generate().expect("key");
    let mut short_params = client_params.clone();
    let unix_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    short_params.not_before =
        rcgen::date_time_ymd(1970, 1, 1) + unix_now.saturating_sub(Duration::from_secs(60));
    short_params.not_after = rcgen::date_time_ymd(1970, 1, 1) + unix_now + Duration::from_secs(3);
    let short = short_params.signed_by(&short_key, issuer).expect("short-lived client cert");
    let payments_cn = payments(Vec::new());
    let payments_cn_ip_san = payments(vec![rcgen::SanType::IpAddress("10.9.9.9".parse().expect("ip"))]);
    Pki {
        root,
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
        cn_client: format!("{}{}", cn_client.pem(), cn_key.serialize_pem()),
        payments_cn,
        payments_cn_ip_san,
        short_lived: format!("{}{}", short.pem(), short_key.serialize_pem()),
    }
}

#[tokio::test]
async fn mtls_client_certificates_identify_callers() {
    let sandbox = start_sandbox().await;
    let pki = pki();
    let identities = vec![
        Identity::new("mesh", "ops", Match::ClientCert("spiffe://cluster.local/ns/billing/sa/app")),
        Identity::new("payments", "ops", Match::ClientCert("payments-app")),
    ];
    let (_proxy, _dir, url) = mtls_proxy(&sandbox.base_url(), &pki.root, identities).await;

    let with_cert = format!("{}{}", pki.client_cert, pki.client_key);
    assert_eq!(status_over_mtls(&pki.root, &with_cert, &url).await, 200);
    assert_eq!(
        status_over_mtls(&pki.root, &pki.cn_client, &url).await,
        401,
        "a SPIFFE ID in the CN of a certificate without SANs vouches for nothing"
    );

    // A CN names a certificate only when it has no SAN extension: one whose
    // SANs no rule names (an IP address) is not taken for its CN.
    for (pem, expected) in [(&pki.payments_cn, 200), (&pki.payments_cn_ip_san, 401)] {
        assert_eq!(status_over_mtls(&pki.root, pem, &url).await, expected);
    }

    let ca = reqwest::Certificate::from_pem(pki.root.ca.as_bytes()).expect("CA");
    let without_cert = reqwest::Client::builder().tls_certs_only([ca]).build().expect("client");
    let response = without_cert.get(&url).send().await.expect("answered over TLS");
    assert_eq!(response.status(), 401, "TLS without a client certificate matches no identity");
    assert_eq!(sandbox.received().len(), 2);
}

/// A TLS session is never resumed where client certificates name identities:
/// a resumed session carried the certificate it began with, unchecked, so a
/// certificate that expired since went on naming its identity (and its
/// Tallyfy credential), ticket after ticket.
#[tokio::test]
async fn a_client_certificate_that_expired_cannot_resume_its_session() {
    let began = std::time::Instant::now();
    let pki = pki();
    let sandbox = start_sandbox().await;
    let mesh = Identity::new("mesh", "ops", Match::ClientCert("spiffe://cluster.local/ns/billing/sa/app"));
    let (_proxy, _dir, url) = mtls_proxy(&sandbox.base_url(), &pki.root, vec![mesh]).await;
    let ca = reqwest::Certificate::from_pem(pki.root.ca.as_bytes()).expect("CA");
    let identity = reqwest::Identity::from_pem(pki.short_lived.as_bytes()).expect("identity");
    // A new connection per request, with the client's session cache kept.
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let response = client.get(&url).send().await.expect("answered over mTLS");
    assert_eq!(response.status(), 200, "valid for three seconds");
    assert!(began.elapsed() < Duration::from_secs(3), "the first request came in time");
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(began.elapsed())).await;
    let expired = client.get(&url).send().await;
    assert!(
        expired.as_ref().map_or(true, |response| response.status() != 200),
        "an expired certificate names no identity: {expired:?}"
    );
    assert_eq!(sandbox.received().len(), 1, "only the request made in time reached Tallyfy");
}

/// A sub-CA confined to `billing.internal` (name constraints) cannot issue a
/// certificate naming another identity: neither a CN (which the verifier
/// holds to no constraint) nor a URI SAN (none that limits DNS names; and one
/// with no scheme passed for a DNS name). Both passed as `payments`.
#[tokio::test]
async fn a_confined_sub_ca_names_only_what_its_constraints_allow() {
    let root = root();
    let sub_key = rcgen::KeyPair::generate().expect("key");
    let mut sub_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    sub_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    sub_params.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("billing.internal".to_owned())],
        excluded_subtrees: Vec::new(),
    });
    let sub = sub_params.signed_by(&sub_key, &root.issuer).expect("sub-CA");
    let sub_issuer = rcgen::Issuer::new(sub_params, sub_key);
    // Leaf, key and the sub-CA, as a caller presents them.
    let leaf = |cn: &str, sans: Vec<rcgen::SanType>| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &sub_issuer).expect("leaf");
        format!("{}{}{}", cert.pem(), sub.pem(), key.serialize_pem())
    };
    let ia5 = |text: &str| rcgen::string::Ia5String::try_from(text).expect("ia5");

    let sandbox = start_sandbox().await;
    let identities = vec![
        Identity::new("billing", "ops", Match::ClientCert("billing.internal")),
        Identity::new("payments", "ops", Match::ClientCert("payments.internal")),
    ];
    let (_proxy, _dir, url) = mtls_proxy(&sandbox.base_url(), &root, identities).await;
    let cases = [
        (
            "a DNS name the sub-CA may issue",
            leaf("x", vec![rcgen::SanType::DnsName(ia5("billing.internal"))]),
            200,
        ),
        ("a URI SAN with no scheme", leaf("x", vec![rcgen::SanType::URI(ia5("payments.internal"))]), 401),
        ("a CN alone", leaf("payments.internal", Vec::new()), 401),
    ];
    for (case, pem, expected) in cases {
        assert_eq!(status_over_mtls(&root, &pem, &url).await, expected, "{case}");
    }
    assert_eq!(sandbox.received().len(), 1, "only the certificate the sub-CA may issue reached Tallyfy");
}

/// A client CA that is itself confined (an anchor with name constraints): a
/// CN-only certificate it issued names nothing, however the caller pads the
/// chain (an unrelated certificate after the leaf hid the anchor, and the CN
/// passed as `payments.internal`).
#[tokio::test]
async fn a_confined_client_ca_names_no_cn_whatever_follows_the_leaf() {
    // The server certificate names 127.0.0.1: an IP address, which the DNS
    // constraint does not limit.
    let root = root_confined_to(Some("billing.internal"));
    let sandbox = start_sandbox().await;
    let payments = Identity::new("payments", "ops", Match::ClientCert("payments.internal"));
    let (_proxy, _dir, url) = mtls_proxy(&sandbox.base_url(), &root, vec![payments]).await;
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "payments.internal");
    let leaf = params.signed_by(&key, &root.issuer).expect("CN-only leaf");
    let junk_key = rcgen::KeyPair::generate().expect("key");
    let mut junk_params = rcgen::CertificateParams::new(vec!["junk.example".to_owned()]).expect("params");
    // A name of its own (rcgen gives every certificate the same one by default).
    junk_params.distinguished_name.push(rcgen::DnType::CommonName, "junk.example");
    let junk = junk_params.self_signed(&junk_key).expect("junk");
    for (case, pem) in [
        ("the leaf alone", format!("{}{}", leaf.pem(), key.serialize_pem())),
        ("an unrelated certificate after it", format!("{}{}{}", leaf.pem(), junk.pem(), key.serialize_pem())),
    ] {
        assert_eq!(status_over_mtls(&root, &pem, &url).await, 401, "{case}");
    }
    assert!(sandbox.received().is_empty());
}
