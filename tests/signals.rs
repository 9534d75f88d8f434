//! The binary under signals: SIGTERM during load drains every in-flight request
//! and exits 0; SIGHUP reloads the config.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Credential, Identity, Match, Secret, TestConfig};
use tokio::net::TcpStream;

/// Starts `tallyfy-proxy run` on a config against `upstream`, logging JSON, and
/// returns it with its proxy address and a channel of its log lines.
fn run_binary(
    dir: &Path,
    upstream: &str,
) -> (Child, std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    TestConfig::new(upstream)
        .set("server", "shutdown_grace_ms", 10000)
        .set("log", "format", "json")
        .credential(Credential::personal("ops", Secret::Env("TALLYFY_TOKEN")))
        .identity(Identity::new("app", "ops", Match::Any))
        .write(&dir.join("proxy.toml"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"))
        .args(["run", "--config", "proxy.toml"])
        .current_dir(dir)
        .env("TALLYFY_TOKEN", "a-token")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        // Keep draining after the test stops listening, so the proxy never
        // writes into a closed pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("the proxy logs its listeners");
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if json["message"] == "listening" {
            let url = json["proxy"].as_str().expect("proxy address");
            break url.trim_start_matches("http://").parse().expect("address");
        }
    };
    (child, addr, lines)
}

use std::path::Path;

fn signal(child: &Child, name: &str) {
    let status =
        Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_under_load_finishes_every_request_and_exits_0() {
    let (upstream, mut arrived) = support::slow_upstream(Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, addr, _lines) = run_binary(dir.path(), &format!("http://{upstream}"));

    const IN_FLIGHT: usize = 20;
    let http = support::client();
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get(format!("http://{addr}/api/slow")).send().await })
        })
        .collect();
    for _ in 0..IN_FLIGHT {
        arrived.recv().await.expect("each request reached the upstream");
    }
    signal(&child, "TERM");
    // The listener closes at once, while the requests are still in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "new connections are refused during the drain");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for request in requests {
        let response = request.await.expect("task").expect("no in-flight request was cut");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.expect("body"), "{\"ok\":true}");
    }
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_config() {
    let sandbox = support::start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, _addr, lines) = run_binary(dir.path(), &sandbox.base_url());
    signal(&child, "HUP");
    let reloaded = tokio::task::spawn_blocking(move || {
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
            if line.contains("config reloaded") {
                return true;
            }
        }
        false
    })
    .await
    .expect("join");
    signal(&child, "TERM");
    let _ = child.wait();
    assert!(reloaded, "a SIGHUP reload was logged");
}

/// The running proxy may leave no core dump: one would hold its tokens and
/// secrets in clear. (It is also not dumpable, which ptrace and a same-user
/// reader of its memory respect; that shows only to a process that is not root.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_running_proxy_leaves_no_core_dump() {
    let sandbox = support::start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, _addr, _lines) = run_binary(dir.path(), &sandbox.base_url());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    signal(&child, "TERM");
    let _ = child.wait();
    let core = limits.lines().find(|line| line.starts_with("Max core file size")).expect("a core limit");
    let values: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "soft and hard limits: {core}");
}

/// Access lines of this run seen on standard output so far.
fn access_lines(lines: &std::sync::mpsc::Receiver<String>, wait: Duration) -> usize {
    let mut seen = 0;
    while let Ok(line) = lines.recv_timeout(wait) {
        if line.contains("\"target\":\"tallyfy_proxy::access\"") {
            seen += 1;
        }
    }
    seen
}

#[tokio::test]
async fn access_lines_reach_stdout_on_a_quiet_proxy_and_none_is_lost_at_sigterm() {
    let sandbox = support::start_sandbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, addr, lines) = run_binary(dir.path(), &sandbox.base_url());
    let client = support::client();
    for _ in 0..3 {
        client.get(format!("http://{addr}/api/me")).send().await.expect("answered");
    }
    // Batched, but a quiet proxy writes its lines within 50 ms on its own.
    let quiet = tokio::task::spawn_blocking(move || (access_lines(&lines, Duration::from_secs(2)), lines))
        .await
        .expect("join");
    let (seen, lines) = quiet;
    assert_eq!(seen, 3, "each request's line, with no more traffic to push it out");
    for _ in 0..2 {
        client.get(format!("http://{addr}/api/me")).send().await.expect("answered");
    }
    // At once: the last lines may still be waiting for their timer.
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("exits");
    assert_eq!(status.code(), Some(0));
    let last = tokio::task::spawn_blocking(move || access_lines(&lines, Duration::from_secs(2)))
        .await
        .expect("join");
    assert_eq!(last, 2, "the lines written just before SIGTERM are on stdout");
}
