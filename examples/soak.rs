//! The soak: the release proxy, as its own process, in front of the sandbox
//! Tallyfy for a minute of mixed traffic at a bounded rate, on loopback only:
//! GETs through an OAuth credential whose tokens live 3 s, POSTs with dates,
//! paginated lists whose links are rewritten, streamed downloads; two bursts of
//! dead tokens (every access token revoked at once) and three rolling restarts
//! of the upstream (every open connection closed after its next response).
//!
//! It passes when no request failed, no body was cut, and the proxy's resident
//! memory at the end is within 10 % of what it was after the first 10 s.
//!
//!     scripts/soak                       # 60 s, 100 requests/s
//!     cargo run --release --example soak -- --proxy target/release/tallyfy-proxy --seconds 20

#[allow(dead_code)] // the soak uses a few of the test builder's pieces
#[path = "../tests/support/config.rs"]
mod config;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use config::{Credential, Identity, Match, Secret, TestConfig};
use tallyfy_sandbox::fixtures::{
    ORG_ID, PASSWORD, PERSONAL_TOKEN, USER_CLIENT_ID, USER_CLIENT_SECRET, USERNAME,
};
use tallyfy_sandbox::{Sandbox, SandboxConfig};
use tokio::sync::{Mutex, Semaphore};

/// Requests in flight at most.
const CONCURRENCY: usize = 32;
/// Bytes of each streamed download.
const DOWNLOAD: usize = 50_000;

struct Args {
    proxy: PathBuf,
    seconds: u64,
    rate: u64,
}

/// The shortest run whose memory drift is judged (±10 %).
const FLAT_JUDGED_FROM: Duration = Duration::from_secs(30);

/// The least time between two dead-token bursts: over the forced-refresh interval.
const DEAD_TOKEN_GAP: Duration = Duration::from_secs(6);

fn args() -> Result<Args, String> {
    let mut parsed = Args {
        proxy: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tallyfy-proxy"),
        seconds: 60,
        rate: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--proxy" => parsed.proxy = PathBuf::from(value),
            "--seconds" => parsed.seconds = value.parse().map_err(|_| "--seconds takes a number")?,
            "--rate" => parsed.rate = value.parse().map_err(|_| "--rate takes a number")?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(parsed)
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    latencies_us: Mutex<Vec<u64>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Me,
    Runs,
    Task,
    Download,
}

impl Kind {
    fn pick(n: u64) -> Kind {
        match n % 10 {
            0..=3 => Kind::Me,
            4 | 5 => Kind::Runs,
            6 | 7 => Kind::Task,
            _ => Kind::Download,
        }
    }
}

/// Sends one request and checks its whole answer; `Err` says what went wrong.
async fn one(http: &reqwest::Client, base: &str, upstream: &str, kind: Kind, n: u64) -> Result<(), String> {
    let (request, what) = match kind {
        Kind::Me => (http.get(format!("{base}/api/me")).header("x-api-key", "soak-user"), "GET /api/me (OAuth)"),
        Kind::Runs => (
            http.get(format!("{base}/api/organizations/{ORG_ID}/runs?per_page=5")).header("x-api-key", "soak-ops"),
            "GET runs",
        ),
        Kind::Task => (
            http.post(format!("{base}/api/organizations/{ORG_ID}/tasks"))
                .header("x-api-key", if n.is_multiple_of(2) { "soak-user" } else { "soak-ops" })
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"title":"Soak {n}","task_type":"task","owners":{{"users":[],"guests":[],"groups":[]}},"deadline":"2025-09-30T17:00:00Z","started_at":"2025-09-01T09:00:00+02:00"}}"#
                )),
            "POST task with dates",
        ),
        Kind::Download => (
            http.get(format!("{base}/api/organizations/{ORG_ID}/file/f{n}/dl?bytes={DOWNLOAD}"))
                .header("x-api-key", "soak-ops"),
            "GET download",
        ),
    };
    let response = request.send().await.map_err(|e| format!("{what}: {e}"))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("{what}: body cut: {e}"))?;
    if !status.is_success() {
        return Err(format!("{what}: {status} {}", String::from_utf8_lossy(&body[..body.len().min(200)])));
    }
    match kind {
        Kind::Download => {
            let exact = body.len() == DOWNLOAD && body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8);
            if !exact {
                return Err(format!("{what}: body cut or altered ({} bytes)", body.len()));
            }
        }
        _ => {
            let json: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| format!("{what}: body is not whole JSON: {e}"))?;
            if body.windows(upstream.len()).any(|w| w == upstream.as_bytes()) {
                return Err(format!("{what}: an upstream link leaked: {json}"));
            }
        }
    }
    Ok(())
}

fn config(dir: &Path, upstream: &str, proxy_port: u16, admin_port: u16) -> PathBuf {
    let write = |name: &str, value: &str| std::fs::write(dir.join(name), value).expect("write a secret file");
    write("token", PERSONAL_TOKEN);
    write("client_secret", USER_CLIENT_SECRET);
    write("password", PASSWORD);
    let path = dir.join("proxy.toml");
    TestConfig::new(upstream)
        .set("listen", "proxy", format!("127.0.0.1:{proxy_port}"))
        .set("listen", "admin", format!("127.0.0.1:{admin_port}"))
        .set("log", "level", "info")
        .credential(Credential::personal("ops", Secret::File("token")))
        .credential(Credential::password(
            "user",
            USER_CLIENT_ID,
            Secret::File("client_secret"),
            USERNAME,
            Secret::File("password"),
        ))
        .identity(Identity::new("ops-app", "ops", Match::ApiKey("soak-ops")))
        .identity(Identity::new("user-app", "user", Match::ApiKey("soak-user")))
        .write(&path);
    path
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("soak: {error}");
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sandbox_config = SandboxConfig {
        token_lifetime: Duration::from_secs(3),
        user_token_lifetime: Duration::from_secs(3),
        ..SandboxConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the sandbox");
    let sandbox = Sandbox::start(listener, sandbox_config).await.expect("sandbox");
    let dir = tempfile::tempdir().expect("temp dir");
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config_path = config(dir.path(), &sandbox.base_url(), proxy_port, admin_port);
    let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
    let mut child = tokio::process::Command::new(&args.proxy)
        .args(["run", "--config"])
        .arg(&config_path)
        .stdout(Stdio::from(log))
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", args.proxy.display()));
    let pid = child.id().expect("running");
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let base = format!("http://127.0.0.1:{proxy_port}");
    let ready = format!("http://127.0.0.1:{admin_port}/readyz");
    let started = Instant::now();
    loop {
        if http.get(&ready).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the proxy became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "soak: {} s at {} requests/s (at most {CONCURRENCY} in flight), proxy pid {pid}",
        args.seconds, args.rate
    );
    let tally = Arc::new(Tally::default());
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let upstream = sandbox.base_url();
    let total = Duration::from_secs(args.seconds);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    // Dead-token bursts stay further apart than tokens.min_forced_refresh_interval_ms
    // (5 s), which by design declines a second forced refresh sooner
    // (DEAD_TOKEN_GAP).
    let events = [
        (0.25, "dead tokens"),
        (0.35, "rolling restart"),
        (0.6, "dead tokens"),
        (0.7, "rolling restart"),
        (0.85, "rolling restart"),
    ];
    let mut next_event = 0;
    let mut last_dead = None;
    let warm = Duration::from_secs(10).min(total / 6);
    let (mut rss_warm, mut rss_max) = (None, 0);
    let began = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    // A stalled driver sends on at the rate, not a catch-up burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let mut last_sample = Instant::now();
    while began.elapsed() < total {
        ticker.tick().await;
        let elapsed = began.elapsed();
        if let Some((at, what)) = events.get(next_event)
            && elapsed >= total.mul_f64(*at)
        {
            next_event += 1;
            // In a short run the bursts would come closer than the forced-refresh
            // interval, which declines the second by design: skip it.
            let too_soon = last_dead.is_some_and(|at: Instant| at.elapsed() < DEAD_TOKEN_GAP);
            match *what {
                "dead tokens" if too_soon => {
                    println!("soak: {:>5.1} s  {what} skipped (run too short)", elapsed.as_secs_f64());
                }
                "dead tokens" => {
                    println!("soak: {:>5.1} s  {what}", elapsed.as_secs_f64());
                    sandbox.revoke_all_tokens();
                    last_dead = Some(Instant::now());
                }
                _ => {
                    println!("soak: {:>5.1} s  {what}", elapsed.as_secs_f64());
                    sandbox.restart_connections();
                }
            }
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            let rss = rss_kib(pid).unwrap_or(0);
            rss_max = rss_max.max(rss);
            if rss_warm.is_none() && elapsed >= warm {
                rss_warm = Some(rss);
            }
        }
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let (http, base, upstream, tally) = (http.clone(), base.clone(), upstream.clone(), tally.clone());
        tally.sent.fetch_add(1, Ordering::Relaxed);
        n += 1;
        let kind = Kind::pick(n);
        tokio::spawn(async move {
            let sent = Instant::now();
            let result = one(&http, &base, &upstream, kind, n).await;
            tally.latencies_us.lock().await.push(sent.elapsed().as_micros() as u64);
            match result {
                Ok(()) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(failure) => tally.failures.lock().await.push(failure),
            }
            drop(permit);
        });
    }
    let _all_done = permits.acquire_many(CONCURRENCY as u32).await.expect("semaphore");
    let rss_end = rss_kib(pid).unwrap_or(0);
    rss_max = rss_max.max(rss_end);
    let took = began.elapsed();

    // SIGTERM: the proxy drains and exits 0.
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let exited_cleanly = matches!(exit, Ok(Ok(status)) if status.success());

    let sent = tally.sent.load(Ordering::Relaxed);
    let ok = tally.ok.load(Ordering::Relaxed);
    let failures = tally.failures.lock().await;
    let mut latencies = tally.latencies_us.lock().await.clone();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64 / 1000.0
    };
    let rss_warm = rss_warm.unwrap_or(rss_end);
    let drift = (rss_end as f64 - rss_warm as f64) / rss_warm.max(1) as f64;
    let fetches = sandbox.token_requests().len();
    println!("| figure | value |\n|---|---|");
    println!("| duration | {:.1} s |", took.as_secs_f64());
    println!("| requests | {sent} ({:.0}/s) |", sent as f64 / took.as_secs_f64());
    println!("| succeeded | {ok} |");
    println!("| failed or cut | {} |", failures.len());
    println!("| latency p50 / p99 | {:.2} ms / {:.2} ms |", pct(0.5), pct(0.99));
    println!("| token endpoint calls | {fetches} |");
    println!(
        "| proxy RSS after {:.1} s / at the end / max | {:.1} / {:.1} / {:.1} MiB ({:+.1} %) |",
        warm.as_secs_f64(),
        rss_warm as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        drift * 100.0
    );
    println!("| clean exit on SIGTERM | {exited_cleanly} |");
    for failure in failures.iter().take(10) {
        println!("failure: {failure}");
    }
    // Memory is judged flat only over a run long enough to have a steady state:
    // a few seconds in, the pools are still filling (the smoke run prints it).
    let flat = drift.abs() <= 0.10 || total < FLAT_JUDGED_FROM;
    if total < FLAT_JUDGED_FROM {
        println!("memory drift not judged: runs under {} s have no steady state", FLAT_JUDGED_FROM.as_secs());
    }
    let passed = failures.is_empty() && ok == sent && flat && exited_cleanly;
    println!("soak: {}", if passed { "passed" } else { "FAILED" });
    if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
