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
fn defaults_fill_what_is_left_out() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.upstream.token_url.to_string(), "https://go.tallyfy.com/api/oauth/token");
    assert_eq!(config.upstream.request_timeout, Duration::from_secs(30));
    assert_eq!(config.server.max_headers, 100);
    assert_eq!(config.log.format, LogFormat::Text);
    let CredentialKind::PersonalToken { token } = &config.credentials[0].kind;
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

#[test]
fn plain_text_secrets_work_with_a_warning_that_hides_them() {
    let source = MINIMAL.replace("{ env = \"TALLYFY_TOKEN\" }", "\"inline-secret\"");
    let config = parse(&source).expect("valid");
    assert_eq!(config.warnings.len(), 1);
    assert!(!config.warnings[0].contains("inline-secret"));
    assert!(!format!("{config:?}").contains("inline-secret"), "Debug of the config hides secrets");
}

#[test]
fn secret_files_are_read_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("token"), "file-token\n").expect("write");
    let source = MINIMAL.replace("{ env = \"TALLYFY_TOKEN\" }", "{ file = \"token\" }");
    let config = Config::parse(&source, &dir.path().join("proxy.toml"), &env).expect("valid");
    let CredentialKind::PersonalToken { token } = &config.credentials[0].kind;
    assert_eq!(token.expose(), "file-token");
}

#[test]
fn a_config_without_identities_is_refused() {
    let source = MINIMAL.split("[[identities]]").next().expect("has identities").to_owned();
    assert_eq!(error_of(&source).key, "identities");
}
