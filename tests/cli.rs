//! The command line: `check` on good and bad configs, `--help`, `--version`.

use std::path::Path;
use std::process::{Command, Output};

fn proxy(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"))
        .args(args)
        .current_dir(dir)
        .env("TALLYFY_TOKEN", "secret-token-value")
        .env_remove("TALLYFY_PROXY_CONFIG")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_the_committed_example_and_never_prints_the_secret() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let dir = tempfile::tempdir().expect("dir");
    let output = proxy(&["check", "--config", example.to_str().expect("utf-8 path")], dir.path());
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("credential    ops (personal_token; token from env TALLYFY_TOKEN)"), "{stdout}");
    assert!(stdout.contains("https://go.tallyfy.com"), "{stdout}");
    assert!(!stdout.contains("secret-token-value") && !text(&output.stderr).contains("secret-token-value"));
}

#[test]
fn check_reads_proxy_toml_in_the_working_directory_by_default() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml"), dir.path().join("proxy.toml"))
        .expect("copy");
    assert!(proxy(&["check"], dir.path()).status.success());
}

#[test]
fn check_names_file_line_and_key_and_exits_64() {
    let dir = tempfile::tempdir().expect("dir");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).expect("example");
    let broken = example.replace("connect_timeout_ms = 2000", "connect_timeout_ms = 2000\nretries = 3");
    std::fs::write(dir.path().join("broken.toml"), &broken).expect("write");
    let line = broken.lines().position(|l| l.starts_with("retries")).expect("inserted") + 1;

    let output = proxy(&["check", "--config", "broken.toml"], dir.path());
    assert_eq!(output.status.code(), Some(64));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(&format!("broken.toml:{line}: upstream.retries: unknown field `retries`")),
        "{stderr}"
    );
}

#[test]
fn check_reports_an_unset_secret() {
    let dir = tempfile::tempdir().expect("dir");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).expect("example");
    std::fs::write(dir.path().join("p.toml"), example.replace("TALLYFY_TOKEN", "NOT_SET_ANYWHERE"))
        .expect("write");
    let output = proxy(&["check", "--config", "p.toml"], dir.path());
    assert_eq!(output.status.code(), Some(64));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("credentials[0].token: environment variable NOT_SET_ANYWHERE is not set"),
        "{stderr}"
    );
}

#[test]
fn run_with_a_missing_config_exits_64() {
    let dir = tempfile::tempdir().expect("dir");
    let output = proxy(&["run", "--config", "absent.toml"], dir.path());
    assert_eq!(output.status.code(), Some(64));
    assert!(text(&output.stderr).contains("absent.toml: cannot read"));
}

#[test]
fn help_explains_every_command_and_version_prints() {
    let dir = tempfile::tempdir().expect("dir");
    let help = text(&proxy(&["--help"], dir.path()).stdout);
    for word in ["run", "check", "sandbox", "--config"] {
        assert!(help.contains(word), "{word} in {help}");
    }
    let sandbox_help = text(&proxy(&["sandbox", "--help"], dir.path()).stdout);
    assert!(sandbox_help.contains("--listen") && sandbox_help.contains("--admin"), "{sandbox_help}");
    let version = text(&proxy(&["--version"], dir.path()).stdout);
    assert!(version.starts_with(&format!("tallyfy-proxy {}", env!("CARGO_PKG_VERSION"))), "{version}");
}
