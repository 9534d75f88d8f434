//! Config loading: the committed example, and one clear line per mistake.

use std::path::Path;

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "TALLYFY_TOKEN" => Some("tok-from-env\n".to_owned()),
        _ => None,
    }
}

const MINIMAL: &str = r#"
[listen]
proxy = "127.0.0.1:8080"
admin = "127.0.0.1:9901"

[upstream]
base_url = "https://go.tallyfy.com"

[[credentials]]
name = "ops"
kind = "personal_token"
token = { env = "TALLYFY_TOKEN" }

[[identities]]
name = "app"
credential = "ops"
match = { any = true }
"#;

fn parse(source: &str) -> Result<Config, ConfigError> {
    Config::parse(source, Path::new("proxy.toml"), &env)
}

#[test]
fn the_committed_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let source = std::fs::read_to_string(&path).expect("proxy.toml is committed");
    let config = Config::parse(&source, &path, &env).expect("the example validates");
    assert_eq!(config.upstream.authority.as_str(), "go.tallyfy.com");
    assert_eq!(config.upstream.client_header, "APIClient");
    assert_eq!(config.credentials[0].kind.name(), "personal_token");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn the_upstream_host_is_read_as_tallyfy_writes_it_in_links() {
    for (base_url, authority) in [
        ("https://Go.Tallyfy.COM:443", "go.tallyfy.com"),
        ("http://LocalHost:80", "localhost"),
        ("http://LocalHost:8080", "localhost:8080"),
        ("https://[::1]:443", "[::1]"),
        ("https://go.tallyfy.com:8443", "go.tallyfy.com:8443"),
    ] {
        let source = MINIMAL.replace("https://go.tallyfy.com", base_url);
        let config = parse(&source).expect("valid");
        assert_eq!(config.upstream.authority.as_str(), authority, "{base_url}");
        let scheme = base_url.split("://").next().expect("a scheme");
        let token_url = format!("{scheme}://{authority}/api/oauth/token");
        assert_eq!(config.upstream.token_url.to_string(), token_url, "the fleet names token sets by it too");
        assert_eq!(config.upstream.base_url, base_url, "messages show it as written");
    }
}

#[test]
fn identity_rules_that_could_never_match_are_refused() {
    let key = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let rule = |name: &str, matcher: &str| {
        format!("\n[[identities]]\nname = \"{name}\"\ncredential = \"ops\"\nmatch = {matcher}\n")
    };
    let keyed = |hex: &str| format!("{{ api_key_sha256 = \"{hex}\" }}");
    let basic =
        |password: &str| format!("{{ basic = {{ user = \"u\", password_sha256 = \"{password}\" }} }}");
    let without_app = MINIMAL.split("\n[[identities]]").next().expect("head").to_owned();
    for (rules, refused) in [
        (rule("a", &keyed(key)) + &rule("b", &keyed(&key.to_ascii_uppercase())), "identities[1].match"),
        (rule("a", &basic(key)) + &rule("b", &basic(key)), "identities[1].match"),
        (rule("a", "{ any = true }") + &rule("b", &keyed(key)), "identities[1].match"),
    ] {
        let error = parse(&(without_app.clone() + &rules)).expect_err("refused").to_string();
        assert!(error.contains(refused) && error.contains("can never match"), "{error}");
    }
    let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    for rules in [rule("a", &keyed(empty)), rule("a", &basic(&empty.to_ascii_uppercase()))] {
        let error = parse(&(without_app.clone() + &rules)).expect_err("refused").to_string();
        assert!(error.contains("digest of an empty value"), "{error}");
    }
    let other_password = key.replace('9', "8");
    for rules in [
        rule("a", &keyed(key)) + &rule("b", "{ any = true }"),
        rule("a", &basic(key)) + &rule("b", &basic(&other_password)),
    ] {
        parse(&(without_app.clone() + &rules)).expect("every rule can match");
    }
}

#[test]
fn ipv4_mapped_source_networks_are_read_as_ipv4() {
    let source = MINIMAL.replace(
        "match = { any = true }",
        r#"match = { source = ["::ffff:127.0.0.1/128", "::ffff:10.0.0.0/104", "fd00::/8", "::/0"] }"#,
    );
    let config = parse(&source).expect("valid");
    let crate::identity::Matcher::Source { networks } = &config.identities[0].matcher else {
        panic!("a source rule")
    };
    let shown: Vec<String> = networks.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8", "::/0"]);
}

#[test]
fn defaults_fill_what_is_left_out() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.upstream.token_url.to_string(), "https://go.tallyfy.com/api/oauth/token");
    assert_eq!(config.upstream.request_timeout, Duration::from_secs(30));
    assert_eq!(config.server.max_headers, 100);
    assert_eq!(config.log.format, LogFormat::Text);
    let CredentialKind::PersonalToken { token } = &config.credentials[0].kind else {
        panic!("a personal token")
    };
    assert_eq!(token.expose(), "tok-from-env", "a trailing newline is trimmed");
}

fn error_of(source: &str) -> ConfigError {
    parse(source).expect_err("the config must be refused")
}

#[test]
fn unknown_keys_are_refused_with_their_line() {
    let source = MINIMAL.replace("base_url =", "bas_url = \"x\"\nbase_url =");
    let error = error_of(&source);
    assert_eq!(error.line, Some(7), "{error}");
    assert!(error.to_string().contains("upstream"), "{error}");
    assert!(error.message.contains("bas_url"), "{error}");
}

#[test]
fn bad_values_name_key_and_line() {
    let cases = [
        (MINIMAL.replace("https://go.tallyfy.com", "ftp://x"), "upstream.base_url", 7),
        (MINIMAL.replace("\"127.0.0.1:8080\"", "\"localhost\""), "listen.proxy", 3),
        (MINIMAL.replace("credential = \"ops\"", "credential = \"nope\""), "identities[0].credential", 16),
        (MINIMAL.replace("\"personal_token\"", "\"magic\""), "credentials[0].kind", 11),
        (MINIMAL.replace("TALLYFY_TOKEN", "UNSET_VAR"), "credentials[0].token", 12),
    ];
    for (source, key, line) in cases {
        let error = error_of(&source);
        assert_eq!(error.key, key, "{error}");
        assert_eq!(error.line, Some(line), "{error}");
        assert!(!error.to_string().contains('\n'), "one line: {error}");
    }
}

/// Values a file may hold by mistake that used to pass or to print what they
/// should not: a password in a URL that does not parse, an empty inline
/// secret, a level typo that turned every log line off, a bound no runtime
/// can take.
#[test]
fn mistakes_are_refused_without_printing_a_secret() {
    let cases = [
        (MINIMAL.replace("https://go.tallyfy.com", "https://app:S3CRET^@go.tallyfy.com"), "S3CRET"),
        (MINIMAL.replace("https://go.tallyfy.com", "https://app:S3CRET@go.tallyfy.com"), "S3CRET"),
        (MINIMAL.replace("https://go.tallyfy.com", "https:/app:S3CRET@go.tallyfy.com"), "S3CRET"),
        // A `/` in the password: the authority alone ends before the `@`.
        (MINIMAL.replace("https://go.tallyfy.com", "https://u:S3CRET/w0rd@go.tallyfy.com"), "S3CRET"),
        (MINIMAL.replace("{ env = \"TALLYFY_TOKEN\" }", "\"\""), "inline value is empty"),
    ];
    for (source, hidden_or_said) in cases {
        let error = error_of(&source).to_string();
        if hidden_or_said == "S3CRET" {
            assert!(!error.contains("S3CRET") && !error.contains("w0rd"), "{error}");
        } else {
            assert!(error.contains(hidden_or_said), "{error}");
        }
    }
    for (key, value) in [
        ("max_connections", "4611686018427387904"),
        ("max_headers", "1000000"),
        ("max_header_bytes", "2000000"),
    ] {
        let error = error_of(&format!("{MINIMAL}\n[server]\n{key} = {value}\n"));
        assert_eq!(error.key, format!("server.{key}"), "{error}");
        assert!(error.message.starts_with("must be at most"), "{error}");
    }
    let typo =
        MINIMAL.replace("match = { any = true }", "match = { any = true }\nmethods = [\"GET\", \"PSOT\"]");
    let error = error_of(&typo).to_string();
    assert!(error.contains("\"PSOT\" is not one of"), "{error}");
    let guard_off = error_of(&format!("{MINIMAL}\n[tokens]\nmin_forced_refresh_interval_ms = 0\n"));
    assert_eq!(guard_off.key, "tokens.min_forced_refresh_interval_ms", "{guard_off}");
    let order =
        MINIMAL.replace("match = { any = true }", "match = { any = true }\ndate_input_order = \"dmy\"");
    let order = error_of(&format!("{order}\n[dates]\nenabled = false\n"));
    assert!(order.message.contains("\"dmy\""), "checked with rewriting off: {order}");
    let level = error_of(&format!("{MINIMAL}\n[log]\nlevel = \"inof\"\n")).to_string();
    assert!(level.contains("log.level") && level.contains("\"inof\" is not a level"), "{level}");
    for typo in ["warning", "Inof", "debugging", "eror"] {
        let error = error_of(&format!("{MINIMAL}\n[log]\nlevel = \"info,{typo}\"\n"));
        assert_eq!(error.key, "log.level", "{typo}: {error}");
    }
    for fine in [
        "warn",
        "info,hyper=warn",
        "tallyfy_proxy=debug",
        "OFF",
        "tallyfy_proxy",
        "warn,tallyfy_proxy::access",
        "hyper",
    ] {
        parse(&format!("{MINIMAL}\n[log]\nlevel = \"{fine}\"\n")).unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
}

#[test]
fn plain_text_secrets_work_with_a_warning_that_hides_them() {
    let source = MINIMAL.replace("{ env = \"TALLYFY_TOKEN\" }", "\"inline-secret\"");
    let config = parse(&source).expect("valid");
    assert_eq!(config.warnings.len(), 1);
    assert!(!config.warnings[0].contains("inline-secret"));
    assert!(!format!("{config:?}").contains("inline-secret"), "Debug of the config hides secrets");
}

#[test]
fn a_secret_written_unquoted_is_refused_without_its_value() {
    // Past 64 bits too: TOML hands those to 128-bit visitors.
    for value in [
        "48151623",
        "-48151623",
        "18446744073709551615",
        "4815.1623",
        "true",
        "48151623481516234815162",
        "-48151623481516234815162",
        "+48151623481516234815162",
        "4815_1623_4815_1623_4815_1623",
    ] {
        let source = MINIMAL.replace("{ env = \"TALLYFY_TOKEN\" }", value);
        let error = error_of(&source);
        assert!(error.key.ends_with(".token"), "{error}");
        assert!(error.message.contains("quoted string"), "{error}");
        let shown = error.to_string();
        for piece in ["4815", "1623", "18446744073709551615", "true"] {
            assert!(!shown.contains(piece), "{value} shown: {shown}");
        }
    }
}

#[test]
fn secret_files_are_read_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("token"), "file-token\n").expect("write");
    let source = MINIMAL.replace("{ env = \"TALLYFY_TOKEN\" }", "{ file = \"token\" }");
    let config = Config::parse(&source, &dir.path().join("proxy.toml"), &env).expect("valid");
    let CredentialKind::PersonalToken { token } = &config.credentials[0].kind else {
        panic!("a personal token")
    };
    assert_eq!(token.expose(), "file-token");
}

#[test]
fn a_config_without_identities_is_refused() {
    let source = MINIMAL.split("[[identities]]").next().expect("has identities").to_owned();
    assert_eq!(error_of(&source).key, "identities");
}

const FULL: &str = r#"
[listen]
proxy = "127.0.0.1:8080"
admin = "127.0.0.1:9901"

[upstream]
base_url = "https://go.tallyfy.com"

[tokens]
dead_token_statuses = [401, 419]

[[credentials]]
name = "app"
kind = "client_credentials"
client_id = "1001"
client_secret = { env = "TALLYFY_TOKEN" }
scope = "*"

[[credentials]]
name = "user"
kind = "password"
client_id = "1002"
client_secret = { env = "TALLYFY_TOKEN" }
username = "ops@example.com"
password = { env = "TALLYFY_TOKEN" }

[[credentials]]
name = "minted"
kind = "application_user"
application = "app"
org = "3F2C8D0E9A1B4C5D6E7F8091A2B3C4D5"
email = "jane@example.com"
provision = { first_name = "Jane", last_name = "Doe", role = "light" }

[[identities]]
name = "billing"
credential = "minted"
match = { api_key_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" }
orgs = ["3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5"]
methods = ["get", "POST"]
paths = ["/api/organizations/{org}/tasks"]
org_alias = "3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5"

[[identities]]
name = "reports"
credential = "user"
match = { basic = { user = "reports", password_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" } }

[[identities]]
name = "office"
credential = "app"
match = { source = ["10.0.0.0/8", "127.0.0.1"] }
"#;

#[test]
fn every_credential_kind_and_matcher_validates() {
    let config = parse(FULL).expect("valid");
    let kinds: Vec<_> = config.credentials.iter().map(|c| c.kind.name()).collect();
    assert_eq!(kinds, ["client_credentials", "password", "application_user"]);
    let CredentialKind::ApplicationUser { application, org, .. } = &config.credentials[2].kind else {
        panic!("application_user")
    };
    assert_eq!((application.index(), org.as_str()), (0, "3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5"));
    assert_eq!(config.identities[0].policy.methods.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        config.tokens.dead_token_statuses,
        [http::StatusCode::UNAUTHORIZED, http::StatusCode::from_u16(419).expect("419")]
    );
    assert!(!format!("{config:?}").contains("tok-from-env"), "no secret in Debug");
}

#[test]
fn credential_and_identity_mistakes_name_the_key() {
    let cases = [
        (FULL.replace("scope = \"*\"", "scope = \"*\"\nusername = \"x\""), "credentials[0].username"),
        (FULL.replace("application = \"app\"", "application = \"user\""), "credentials[2].application"),
        (FULL.replace("3F2C8D0E9A1B4C5D6E7F8091A2B3C4D5", "acme"), "credentials[2].org"),
        (FULL.replace("match = { source", "match = { any = true, source"), "identities[2].match"),
        (FULL.replace("\"10.0.0.0/8\"", "\"10.0.0.0/99\""), "identities[2].match.source"),
        (
            FULL.replace(
                "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\" }\norgs",
                "abc\" }\norgs",
            ),
            "identities[0].match.api_key_sha256",
        ),
        (FULL.replace("methods = [\"get\"", "methods = [\"g e t\""), "identities[0].methods"),
        (FULL.replace("paths = [\"/api", "paths = [\"/v2"), "identities[0].paths"),
        (FULL.replace("[401, 419]", "[200]"), "tokens.dead_token_statuses"),
        (FULL.replace("[401, 419]", "[401, 500]"), "tokens.dead_token_statuses"),
    ];
    for (source, key) in cases {
        let error = error_of(&source);
        assert_eq!(error.key, key, "{error}");
        assert!(error.line.is_some(), "{error}");
    }
}

#[test]
fn a_misspelt_key_is_named_as_the_user_wrote_it() {
    let source = MINIMAL.replace("match = { any = true }", "match = { any = true }\nrate_limt = 5");
    let error = parse(&source).expect_err("unknown key");
    assert_eq!(error.key, r#"[[identities]] "app".rate_limt"#, "{error}");
    assert_eq!(error.line, Some(18), "the line of the key: {error}");
    let source = MINIMAL.replace("kind = \"personal_token\"", "kind = \"personal_token\"\nscop = \"x\"");
    assert_eq!(parse(&source).expect_err("unknown key").key, r#"[[credentials]] "ops".scop"#);
    let source = MINIMAL.replace("[upstream]", "[upstream]\nretry = { atempts = 2 }");
    assert_eq!(parse(&source).expect_err("unknown key").key, "upstream.retry.atempts");
}

#[test]
fn traffic_limits_are_read_and_checked() {
    let source = format!(
        "{}rate_limit = {{ per_second = 20, burst = 40 }}\nmax_in_flight = 16\n\n\
         [[limits]]\nname = \"guest-invites\"\nmethods = [\"post\"]\npath = \"/api/organizations/{{org}}/guests\"\nmax = 30\nper_seconds = 3600\n",
        MINIMAL.replace(
            "[upstream]",
            "[upstream]\nretry_429_max_wait_ms = 2000\nretry = { attempts = 3, budget_percent = 10 }"
        )
    );
    let config = parse(&source).expect("valid");
    let limits = config.identities[0].limits;
    assert_eq!(limits.rate, Some(crate::traffic::Rate { per_second: 20, burst: 40 }));
    assert_eq!(limits.max_in_flight, Some(16));
    let rule = &config.traffic.rules[0];
    assert_eq!((rule.name.as_str(), rule.max, rule.per), ("guest-invites", 30, Duration::from_secs(3600)));
    assert_eq!(rule.methods, Some(vec![http::Method::POST]));
    assert_eq!(rule.path.to_string(), "/api/organizations/{org}/guests");
    assert_eq!((config.traffic.retry.attempts, config.traffic.retry.budget_percent), (3, 10));
    assert_eq!(config.traffic.retry_429_max_wait, Duration::from_secs(2));

    let defaults = parse(MINIMAL).expect("valid");
    assert_eq!(defaults.traffic.retry.attempts, 1, "no retry unless asked");
    assert!(defaults.traffic.rules.is_empty() && defaults.traffic.retry_429_max_wait.is_zero());
    assert!(!defaults.listen.unprefixed);

    for (bad, key) in [
        (source.replace("per_second = 20", "per_second = 0"), "identities[0].rate_limit"),
        (source.replace("max_in_flight = 16", "max_in_flight = 0"), "identities[0].max_in_flight"),
        (source.replace("max = 30", "max = 0"), "limits[0].max"),
        (source.replace("per_seconds = 3600", "per_seconds = 0"), "limits[0].per_seconds"),
        (source.replace("\"/api/organizations/{org}/guests\"", "\"/guests\""), "limits[0].path"),
        (source.replace("attempts = 3", "attempts = 9"), "upstream.retry.attempts"),
        (source.replace("budget_percent = 10", "budget_percent = 101"), "upstream.retry.budget_percent"),
        (
            source.replace("retry_429_max_wait_ms = 2000", "retry_429_max_wait_ms = 600000"),
            "upstream.retry_429_max_wait_ms",
        ),
    ] {
        assert_eq!(parse(&bad).expect_err(key).key, key);
    }
}

const KEY_B64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

fn with_fleet(table: &str) -> String {
    format!("{MINIMAL}\n[fleet]\n{table}\n")
}

#[test]
fn the_fleet_is_read_and_its_lease_must_outlive_three_token_calls() {
    let config = parse(&with_fleet(&format!(
        "redis_url = \"redis://:s3cret@127.0.0.1:6379/0\"\nkey_prefix = \"tallyfy-proxy/prod\"\nencryption_key = \"{KEY_B64}\""
    )))
    .expect("valid");
    let fleet = config.fleet.as_ref().expect("[fleet]");
    assert_eq!(fleet.key_prefix, "tallyfy-proxy/prod");
    assert_eq!(fleet.lease, Duration::from_millis(40_000), "the default");
    assert!(config.warnings.iter().any(|w| w.contains("fleet.redis_url")), "inline secrets warn");
    assert!(!format!("{config:?}").contains("s3cret"), "the URL's password never prints");
    assert!(parse(MINIMAL).expect("valid").fleet.is_none(), "no [fleet]: alone, as before");

    let short = error_of(&with_fleet(&format!(
        "redis_url = \"redis://127.0.0.1\"\nkey_prefix = \"p\"\nencryption_key = \"{KEY_B64}\"\nlease_ms = 30000"
    )));
    assert_eq!(short.key, "fleet.lease_ms");
    assert!(short.message.contains("3 × tokens.fetch_timeout_ms (30000 ms)"), "{short}");
}

#[test]
fn fleet_mistakes_name_the_key_and_never_quote_a_secret() {
    let url = error_of(&with_fleet(&format!(
        "redis_url = \"http://user:s3cret@example\"\nkey_prefix = \"p\"\nencryption_key = \"{KEY_B64}\""
    )));
    assert_eq!(url.key, "fleet.redis_url");
    assert!(!url.to_string().contains("s3cret"), "{url}");
    let key = error_of(&with_fleet(
        "redis_url = \"redis://127.0.0.1\"\nkey_prefix = \"p\"\nencryption_key = \"c2hvcnQ=\"",
    ));
    assert_eq!(key.key, "fleet.encryption_key");
    assert!(key.message.contains("32 bytes"), "{key}");
    let missing = error_of(&with_fleet("redis_url = \"redis://127.0.0.1\"\nkey_prefix = \"p\""));
    assert_eq!(missing.key, "fleet.encryption_key");
    let typo = error_of(&with_fleet("redis_uri = \"redis://127.0.0.1\""));
    assert!(typo.key.contains("redis_uri"), "{typo}");
}

/// A `rediss://` URL whose `#insecure` turns off the certificate check is said
/// so: it was shown as plain "TLS" and passed without a word.
#[test]
fn redis_tls_without_a_certificate_check_warns() {
    assert!(super::fleet::unverified_tls("rediss://:pw@redis:6379/0#insecure"));
    for checked in ["rediss://:pw@redis:6379/0", "redis://redis#insecure", "rediss://redis/0#insecurex"] {
        assert!(!super::fleet::unverified_tls(checked), "{checked}");
    }
    let source = with_fleet(&format!(
        "redis_url = \"rediss://:pw@redis:6379/0#insecure\"\nkey_prefix = \"p\"\nencryption_key = \"{KEY_B64}\""
    ));
    let config = parse(&source).expect("valid: an in-cluster Redis has no public certificate");
    assert!(
        config.warnings.iter().any(|w| w.contains("'#insecure' turns off the check")),
        "{:?}",
        config.warnings
    );
    assert!(!config.warnings.iter().any(|w| w.contains("pw@")), "the password never shows");
}

/// What `check` passed and `run` could not use, or used wrongly: a URL no
/// connection can go to, a base path that ends in `/api` spelt another way, an
/// HTTPS upstream whose secrets would go to a plain-HTTP token endpoint, two
/// listeners on one socket, an identity named as the unmatched are.
#[test]
fn what_run_cannot_use_fails_check() {
    for url in [
        "http://127.0.0.1:65536",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://:48760",
        "http://127.0.0.1:",
        "http://127.0.0.1:+80",
        "http://[]:80",
    ] {
        let error = error_of(&MINIMAL.replace("https://go.tallyfy.com", url));
        assert_eq!(error.key, "upstream.base_url", "{url}: {error}");
        assert!(error.message.contains("name a host"), "{url}: {error}");
        let token = MINIMAL.replace("[upstream]", &format!("[upstream]\ntoken_url = \"{url}\""));
        assert_eq!(error_of(&token.replace("https://go", "http://go")).key, "upstream.token_url", "{url}");
    }
    for fine in ["http://127.0.0.1:65535", "http://[::1]:8080", "http://[::1]", "https://go.tallyfy.com:443"]
    {
        parse(&MINIMAL.replace("https://go.tallyfy.com", fine)).unwrap_or_else(|e| panic!("{fine}: {e}"));
    }

    for path in ["/API", "/ap%69", "/Api/", "/api/.", "/x/../api", "/x/%2e%2e/api", "/gateway/api"] {
        let error = error_of(&MINIMAL.replace("go.tallyfy.com", &format!("go.tallyfy.com{path}")));
        assert_eq!(error.key, "upstream.base_url", "{path}: {error}");
    }
    let prefixed = parse(&MINIMAL.replace("go.tallyfy.com", "egress.internal/tallyfy/")).expect("a prefix");
    assert_eq!(prefixed.upstream.path_prefix, "/tallyfy");

    let plain =
        MINIMAL.replace("[upstream]", "[upstream]\ntoken_url = \"http://go.tallyfy.com/api/oauth/token\"");
    let error = error_of(&plain);
    assert_eq!(
        (error.key.as_str(), error.message.as_str()),
        ("upstream.token_url", "must be https:// when base_url is")
    );
    parse(&plain.replace("https://go", "http://go")).expect("plain HTTP both ways, for local testing");

    for (proxy, admin) in [
        ("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "[::]:8080"),
    ] {
        let source = MINIMAL.replace("127.0.0.1:8080", proxy).replace("127.0.0.1:9901", admin);
        assert_eq!(error_of(&source).key, "listen.admin", "{proxy} {admin}");
    }
    for (proxy, admin) in
        [("0.0.0.0:8080", "[::1]:8080"), ("127.0.0.1:8080", "127.0.0.2:8080"), ("127.0.0.1:0", "127.0.0.1:0")]
    {
        let source = MINIMAL.replace("127.0.0.1:8080", proxy).replace("127.0.0.1:9901", admin);
        parse(&source).unwrap_or_else(|e| panic!("{proxy} {admin}: {e}"));
    }

    for public_url in ["http://gw.example/#x", "http://gw.example#x", "http://gw.example#"] {
        let source = MINIMAL.replace(
            "admin = \"127.0.0.1:9901\"",
            &format!("admin = \"127.0.0.1:9901\"\npublic_url = \"{public_url}\""),
        );
        let error = error_of(&source);
        assert_eq!(error.key, "listen.public_url", "{public_url}: {error}");
        assert!(error.message.contains("fragment"), "{public_url}: {error}");
    }
    assert_eq!(error_of(&MINIMAL.replace("go.tallyfy.com", "go.tallyfy.com/#api")).key, "upstream.base_url");

    let dash = error_of(&MINIMAL.replace("name = \"app\"", "name = \"-\""));
    assert_eq!(dash.key, "identities[0].name", "{dash}");
}
