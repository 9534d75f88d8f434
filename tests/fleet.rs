//! Fleet mode against a real `redis-server` and three `tallyfy-proxy run`
//! processes in front of the sandbox: one refresh per credential for the whole
//! fleet, tokens sealed at rest, a killed lease holder replaced, Redis outages
//! survived.

#[path = "fleet/redis_server.rs"]
mod redis_server;
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use redis_server::RedisServer;
use support::{Credential, Identity, Match, TestConfig, client, scrape, start_sandbox_with};
use tallyfy_sandbox::{Sandbox, SandboxConfig, TokenFault};
use toml::Value;

const KEY: [u8; 32] = [7; 32];

/// Fleet scenarios run one at a time. Each runs three replicas, Redis and the
/// sandbox with 3-second tokens and asserts that no request fails; eight at
/// once on a 2-core machine starve one another's refreshers past the tokens'
/// life (CI saw one 401 in 5,149 requests that way, with older builds too).
static ONE_SCENARIO_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A route both application and user tokens may call (in the sandbox's org,
/// `fixtures::ORG_ID`).
const PATH: &str = "/api/organizations/5a3f9c1e7b2d4e6f8a0b1c2d3e4f5a6b/runs";

/// One `tallyfy-proxy run` process.
struct Replica {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// Runs the binary on `config` with the fleet at `redis` sealing with `key`,
    /// and waits until it listens and is ready.
    async fn start(config: &TestConfig, redis: &str, key: [u8; 32]) -> Replica {
        let dir = tempfile::tempdir().expect("dir");
        config.write(&dir.path().join("proxy.toml"));
        std::fs::write(dir.path().join("fleet-key"), base64::engine::general_purpose::STANDARD.encode(key))
            .expect("write key");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"));
        command
            .args(["run", "--config", "proxy.toml"])
            .current_dir(dir.path())
            .env("TALLYFY_PROXY_REDIS_URL", redis)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped());
        for name in ["APP_SECRET", "USER_SECRET", "USER_PASSWORD", support::TOKEN_ENV] {
            command.env(name, support::env(name).expect("fixture secret"));
        }
        let mut child = command.spawn().expect("the binary runs");
        let stdout = child.stdout.take().expect("stdout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, listening) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"listening\"") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().expect("log").push(line);
            }
        });
        let line = listening.recv_timeout(Duration::from_secs(20)).expect("the replica listens");
        let json: serde_json::Value = serde_json::from_str(&line).expect("json log");
        let proxy =
            json["proxy"].as_str().expect("proxy").trim_start_matches("http://").parse().expect("addr");
        let admin = json["admin"].as_str().expect("admin").parse().expect("addr");
        let replica = Replica { child, proxy, admin, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = client().get(format!("http://{admin}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return replica;
            }
            assert!(Instant::now() < deadline, "the replica became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Log lines worth reading when requests failed: warnings, errors and
    /// requests answered with a 401.
    fn trouble(&self) -> Vec<String> {
        let log = self.log.lock().expect("log");
        let worth = |line: &&String| {
            line.contains("\"WARN\"") || line.contains("\"ERROR\"") || line.contains("\"status\":401")
        };
        log.iter().filter(worth).cloned().collect()
    }

    fn logged(&self, text: &str) -> usize {
        self.log.lock().expect("log").iter().filter(|line| line.contains(text)).count()
    }

    async fn metric(&self, series: &str) -> f64 {
        // Every sample of the series, whatever its labels.
        let text = scrape(self.admin).await;
        text.lines()
            .filter_map(|line| line.strip_prefix(series))
            .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fleet's config: `credential` for every caller, JSON logs, the fleet in Redis.
fn fleet_config(
    sandbox: &Sandbox,
    credential: Credential,
    lease_ms: i64,
    fetch_timeout_ms: i64,
) -> TestConfig {
    let name = credential.name();
    TestConfig::new(&sandbox.base_url())
        .set("log", "format", "json")
        .set("tokens", "fetch_timeout_ms", fetch_timeout_ms)
        .set("fleet", "redis_url", support::table([("env", Value::from("TALLYFY_PROXY_REDIS_URL"))]))
        .set("fleet", "key_prefix", "test/fleet")
        .set("fleet", "encryption_key", support::table([("file", Value::from("fleet-key"))]))
        .set("fleet", "lease_ms", lease_ms)
        .credential(credential)
        .identity(Identity::new("caller", &name, Match::Any))
}

/// [`fleet_config`] for the fixture user (40-second leases, 10-second fetches)
/// with `tokens.min_forced_refresh_interval_ms` set.
fn forced_refresh_interval(sandbox: &Sandbox, interval_ms: i64) -> TestConfig {
    fleet_config(sandbox, Credential::fixture_user(), 40_000, 10_000).set(
        "tokens",
        "min_forced_refresh_interval_ms",
        interval_ms,
    )
}

async fn fleet(count: usize, config: &TestConfig, redis: &RedisServer) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for _ in 0..count {
        replicas.push(Replica::start(config, &redis.url(), KEY).await);
    }
    replicas
}

/// Sends `GET /api/me` round-robin to the replicas from `workers` tasks until
/// `until`; answers (ok, failed).
async fn traffic(replicas: &[Replica], workers: usize, until: Instant) -> (usize, usize) {
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(replicas.iter().map(|r| r.proxy).collect());
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let (addrs, ok, failed) = (addrs.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let http = client();
                let mut i = worker;
                while Instant::now() < until {
                    let addr = addrs[i % addrs.len()];
                    i += 1;
                    match http.get(format!("http://{addr}{PATH}")).send().await {
                        Ok(response) if response.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        // What failed is printed: a failing test shows it.
                        Ok(response) => {
                            let status = response.status();
                            eprintln!("{addr}: {status} {}", response.text().await.unwrap_or_default());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(error) => {
                            eprintln!("{addr}: {error:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

fn password_grants(sandbox: &Sandbox) -> usize {
    sandbox.token_requests().iter().filter(|t| t.answered == 200).count()
}

fn sandbox_config(lifetime: Duration) -> SandboxConfig {
    SandboxConfig { token_lifetime: lifetime, user_token_lifetime: lifetime, ..SandboxConfig::default() }
}

#[test]
fn the_path_is_in_the_sandboxs_org() {
    assert!(PATH.contains(tallyfy_sandbox::fixtures::ORG_ID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_once_per_cycle_and_never_present_a_refresh_token_twice() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    // 6-second tokens: a refresh has a second or more to finish even on a
    // loaded machine, and 20 s still hold four cycles.
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(6))).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 10_000);
    let replicas = fleet(3, &config, &redis).await;
    assert_eq!(password_grants(&sandbox), 1, "one sign-in for the fleet: {:?}", sandbox.token_requests());

    let started = Instant::now();
    let (ok, failed) = traffic(&replicas, 6, started + Duration::from_secs(20)).await;
    let elapsed = started.elapsed();
    assert_eq!(failed, 0, "{ok} answered; {:#?}", replicas.iter().map(Replica::trouble).collect::<Vec<_>>());
    assert!(ok > 200, "traffic flowed: {ok}");
    assert_eq!(sandbox.double_redemptions(), 0, "no refresh token presented twice");
    // A 6-second token is refreshed 4.5 to 5.1 s into its life: about 4
    // cycles in 20 s. Three replicas refreshing alone would fetch about 12 times.
    let fetches = sandbox.token_requests().len() - 1;
    let cycles = elapsed.as_secs_f64() / 4.5;
    assert!(fetches as f64 <= cycles + 1.0, "{fetches} fetches in {elapsed:?}: one per cycle");
    assert!(
        fetches as f64 >= cycles / 1.2 - 1.0,
        "{fetches} fetches in {elapsed:?}: the token was kept fresh"
    );
    // Exactly one fetch per cycle: every call to the token endpoint was made by
    // a lease holder, and no two refreshes came within one token's cycle.
    let mut refreshed: Vec<jiff::Timestamp> = replicas
        .iter()
        .flat_map(|replica| {
            let log = replica.log.lock().expect("log");
            log.iter()
                .filter(|line| line.contains("refreshing for the fleet"))
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter_map(|json| json["timestamp"].as_str()?.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    refreshed.sort();
    assert_eq!(refreshed.len(), sandbox.token_requests().len(), "every fetch under the lease");
    for pair in refreshed.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= jiff::SignedDuration::from_millis(4000), "two refreshes {gap:?} apart: {refreshed:?}");
    }
    let mut adopted = 0;
    for replica in &replicas {
        let taken = replica.metric("tallyfy_proxy_fleet_tokens_adopted_total").await;
        assert_eq!(replica.metric("tallyfy_proxy_fleet_connected").await, 1.0);
        adopted += usize::from(taken > 0.0);
    }
    assert!(adopted >= 2, "replicas took the tokens others fetched");

    // Tokens at rest: sealed, and never kept longer than they live.
    let mut redis_client = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> =
        redis::cmd("KEYS").arg("test/fleet/*").query_async(&mut redis_client).await.expect("keys");
    let token_keys: Vec<&String> = keys.iter().filter(|k| k.contains("/tokens/")).collect();
    assert_eq!(token_keys.len(), 1, "{keys:?}");
    let sealed: Vec<u8> =
        redis::cmd("GET").arg(token_keys[0]).query_async(&mut redis_client).await.expect("get");
    let ttl: i64 = redis::cmd("PTTL").arg(token_keys[0]).query_async(&mut redis_client).await.expect("pttl");
    assert!((1..=6000).contains(&ttl), "the TTL ({ttl} ms) never exceeds the token's life");
    let text = String::from_utf8_lossy(&sealed);
    for clear in [
        "eyJ",
        "access_token",
        "refresh_token",
        tallyfy_sandbox::fixtures::PASSWORD,
        tallyfy_sandbox::fixtures::USER_CLIENT_SECRET,
    ] {
        assert!(!text.contains(clear), "{clear:?} is not stored in clear");
    }
    for key in &keys {
        assert!(!key.contains(tallyfy_sandbox::fixtures::USER_CLIENT_SECRET), "{key}");
    }
    // Nor do the replicas' logs hold any of it.
    let key_text = base64::engine::general_purpose::STANDARD.encode(KEY);
    for replica in &replicas {
        for line in replica.log.lock().expect("log").iter() {
            for secret in ["eyJ", key_text.as_str(), tallyfy_sandbox::fixtures::PASSWORD] {
                assert!(!line.contains(secret), "{line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_dead_token_401s_across_the_fleet_cause_one_refresh() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let config = forced_refresh_interval(&sandbox, 100);
    let replicas = fleet(3, &config, &redis).await;
    assert_eq!(sandbox.token_requests().len(), 1);
    sandbox.revoke_all_tokens();
    let http = client();
    let requests: Vec<_> = (0..40)
        .map(|i| {
            let url = format!("http://{}{PATH}", replicas[i % 3].proxy);
            let http = http.clone();
            tokio::spawn(async move { http.get(url).send().await.expect("answered").status() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.expect("task"), 200, "replayed with the fleet's new token");
    }
    let grants: Vec<String> = sandbox.token_requests().iter().map(|t| t.grant.clone()).collect();
    assert_eq!(grants, ["password", "refresh_token"], "one refresh for the whole fleet");
    assert_eq!(sandbox.double_redemptions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_while_another_replica_refreshes_is_replayed_with_its_set_even_just_after_a_forced_refresh() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    // A forced refresh holds off the next one for a minute: a second rejection
    // in that minute only takes what the fleet has.
    let config = forced_refresh_interval(&sandbox, 60_000);
    let replicas = fleet(2, &config, &redis).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let get = |replica: &Replica| client().get(format!("http://{}{PATH}", replica.proxy)).send();

    // B forces a refresh (its token died), and A takes the new set from the fleet.
    sandbox.revoke_all_tokens();
    assert_eq!(get(b).await.expect("answered").status(), 200, "{:#?}", b.trouble());
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.metric("tallyfy_proxy_fleet_tokens_adopted_total").await < 1.0 {
        assert!(Instant::now() < deadline, "A took the fleet's new set");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Now A refreshes for the fleet, slowly: its set is not written yet while
    // the token both replicas hold is already dead (as a rotated refresh token
    // kills its access token at Tallyfy).
    sandbox.set_token_fault(Some(TokenFault::Slow(Duration::from_millis(1500))));
    sandbox.revoke_all_tokens();
    let refreshing = a.logged("refreshing for the fleet");
    let first = tokio::spawn(get(a));
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.logged("refreshing for the fleet") == refreshing {
        assert!(Instant::now() < deadline, "A refreshed for the fleet: {:#?}", a.trouble());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // B's token is rejected inside its minute: it may not refresh, and must
    // wait for A's set rather than pass the 401 on.
    let answer = get(b).await.expect("answered");
    assert_eq!(answer.status(), 200, "{:#?}", b.trouble());
    assert_eq!(first.await.expect("task").expect("answered").status(), 200, "{:#?}", a.trouble());
    // Access lines reach the log within 50 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.logged("\"replayed\":true") < 2 {
        assert!(Instant::now() < deadline, "B replayed both of its requests: {:#?}", b.trouble());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grants: Vec<String> = sandbox.token_requests().iter().map(|t| t.grant.clone()).collect();
    assert_eq!(
        grants,
        ["password", "refresh_token", "refresh_token"],
        "one refresh each time, for the fleet"
    );
    assert_eq!(sandbox.double_redemptions(), 0);
}

/// An older token set back in Redis (a failover that lost the writes after
/// it, a restart from an old snapshot, an old sealed value written back) is
/// never the source of a refresh token: the one it holds was spent, and a
/// spent refresh token presented again has Tallyfy revoke the whole family.
/// The lease holder signs in with the password instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_set_back_in_redis_never_has_its_refresh_token_presented_again() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let config = forced_refresh_interval(&sandbox, 100);
    let replicas = fleet(1, &config, &redis).await;
    let replica = &replicas[0];
    let mut connection = redis_connection(&redis).await;
    let sets = token_keys(&mut connection).await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    let old: Vec<u8> = redis::cmd("DUMP").arg(&sets[0]).query_async(&mut connection).await.expect("dump");
    let older = old.clone();
    let get = || client().get(format!("http://{}{PATH}", replica.proxy)).send();

    // A dead token: the replica redeems the set's refresh token for a new set.
    sandbox.revoke_all_tokens();
    assert_eq!(get().await.expect("answered").status(), 200, "{:#?}", replica.trouble());
    // The older set, its refresh token spent, comes back.
    let ttl: i64 = redis::cmd("PTTL").arg(&sets[0]).query_async(&mut connection).await.expect("pttl");
    let _: () = redis::cmd("RESTORE")
        .arg(&sets[0])
        .arg(ttl.max(1000))
        .arg(old)
        .arg("REPLACE")
        .query_async(&mut connection)
        .await
        .expect("restore");
    tokio::time::sleep(Duration::from_millis(150)).await; // past min_forced_refresh_interval_ms
    sandbox.revoke_all_tokens();
    assert_eq!(get().await.expect("answered").status(), 200, "{:#?}", replica.trouble());
    let grants: Vec<String> = sandbox.token_requests().iter().map(|t| t.grant.clone()).collect();
    assert_eq!(grants, ["password", "refresh_token", "password"], "a sign-in, not the spent token");
    assert_eq!(sandbox.double_redemptions(), 0);

    // A replica that installed nothing (a restart) meets the older set back
    // again: the generation the fleet last announced is its floor, so it
    // neither takes the set's dead token nor presents its refresh token.
    drop(replicas);
    let ttl: i64 = redis::cmd("PTTL").arg(&sets[0]).query_async(&mut connection).await.expect("pttl");
    let _: () = redis::cmd("RESTORE")
        .arg(&sets[0])
        .arg(ttl.max(1000))
        .arg(older)
        .arg("REPLACE")
        .query_async(&mut connection)
        .await
        .expect("restore");
    let restarted = Replica::start(&config, &redis.url(), KEY).await;
    let response = client().get(format!("http://{}{PATH}", restarted.proxy)).send().await.expect("answered");
    assert_eq!(response.status(), 200, "{:#?}", restarted.trouble());
    let grants: Vec<String> = sandbox.token_requests().iter().map(|t| t.grant.clone()).collect();
    assert_eq!(grants, ["password", "refresh_token", "password", "password"], "a sign-in at start");
    assert_eq!(sandbox.double_redemptions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_replaced_with_no_failed_request() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    // 40-second tokens, refreshed 30 to 34 s into their life; the token
    // endpoint answers after 0.9 s, so the holder can be killed mid-call (a
    // wide window, for a loaded CI machine) and the survivor's call still has
    // 0.6 s to spare within the 1.5-second fetch timeout; the holder's 4.6-second
    // lease lapses and a survivor's refresh is done about 6 s later, before the
    // old token expires.
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(40))).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 4_600, 1_500);
    let mut replicas = fleet(3, &config, &redis).await;
    sandbox.set_token_fault(Some(TokenFault::Slow(Duration::from_millis(900))));
    let before = sandbox.token_requests().len();

    let until = Instant::now() + Duration::from_secs(55);
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.proxy).collect();
    // Find the holder as it starts refreshing, and kill it.
    let deadline = Instant::now() + Duration::from_secs(45);
    let signed_in: Vec<usize> = replicas.iter().map(|r| r.logged("refreshing for the fleet")).collect();
    let holder = loop {
        if let Some(i) = (0..3).find(|&i| replicas[i].logged("refreshing for the fleet") > signed_in[i]) {
            break i;
        }
        assert!(Instant::now() < deadline, "a replica refreshed for the fleet");
        // Keep the replicas busy meanwhile.
        for addr in &addrs {
            let status =
                client().get(format!("http://{addr}{PATH}")).send().await.expect("answered").status();
            assert_eq!(status, 200);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    replicas[holder].kill();
    let survivors: Vec<Replica> =
        replicas.into_iter().enumerate().filter(|(i, _)| *i != holder).map(|(_, r)| r).collect();
    let takeover = Instant::now() + Duration::from_secs(8);
    let (ok, failed) = traffic(&survivors, 4, takeover.min(until)).await;
    assert_eq!(failed, 0, "{ok} answered while the lease lapsed and another replica took over");
    assert_eq!(
        sandbox.double_redemptions(),
        0,
        "the successor never presented the killed holder's refresh token"
    );
    let took_over: usize = survivors.iter().map(|r| r.logged("refreshing for the fleet")).sum::<usize>()
        - (0..3).filter(|&i| i != holder).map(|i| signed_in[i]).sum::<usize>();
    assert!(took_over >= 1, "a survivor refreshed after the lease lapsed");
    // The killed holder's call may have been dropped unanswered (the sandbox
    // records answers); the survivor's was answered.
    assert!(sandbox.token_requests().len() > before, "a survivor fetched the new token");
    for replica in &survivors {
        let ready = client().get(format!("http://{}/readyz", replica.admin)).send().await.expect("ready");
        assert_eq!(ready.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_for_ten_seconds_fails_no_request_and_one_refresher_returns() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let mut redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3))).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 4_000, 1_000);
    let replicas = fleet(3, &config, &redis).await;

    redis.stop();
    let (ok, failed) = traffic(&replicas, 4, Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(
        failed,
        0,
        "{ok} answered while Redis was away; {:#?}",
        replicas.iter().map(Replica::trouble).collect::<Vec<_>>()
    );
    let mut fell_back = 0.0;
    for replica in &replicas {
        assert_eq!(replica.metric("tallyfy_proxy_fleet_connected").await, 0.0);
        fell_back += replica.metric("tallyfy_proxy_fleet_fallbacks_total").await;
    }
    assert!(fell_back >= 3.0, "each replica refreshed alone: {fell_back}");
    assert_eq!(sandbox.double_redemptions(), 0, "alone, no replica presents the fleet's refresh token");

    assert!(redis.run().await, "Redis is back on its port");
    let (ok, failed) = traffic(&replicas, 4, Instant::now() + Duration::from_secs(4)).await;
    assert_eq!(
        failed,
        0,
        "{ok} answered while the fleet reformed; {:#?}",
        replicas.iter().map(Replica::trouble).collect::<Vec<_>>()
    );
    let before = sandbox.token_requests().len();
    let started = Instant::now();
    let (_, failed) = traffic(&replicas, 4, started + Duration::from_secs(7)).await;
    assert_eq!(failed, 0, "{:#?}", replicas.iter().map(Replica::trouble).collect::<Vec<_>>());
    let fetches = sandbox.token_requests().len() - before;
    let cycles = started.elapsed().as_secs_f64() / 2.25;
    assert!(fetches as f64 <= cycles + 1.0, "{fetches} fetches: one refresher again");
    for replica in &replicas {
        assert_eq!(replica.metric("tallyfy_proxy_fleet_connected").await, 1.0);
    }
    assert_eq!(sandbox.double_redemptions(), 0);
}

/// A Redis that refuses writes (out of memory under `noeviction`, or a
/// read-only replica after a failover) while its polls still announce a
/// generation no replica can take: a replica signs in alone once, for its
/// own first token, and that news costs it no sign-in (it signed in every
/// 5 s, for as long as it lasted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_writes_costs_one_sign_in_not_one_per_poll() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3600))).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 1_000);
    let first = Replica::start(&config, &redis.url(), KEY).await;
    let mut connection = redis_connection(&redis).await;
    // Its set gone (as when its TTL ends), its generation still announced.
    let keys = token_keys(&mut connection).await;
    assert!(!keys.is_empty(), "the first replica stored its set");
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut connection).await.expect("del");
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut connection)
            .await
            .expect("config");
    }
    let before = sandbox.token_requests().len();
    let second = Replica::start(&config, &redis.url(), KEY).await;
    // Three polls (every 5 s) after its own first sign-in.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let fetched = sandbox.token_requests().len() - before;
    assert!(fetched <= 2, "{fetched} sign-ins: one of its own, and at most one for the news");
    let answer = client().get(format!("http://{}{PATH}", second.proxy)).send().await.expect("answered");
    assert_eq!(answer.status(), 200, "it serves with its own token");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_key_refuses_the_fleets_tokens_and_serves_alone() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 10_000);
    let first = Replica::start(&config, &redis.url(), KEY).await;
    // The fleet's set gone (as when its TTL lapses): a stranger starting now
    // must still not write one the others cannot open.
    let mut connection = redis_connection(&redis).await;
    let sets = token_keys(&mut connection).await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    let _: () = redis::cmd("DEL").arg(&sets[0]).query_async(&mut connection).await.expect("del");

    let stranger = Replica::start(&config, &redis.url(), [9; 32]).await;
    assert_eq!(sandbox.token_requests().len(), 2, "the stranger fetched its own token");
    assert_eq!(stranger.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    assert_eq!(stranger.logged("do not decrypt with this replica's encryption_key"), 1);
    assert!(token_keys(&mut connection).await.is_empty(), "the stranger wrote nothing");
    for replica in [&first, &stranger] {
        let response =
            client().get(format!("http://{}{PATH}", replica.proxy)).send().await.expect("answered");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body} {:?}", replica.log.lock().expect("log"));
    }
    assert_eq!(first.metric("tallyfy_proxy_fleet_undecryptable_total").await, 0.0);
}

/// Redis losing the fleet's key (a flush, an eviction, a restart without
/// persistence) does not hand the fleet to the next replica to start: a
/// running replica names its key again within a poll, so a stranger starting
/// then is refused, and a refused replica never names its own. A fingerprint
/// naming another key refuses a running replica's lease (the script compares
/// before it writes), and the replica serves alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_fleets_key_gets_it_back_from_its_replicas_never_from_a_stranger() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 10_000);
    let mut first = Replica::start(&config, &redis.url(), KEY).await;
    let mut connection = redis_connection(&redis).await;
    let ours = fingerprint_of(KEY);
    assert_eq!(fleet_fingerprint(&mut connection).await.as_deref(), Some(&*ours));

    // Redis loses everything; the running replica names its key again.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut connection).await.expect("flush");
    let named = async || fleet_fingerprint(&mut connection).await.is_some();
    eventually(Duration::from_secs(15), "the running replica named the fleet's key again", named).await;
    assert_eq!(fleet_fingerprint(&mut connection).await.as_deref(), Some(&*ours));
    let stranger = Replica::start(&config, &redis.url(), [9; 32]).await;
    assert_eq!(stranger.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    assert!(token_keys(&mut connection).await.is_empty(), "the stranger wrote nothing");

    // Lost again with only the refused stranger running: it polls (runs the
    // key check) and still names nothing.
    first.kill();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut connection).await.expect("flush");
    let checks = script_calls(&mut connection).await;
    let polled = async || script_calls(&mut connection).await > checks;
    eventually(Duration::from_secs(15), "the stranger polled", polled).await;
    assert_eq!(fleet_fingerprint(&mut connection).await, None, "a refused replica names no key");
    let joined = Replica::start(&config, &redis.url(), KEY).await;
    assert_eq!(fleet_fingerprint(&mut connection).await.as_deref(), Some(&*ours));
    assert_eq!(joined.metric("tallyfy_proxy_fleet_undecryptable_total").await, 0.0);
    let sets = token_keys(&mut connection).await;
    assert_eq!(sets.len(), 1, "the replica with the fleet's key shares its set: {sets:?}");

    // Another key named under a running replica: its next lease is refused
    // inside the script, and it serves alone.
    let _: () = redis::cmd("SET")
        .arg("test/fleet/key-fingerprint")
        .arg(fingerprint_of([5; 32]))
        .query_async(&mut connection)
        .await
        .expect("set");
    let set: Vec<u8> = redis::cmd("GET").arg(&sets[0]).query_async(&mut connection).await.expect("get");
    sandbox.revoke_all_tokens();
    for replica in [&joined, &stranger] {
        let response =
            client().get(format!("http://{}{PATH}", replica.proxy)).send().await.expect("answered");
        assert_eq!(response.status(), 200, "{:#?}", replica.trouble());
    }
    assert_eq!(joined.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    assert_eq!(joined.logged("do not decrypt with this replica's encryption_key"), 1);
    let now: Vec<u8> = redis::cmd("GET").arg(&sets[0]).query_async(&mut connection).await.expect("get");
    assert_eq!(now, set, "nothing written under another key");
    assert_eq!(sandbox.double_redemptions(), 0);
}

/// The fingerprint decides whenever Redis holds one, and the sealed check of
/// earlier versions only without it; neither is ever named by a replica the
/// fleet refused. A fleet of earlier versions (a check, no fingerprint) gets
/// its fingerprint from a replica whose key opens the check, not from a
/// stranger; a check lost and then named by a stranger refuses no replica
/// the fingerprint names; and a refused replica joins, and takes the fleet's
/// set, once the fleet's key is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fingerprint_decides_and_a_refused_replica_joins_once_the_key_is_its_own() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 10_000);
    let mut first = Replica::start(&config, &redis.url(), KEY).await;
    let mut connection = redis_connection(&redis).await;
    let (fingerprint, check) = ("test/fleet/key-fingerprint", "test/fleet/key-check");
    let ours = fingerprint_of(KEY);

    // As a fleet of earlier versions left Redis: a check, no fingerprint.
    let _: () = redis::cmd("DEL").arg(fingerprint).query_async(&mut connection).await.expect("del");
    let stranger = Replica::start(&config, &redis.url(), [9; 32]).await;
    assert_eq!(stranger.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    let named = fleet_fingerprint(&mut connection).await;
    assert!(named.is_none() || named.as_deref() == Some(&*ours), "the stranger named no key: {named:?}");
    let named = async || fleet_fingerprint(&mut connection).await.is_some();
    eventually(Duration::from_secs(15), "the replica whose key opens the check named it", named).await;
    assert_eq!(fleet_fingerprint(&mut connection).await.as_deref(), Some(&*ours));

    // The check lost, and a stranger starting first: refused by the
    // fingerprint, it leaves the check to the fleet's replica.
    let _: () = redis::cmd("DEL").arg(check).query_async(&mut connection).await.expect("del");
    let other = Replica::start(&config, &redis.url(), [8; 32]).await;
    assert_eq!(other.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    let sealed_again = async || {
        let exists: bool =
            redis::cmd("EXISTS").arg(check).query_async(&mut connection).await.expect("exists");
        exists
    };
    eventually(Duration::from_secs(15), "the fleet's replica sealed the check again", sealed_again).await;
    let sealed: Vec<u8> = redis::cmd("GET").arg(check).query_async(&mut connection).await.expect("get");
    let key = base64::engine::general_purpose::STANDARD.encode(KEY);
    let key = tallyfy_proxy::fleet::EncryptionKey::from_base64(&key).expect("key");
    assert!(key.open(check, &sealed).is_some(), "sealed with the fleet's key");
    assert_eq!(first.metric("tallyfy_proxy_fleet_undecryptable_total").await, 0.0, "{:#?}", first.trouble());
    drop(other);

    // The stranger's key made the fleet's: it joins and takes the fleet's set.
    first.kill();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut connection).await.expect("flush");
    let _peer = Replica::start(&config, &redis.url(), [9; 32]).await;
    let joined = async || stranger.metric("tallyfy_proxy_fleet_tokens_adopted_total").await >= 1.0;
    eventually(Duration::from_secs(20), "the stranger joined", joined).await;
    assert_eq!(stranger.logged("the fleet's key is this replica's again"), 1);
    assert_eq!(sandbox.double_redemptions(), 0);
}

/// A lease that finds the check of earlier versions, sealed with another key,
/// and no fingerprint beside it never names this replica's key there: the key
/// check decides, and refuses. A set that does not open while the fleet's key
/// is this replica's (written by an earlier version with another key, or
/// corrupted) is no set: one sign-in under the lease writes a new one over it,
/// and the fleet goes on with that (not a sign-in alone at every poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_names_a_key_beside_anothers_check_and_an_unreadable_set_is_replaced() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 10_000);
    let mut connection = redis_connection(&redis).await;
    let get = |replica: &Replica| client().get(format!("http://{}{PATH}", replica.proxy)).send();

    // Earlier versions' check, sealed with another key, and no fingerprint,
    // under a replica in the fleet: its next lease asks the key check.
    let mut first = Replica::start(&config, &redis.url(), KEY).await;
    let other = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let other = tallyfy_proxy::fleet::EncryptionKey::from_base64(&other).expect("key");
    let check = "test/fleet/key-check";
    let sealed = other.seal(check, b"tallyfy-proxy fleet key check");
    let _: () =
        redis::cmd("DEL").arg("test/fleet/key-fingerprint").query_async(&mut connection).await.expect("del");
    let _: () = redis::cmd("SET").arg(check).arg(sealed).query_async(&mut connection).await.expect("set");
    sandbox.revoke_all_tokens();
    assert_eq!(get(&first).await.expect("answered").status(), 200, "{:#?}", first.trouble());
    assert_eq!(fleet_fingerprint(&mut connection).await, None, "no key named beside another's check");
    assert_eq!(first.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    first.kill();

    // A set that does not open, under a replica whose key is the fleet's.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut connection).await.expect("flush");
    let replica = Replica::start(&config, &redis.url(), KEY).await;
    let sets = token_keys(&mut connection).await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    let credential = sets[0].rsplit('/').next().expect("name").to_owned();
    let mut garbage = redis::cmd("SET");
    garbage.arg(&sets[0]).arg("garbage").arg("KEEPTTL");
    let _: () = garbage.query_async(&mut connection).await.expect("set");
    let _: () = redis::cmd("HINCRBY")
        .arg("test/fleet/generations")
        .arg(&credential)
        .arg(1)
        .query_async(&mut connection)
        .await
        .expect("hincrby");
    let before = sandbox.token_requests().len();
    // Two polls announce the generation: news is a hint, and a set that does
    // not open is nothing to take, so the replica goes on with its own token.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(sandbox.token_requests().len(), before, "no sign-in for news: {:#?}", replica.trouble());
    // Read once, not once a poll (an error line each).
    assert_eq!(replica.metric("tallyfy_proxy_fleet_undecryptable_total").await, 1.0);
    assert_eq!(get(&replica).await.expect("answered").status(), 200);
    // The next fetch finds no set it can open: it signs in under the lease
    // and writes one over it.
    let _fetching = Replica::start(&config, &redis.url(), KEY).await;
    assert_eq!(sandbox.token_requests().len(), before + 1, "one sign-in: {:#?}", replica.trouble());
    let set: Vec<u8> = redis::cmd("GET").arg(&sets[0]).query_async(&mut connection).await.expect("get");
    let key = tallyfy_proxy::fleet::EncryptionKey::from_base64(
        &base64::engine::general_purpose::STANDARD.encode(KEY),
    )
    .expect("key");
    assert!(key.open(&sets[0], &set).is_some(), "a set the fleet opens was written over it");
    // A replica starting now takes that set: no sign-in of its own.
    let _peer = Replica::start(&config, &redis.url(), KEY).await;
    assert_eq!(sandbox.token_requests().len(), before + 1);
    assert_eq!(sandbox.double_redemptions(), 0);
    // The first replica took the good set from its news; the same garbage
    // again is a new breakage, reported again.
    eventually(Duration::from_secs(10), "the good set taken", async || replica.logged("token obtained") >= 2)
        .await;
    let mut garbage = redis::cmd("SET");
    garbage.arg(&sets[0]).arg("garbage").arg("KEEPTTL");
    let _: () = garbage.query_async(&mut connection).await.expect("set");
    let _: () = redis::cmd("HINCRBY")
        .arg("test/fleet/generations")
        .arg(&credential)
        .arg(1)
        .query_async(&mut connection)
        .await
        .expect("hincrby");
    let reported = async || replica.metric("tallyfy_proxy_fleet_undecryptable_total").await >= 2.0;
    eventually(Duration::from_secs(10), "the new breakage reported", reported).await;
}

/// Polls `holds` until it does, failing with `what` after `within`.
async fn eventually(within: Duration, what: &str, mut holds: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !holds().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fingerprint a replica sealing with `key` names in Redis.
fn fingerprint_of(key: [u8; 32]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(key);
    tallyfy_proxy::fleet::EncryptionKey::from_base64(&text).expect("key").fingerprint("test/fleet")
}

async fn fleet_fingerprint(connection: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    redis::cmd("GET").arg("test/fleet/key-fingerprint").query_async(connection).await.expect("get")
}

/// How many scripts Redis has run (`EVALSHA` calls since it started).
async fn script_calls(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(connection).await.expect("info");
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

async fn redis_connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url()).expect("url");
    client.get_multiplexed_async_connection().await.expect("connect")
}

/// The sandbox org's guests path, and a fleet config (the fixture user) with a
/// `guest-invites` limit of `max` `POST`s per `per_seconds` on it.
fn guest_invites(sandbox: &Sandbox, max: i64, per_seconds: i64) -> (String, TestConfig) {
    let guests = format!("/api/organizations/{}/guests", tallyfy_sandbox::fixtures::ORG_ID);
    let cap = support::table([
        ("name", "guest-invites".into()),
        ("methods", Value::from(vec!["POST"])),
        ("path", "/api/organizations/{org}/guests".into()),
        ("max", max.into()),
        ("per_seconds", per_seconds.into()),
    ]);
    (guests, fleet_config(sandbox, Credential::fixture_user(), 40_000, 10_000).limit(cap))
}

/// The credential's name in the fleet, from its token set's key.
fn fleet_name(set_key: &str) -> String {
    set_key.rsplit("tokens/").next().expect("the credential's fleet name").to_owned()
}

/// News of a set of generation `generation` for `name`, as a replica sends it.
fn tokens_news(name: &str, generation: u64) -> String {
    serde_json::json!({ "from": 1, "tokens": name, "generation": generation }).to_string()
}

/// Publishes `message` on the fleet's channel, as anyone able to could.
async fn publish(connection: &mut redis::aio::MultiplexedConnection, message: String) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg("test/fleet/news")
        .arg(message)
        .query_async(connection)
        .await
        .expect("publish");
}

/// The sealed token sets' keys.
async fn token_keys(connection: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("KEYS").arg("*/tokens/*").query_async(connection).await.expect("keys")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_30_across_three_replicas_admits_30_in_all_and_429s_are_shared() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let (guests, config) = guest_invites(&sandbox, 30, 3600);
    let replicas = fleet(3, &config, &redis).await;
    let http = client();
    let body = serde_json::json!({ "email": "guest@example.com" });
    let mut admitted = 0;
    for i in 0..60 {
        let url = format!("http://{}{guests}", replicas[i % 3].proxy);
        let status = http.post(url).json(&body).send().await.expect("answered").status();
        if status != 429 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 30, "30 for the fleet, not 30 per replica");
    assert_eq!(sandbox.count("POST", &guests), 30, "the other 30 never reached Tallyfy");

    // Tallyfy's 429 met by one replica holds back the others too.
    let runs = PATH;
    sandbox.fail_api(runs, 1, tallyfy_sandbox::ApiFault::Throttled { retry_after: Some(30) });
    let first = http.get(format!("http://{}{runs}", replicas[0].proxy)).send().await.expect("answered");
    assert_eq!(first.status(), 429, "Tallyfy's own");
    let before = sandbox.count("GET", runs);
    let deadline = Instant::now() + Duration::from_secs(5);
    for replica in &replicas[1..] {
        while replica.metric("tallyfy_proxy_fleet_throttles_learned_total").await < 1.0 {
            assert!(Instant::now() < deadline, "the others heard of it");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answer = http.get(format!("http://{}{runs}", replica.proxy)).send().await.expect("answered");
        assert_eq!(answer.status(), 429);
        let retry_after: u64 =
            answer.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
        assert!((25..=30).contains(&retry_after), "{retry_after}");
    }
    assert_eq!(sandbox.count("GET", runs), before, "answered by the replicas, not by Tallyfy");
}

/// A 429 is told with the principal it was met as: a replica where the
/// credential of that name acts as another user (mid-rollout, or fleets
/// sharing a prefix) does not take it. It did, and held that user back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_learned_only_where_the_credential_acts_as_the_same_user() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let same = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 10_000);
    let replicas = fleet(2, &same, &redis).await;
    // `user` here is a personal token: another principal under the same name.
    let other = fleet_config(
        &sandbox,
        Credential::personal("user", support::Secret::Env(support::TOKEN_ENV)),
        40_000,
        10_000,
    );
    let elsewhere = Replica::start(&other, &redis.url(), KEY).await;
    let http = client();
    sandbox.fail_api(PATH, 1, tallyfy_sandbox::ApiFault::Throttled { retry_after: Some(30) });
    let first = http.get(format!("http://{}{PATH}", replicas[0].proxy)).send().await.expect("answered");
    assert_eq!(first.status(), 429, "Tallyfy's own");
    eventually(Duration::from_secs(5), "the same user's replica heard of it", async || {
        replicas[1].metric("tallyfy_proxy_fleet_throttles_learned_total").await >= 1.0
    })
    .await;
    let held = http.get(format!("http://{}{PATH}", replicas[1].proxy)).send().await.expect("answered");
    assert_eq!(held.status(), 429, "held back for the same user");
    // Told at the same time: the other replica has had it too, and not taken it.
    let before = sandbox.count("GET", PATH);
    let served = http.get(format!("http://{}{PATH}", elsewhere.proxy)).send().await.expect("answered");
    assert_eq!(served.status(), 200, "another user is not held back");
    assert_eq!(sandbox.count("GET", PATH), before + 1, "sent to Tallyfy");
    assert_eq!(elsewhere.metric("tallyfy_proxy_fleet_throttles_learned_total").await, 0.0);
    // A personal token's principal tells no user apart (the token is the
    // user): its 429s are neither told nor learned, so another replica's
    // personal token (perhaps another user's) is not held back.
    let beside = Replica::start(&other, &redis.url(), KEY).await;
    sandbox.fail_api(PATH, 1, tallyfy_sandbox::ApiFault::Throttled { retry_after: Some(30) });
    let met = http.get(format!("http://{}{PATH}", elsewhere.proxy)).send().await.expect("answered");
    assert_eq!(met.status(), 429, "Tallyfy's own");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served = http.get(format!("http://{}{PATH}", beside.proxy)).send().await.expect("answered");
    assert_eq!(served.status(), 200, "not told, not held back");
    assert_eq!(beside.metric("tallyfy_proxy_fleet_throttles_learned_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identitys_rate_limit_counts_across_the_fleet() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let rate = support::table([("per_second", 1.into()), ("burst", 10.into())]);
    let config = TestConfig::new(&sandbox.base_url())
        .set("log", "format", "json")
        .set("fleet", "redis_url", support::table([("env", Value::from("TALLYFY_PROXY_REDIS_URL"))]))
        .set("fleet", "key_prefix", "test/fleet")
        .set("fleet", "encryption_key", support::table([("file", Value::from("fleet-key"))]))
        .credential(Credential::fixture_user())
        .identity(Identity::new("caller", "user", Match::Any).with("rate_limit", rate));
    let replicas = fleet(3, &config, &redis).await;
    let http = client();
    let started = Instant::now();
    let mut admitted = 0;
    for i in 0..30 {
        let url = format!("http://{}{PATH}", replicas[i % 3].proxy);
        if http.get(url).send().await.expect("answered").status() == 200 {
            admitted += 1;
        }
    }
    // A burst of 10 for the fleet, plus one a second while the 30 were sent.
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        (10..=10 + refilled).contains(&admitted),
        "{admitted} admitted: the burst is the fleet's, not each replica's"
    );
}

/// A request the fleet refuses spends nothing on the replica that asked: its
/// local window is given back, so once the fleet's window closes that replica
/// admits again, where its own window (opened by the refused request) used to
/// refuse on for up to another `per`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_fleet_refuses_spends_nothing_locally() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let (guests, config) = guest_invites(&sandbox, 1, 2);
    let replicas = fleet(2, &config, &redis).await;
    let http = client();
    let body = serde_json::json!({ "email": "guest@example.com" });
    let post = |replica: &Replica| http.post(format!("http://{}{guests}", replica.proxy)).json(&body).send();
    assert_ne!(post(&replicas[0]).await.expect("answered").status(), 429, "the fleet's one");
    // The fleet's window opened before that answer came back: it closes by t0 + 2 s.
    let t0 = Instant::now();
    tokio::time::sleep_until((t0 + Duration::from_secs(1)).into()).await;
    let refused = post(&replicas[1]).await.expect("answered");
    assert_eq!(refused.status(), 429, "refused fleet-wide");
    assert_eq!(sandbox.count("POST", &guests), 1);
    // Past the fleet's window, and 0.8 s before the one the refused request
    // would have opened on replica 1.
    tokio::time::sleep_until((t0 + Duration::from_millis(2200)).into()).await;
    assert_ne!(
        post(&replicas[1]).await.expect("answered").status(),
        429,
        "a new window, fleet-wide and here"
    );
    assert_eq!(sandbox.count("POST", &guests), 2);
}

/// A replica's own window opens at its own first request, not the fleet's:
/// holding its admitted requests' count too, it refused (with its own
/// `Retry-After`) after the fleet's window had closed and its budget was
/// unspent. The fleet's windows hold what the fleet admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_nothing_the_fleet_s_new_window_admits() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let (guests, config) = guest_invites(&sandbox, 5, 6);
    let replicas = fleet(2, &config, &redis).await;
    let http = client();
    let body = serde_json::json!({ "email": "guest@example.com" });
    let post = |replica: &Replica| http.post(format!("http://{}{guests}", replica.proxy)).json(&body).send();
    // Replica 1 opens the fleet's window; it closes by t0 + 6 s.
    let t0 = Instant::now();
    assert_ne!(post(&replicas[1]).await.expect("answered").status(), 429);
    // Replica 0 spends the other four three seconds later: its own window
    // opens then, and closes only at t0 + 9 s.
    tokio::time::sleep_until((t0 + Duration::from_millis(3000)).into()).await;
    for _ in 0..4 {
        assert_ne!(post(&replicas[0]).await.expect("answered").status(), 429, "within the fleet's five");
    }
    assert_eq!(post(&replicas[1]).await.expect("answered").status(), 429, "the fleet's five are spent");
    // The fleet's window has closed: five more, all on replica 0.
    tokio::time::sleep_until((t0 + Duration::from_millis(6300)).into()).await;
    for i in 0..5 {
        let status = post(&replicas[0]).await.expect("answered").status();
        assert_ne!(status, 429, "request {i} of the fleet's new window");
    }
    assert_eq!(sandbox.count("POST", &guests), 10);
    // Redis gone mid-window: this replica's own counts decide again, and its
    // window holds what it sent in this one (it gave them back and admitted
    // a fresh five, twice the cap).
    let mut redis = redis;
    redis.stop();
    eventually(Duration::from_secs(2), "the replica noticed Redis gone", async || {
        replicas[0].metric("tallyfy_proxy_fleet_connected").await == 0.0
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(9), "still in replica 0's own window");
    for i in 0..5 {
        let status = post(&replicas[0]).await.expect("answered").status();
        assert_eq!(status, 429, "request {i}: the window's five went from here");
    }
    assert_eq!(sandbox.count("POST", &guests), 10, "none past the cap");
}

/// A request the proxy refuses once its body is read (here a JSON body too
/// large to rewrite its dates in) never reached Tallyfy: it spends nothing,
/// neither its replica's count nor the fleet's budget in Redis. Two refused,
/// one on each replica, leave a fleet-wide cap of one whole for a request that
/// goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_for_its_body_spends_no_fleet_budget() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(SandboxConfig::default()).await;
    let (guests, config) = guest_invites(&sandbox, 1, 60);
    let replicas = fleet(2, &config.set("dates", "max_body_bytes", 1024), &redis).await;
    let http = client();
    let too_large = serde_json::json!({ "email": "guest@example.com", "deadline": "2026-01-01 10:00:00", "pad": "x".repeat(2000) });
    for replica in &replicas {
        let refused = http.post(format!("http://{}{guests}", replica.proxy)).json(&too_large).send().await;
        assert_eq!(refused.expect("answered").status(), 413);
    }
    let body = serde_json::json!({ "email": "guest@example.com" });
    let sent = http.post(format!("http://{}{guests}", replicas[0].proxy)).json(&body).send().await;
    assert_ne!(sent.expect("answered").status(), 429, "the fleet's one is still there");
    assert_eq!(sandbox.count("POST", &guests), 1);
}

/// What anyone who can write to the fleet's Redis (or publish on its channel)
/// could do to the replicas, none of which leaks a token but each of which
/// cost Tallyfy calls or held the fleet down:
/// - news of a generation the fleet's set is not at made a replica refresh,
///   once a message (each refresh rotating the credential's tokens), whether
///   published or written into the polled generations;
/// - news of a 429 naming a megabytes-long organisation was kept for an hour
///   (here a burst throttle: the whole credential held back);
/// - a fence past 2^53 was written back as `1e+17`, which no holder's fence
///   matched: nothing was shared again;
/// - a token set of megabytes was read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_writer_makes_no_replica_refresh_learn_megabytes_or_stop_sharing() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3600))).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 40_000, 1_000);
    let mut connection = redis_connection(&redis).await;
    // A fence INCR cannot go past, before any lease is taken.
    let _: () = redis::cmd("SET")
        .arg("test/fleet/fence")
        .arg("9223372036854775807")
        .query_async(&mut connection)
        .await
        .expect("set");
    let replica = Replica::start(&config, &redis.url(), KEY).await;
    let keys = token_keys(&mut connection).await;
    assert_eq!(keys.len(), 1, "the first token was shared under the lease: {keys:?}");
    let name = fleet_name(&keys[0]);

    let grants = sandbox.token_requests().len();
    for generation in [u64::MAX, u64::MAX - 1, 1 << 60] {
        publish(&mut connection, tokens_news(&name, generation)).await;
    }
    let _: i64 = redis::cmd("HSET")
        .arg("test/fleet/generations")
        .arg(&name)
        .arg(u64::MAX - 2)
        .query_async(&mut connection)
        .await
        .expect("hset");
    // Another type under the set's key: no set, and no error (an error marked
    // Redis away, budgets skipping it, at every poll).
    let _: () = redis::cmd("DEL").arg(&keys[0]).query_async(&mut connection).await.expect("del");
    let _: i64 =
        redis::cmd("HSET").arg(&keys[0]).arg("x").arg("y").query_async(&mut connection).await.expect("hset");
    // A generation that is no number, beside the credential's: skipped, no error.
    let _: i64 = redis::cmd("HSET")
        .arg("test/fleet/generations")
        .arg("someone-else")
        .arg("notanumber")
        .query_async(&mut connection)
        .await
        .expect("hset");
    let principal = name.clone();
    let throttled = serde_json::json!({
        "from": 1, "throttled": "user", "principal": principal, "wait_ms": 3_600_000u64,
        "hourly": false, "org": "x".repeat(1 << 20), "limit": "GET /api/me",
    });
    publish(&mut connection, throttled.to_string()).await;
    // Past a poll of the generations (every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(sandbox.token_requests().len(), grants, "news is a hint: no grant for it");
    assert_eq!(replica.logged("unreachable"), 0, "{:?}", replica.trouble());
    let answer = client().get(format!("http://{}{PATH}", replica.proxy)).send().await.expect("answered");
    assert_eq!(answer.status(), 200, "nothing learned from the oversized 429");

    // A fence no exact number holds (written back as `1e+17`), and a token set
    // of megabytes under the key: not read, replaced under the lease.
    let _: () = redis::cmd("SET")
        .arg("test/fleet/fence")
        .arg("99999999999999999")
        .query_async(&mut connection)
        .await
        .expect("set");
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg(vec![0u8; 4 << 20])
        .arg("PX")
        .arg(60_000)
        .query_async(&mut connection)
        .await
        .expect("set");
    let second = Replica::start(&config, &redis.url(), KEY).await;
    assert_eq!(second.metric("tallyfy_proxy_fleet_undecryptable_total").await, 0.0, "never opened: not read");
    let length: usize =
        redis::cmd("STRLEN").arg(&keys[0]).query_async(&mut connection).await.expect("strlen");
    assert!(length < 64 * 1024, "a real set replaced it: {length} bytes");
    assert!(
        replica.trouble().is_empty() && second.trouble().is_empty(),
        "{:?} {:?}",
        replica.trouble(),
        second.trouble()
    );

    // The generations of another type: no news at a poll, and no error.
    let _: () = redis::cmd("SET")
        .arg("test/fleet/generations")
        .arg("x")
        .query_async(&mut connection)
        .await
        .expect("set");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(replica.logged("unreachable") + second.logged("unreachable"), 0, "{:?}", replica.trouble());

    // News of the very generation the fleet's next refresh will write (the
    // next fence, which a Redis writer sets), heard before that refresh and
    // found not written yet, or news of u64::MAX, once left a replica deaf to
    // the real news: after another replica's refresh (which ends the token it
    // held), its next request, one that cannot be sent twice, went with the
    // dead token.
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut connection).await.expect("time");
    let ahead = seconds * 1000 + micros / 1000 + 100_000_000;
    let _: () =
        redis::cmd("SET").arg("test/fleet/fence").arg(ahead).query_async(&mut connection).await.expect("set");
    for generation in [ahead + 1, u64::MAX] {
        publish(&mut connection, tokens_news(&name, generation)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let obtained = replica.logged("token obtained");
    sandbox.revoke_all_tokens();
    let refreshed = client().get(format!("http://{}{PATH}", second.proxy)).send().await.expect("answered");
    assert_eq!(refreshed.status(), 200, "the second replica refreshed for the fleet");
    let heard = async || replica.logged("token obtained") > obtained;
    eventually(Duration::from_secs(5), "the first replica took the fleet's new set from its news", heard)
        .await;
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"chunk"))]);
    let streamed = client()
        .post(format!(
            "http://{}/api/organizations/{}/file",
            replica.proxy,
            tallyfy_sandbox::fixtures::ORG_ID
        ))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("answered");
    assert_ne!(streamed.status(), 401, "sent with the fleet's new token");
}

/// A dead-token 401 that comes while a replica looks at the fleet's set (news
/// of it, here forged, while a lease is held) is judged once that look ends:
/// finding nothing newer, it refreshes, and the request goes again with the
/// new token. The look used to release it with Tallyfy's 401, no refresh
/// forced (a flood of forged news made that happen to live traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_during_a_look_at_the_fleets_set_still_refreshes() {
    let _alone = ONE_SCENARIO_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await;
    let sandbox = start_sandbox_with(sandbox_config(Duration::from_secs(3600))).await;
    let config = fleet_config(&sandbox, Credential::fixture_user(), 4_000, 1_000);
    let replica = Replica::start(&config, &redis.url(), KEY).await;
    let mut connection = redis_connection(&redis).await;
    let keys = token_keys(&mut connection).await;
    let name = fleet_name(&keys[0]);
    // A lease someone else holds for 1.5 s, and news: the replica's look at
    // the set waits for that holder's set (up to a third of the lease).
    let _: () = redis::cmd("SET")
        .arg(format!("test/fleet/lease/{name}"))
        .arg("1")
        .arg("PX")
        .arg(1_500)
        .query_async(&mut connection)
        .await
        .expect("set");
    publish(&mut connection, tokens_news(&name, u64::MAX - 7)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    sandbox.revoke_all_tokens();
    let answer = client().get(format!("http://{}{PATH}", replica.proxy)).send().await.expect("answered");
    assert_eq!(answer.status(), 200, "refreshed once the look ended: {:#?}", replica.trouble());
}
