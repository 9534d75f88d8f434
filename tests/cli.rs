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

fn hash_key(input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.stdin.take().expect("stdin").write_all(input).expect("write key");
    child.wait_with_output().expect("exits")
}

#[test]
fn hash_key_prints_the_sha256_of_stdin_ignoring_one_newline() {
    // sha256("foo")
    let expected = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n";
    for input in [&b"foo"[..], b"foo\n", b"foo\r\n"] {
        let output = hash_key(input);
        assert!(output.status.success());
        assert_eq!(text(&output.stdout), expected);
    }
    let empty = hash_key(b"");
    assert_eq!(empty.status.code(), Some(64));
    assert!(text(&empty.stderr).contains("standard input is empty"));
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
    for word in ["run", "check", "sandbox", "hash-key", "--config"] {
        assert!(help.contains(word), "{word} in {help}");
    }
    let sandbox_help = text(&proxy(&["sandbox", "--help"], dir.path()).stdout);
    assert!(sandbox_help.contains("--listen") && sandbox_help.contains("--admin"), "{sandbox_help}");
    let version = text(&proxy(&["--version"], dir.path()).stdout);
    assert!(version.starts_with(&format!("tallyfy-proxy {}", env!("CARGO_PKG_VERSION"))), "{version}");
}

#[test]
fn sigterm_stops_a_running_proxy_with_exit_0() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("dir");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).expect("example");
    let config = example.replace("127.0.0.1:8080", "127.0.0.1:0").replace("127.0.0.1:9901", "127.0.0.1:0");
    std::fs::write(dir.path().join("proxy.toml"), config).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"))
        .args(["run", "--config", "proxy.toml"])
        .current_dir(dir.path())
        .env("TALLYFY_TOKEN", "t")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let listening = lines.by_ref().map_while(Result::ok).any(|line| line.contains("listening"));
    assert!(listening, "the proxy logged that it listens");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    assert_eq!(child.wait().expect("exits").code(), Some(0));
}

/// A `ca_file` in PEM armour whose certificate the TLS client cannot read
/// passed `check` and made `run` exit 1 at start; both now refuse it as a
/// config mistake (64), naming the key.
#[test]
fn a_ca_file_the_tls_client_cannot_use_fails_check_and_run_with_64() {
    let dir = tempfile::tempdir().expect("dir");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).expect("example");
    let garbage = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0x5au8; 300]);
    let pem = format!("-----BEGIN CERTIFICATE-----\n{garbage}\n-----END CERTIFICATE-----\n");
    std::fs::write(dir.path().join("badca.pem"), pem).expect("write");
    let config = example.replacen("[upstream]", "[upstream]\nca_file = \"badca.pem\"", 1);
    std::fs::write(dir.path().join("p.toml"), config).expect("write");
    for command in ["check", "run"] {
        let output = proxy(&[command, "--config", "p.toml"], dir.path());
        assert_eq!(output.status.code(), Some(64), "{command}: {}", text(&output.stderr));
        let stderr = text(&output.stderr);
        assert!(stderr.contains("upstream.ca_file: certificate 1 in"), "{command}: {stderr}");
    }
}
