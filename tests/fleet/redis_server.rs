//! A real `redis-server` for a test: on a free loopback port, in a temp dir,
//! persistence off, stopped when dropped. `./scripts/test` installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        for _ in 0..5 {
            let port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                probe.local_addr().expect("addr").port()
            };
            let dir = tempfile::tempdir().expect("dir");
            let mut server = RedisServer { child: None, addr: ([127, 0, 0, 1], port).into(), dir };
            if server.run().await {
                return server;
            }
        }
        panic!("redis-server did not start (is it installed? ./scripts/test installs it)");
    }

    /// Starts (again) on the same port; whether it answered PING.
    pub async fn run(&mut self) -> bool {
        let child = Command::new(redis_binary())
            .args(["--bind", "127.0.0.1", "--port", &self.addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.addr).await {
                // Ours, and not another test's server that took the port first.
                let pid = self.child.as_ref().map(Child::id);
                return pid.is_some() && server_pid(self.addr).await == pid;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false; // exited: the port was taken
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Stops it (SIGKILL) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_binary() -> PathBuf {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
    else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut answer)).await,
        Ok(Ok(_)) if &answer == b"+PONG\r\n"
    )
}

/// The `process_id` the server at `addr` reports.
async fn server_pid(addr: SocketAddr) -> Option<u32> {
    let client = redis::Client::open(format!("redis://{addr}/")).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await.ok()?;
    info.lines().find_map(|line| line.strip_prefix("process_id:")).and_then(|pid| pid.trim().parse().ok())
}
