//! The `tallyfy-proxy` command: parses the command line, loads the config, binds,
//! and hands over to the library. Bad configuration exits 64 (EX_USAGE).

use std::io::Read;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tallyfy_proxy::app::{self, Listeners};
use tallyfy_proxy::config::{Config, ConfigError};
use tallyfy_proxy::telemetry;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// mimalloc rather than the system's malloc (default `mimalloc` feature): less
/// CPU per request (2.5 %, and 7 % on a noisier stretch, in A/B runs), less
/// memory per connection, and memory given back after a burst of connections
/// where glibc's heap keeps its peak (README: Performance).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration the proxy refuses (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status when the proxy cannot start or fails while running.
const EXIT_RUNTIME: u8 = 1;

/// An authenticating reverse proxy for Tallyfy's REST API.
///
/// Legacy apps send /api/* requests to the proxy; it identifies the app, swaps its
/// credentials for a fresh Tallyfy bearer token, adds X-Tallyfy-Client and
/// forwards to Tallyfy.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Path of the configuration file.
    #[arg(long, short, global = true, env = "TALLYFY_PROXY_CONFIG", default_value = "proxy.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Run,
    /// Validate the configuration, resolve its secrets, print a summary and exit:
    /// 0 when it is valid, 64 with one line naming file, line and key when not.
    Check,
    /// Start an embedded fake Tallyfy and a proxy configured against it, for trying
    /// the proxy with no Tallyfy account and no internet access.
    #[cfg(feature = "sandbox")]
    Sandbox {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where /livez and /readyz are served.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
    },
    /// Read an API key (or a Basic password) on standard input and print its
    /// SHA-256, for `api_key_sha256` / `password_sha256` in the config. One
    /// trailing newline is ignored.
    HashKey,
}

fn main() -> ExitCode {
    keep_pages_small();
    keep_secrets_out_of_core_dumps();
    let cli = Cli::parse();
    let runtime = match single_threaded_runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tallyfy-proxy: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = match cli.command.unwrap_or(Command::Run) {
        Command::Run => runtime.block_on(run(&cli.config.config, cpus())),
        Command::Check => check(&cli.config.config),
        #[cfg(feature = "sandbox")]
        Command::Sandbox { listen, admin } => runtime.block_on(sandbox(listen, admin)),
        Command::HashKey => hash_key(),
    };
    // The last access lines, which may be waiting for their timer.
    tallyfy_proxy::access_log::flush_thread();
    code
}

/// Asks Linux for no transparent huge pages in this process. A host set to
/// `always` would otherwise back the allocator's regions with 2 MiB pages and
/// add megabytes of RSS for a few KiB used (14.2 instead of 9.1 MiB idle). Where
/// it cannot be asked, memory is only larger.
fn keep_pages_small() {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// Makes the process leave no core dump and refuse ptrace by other processes
/// of its user, before any secret is read: a core holds every token, client
/// secret, password and key in clear (container runtimes often allow cores of
/// any size), and another container running as the same user could read them
/// live. Where it cannot be asked, nothing else changes.
fn keep_secrets_out_of_core_dumps() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
        let _ = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) });
        let _ = set_dumpable_behavior(DumpableBehavior::NotDumpable);
    }
}

/// How many runtime threads serve the proxy port: one per CPU the process may
/// use (cgroup quotas included), each with its own socket of the port.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A runtime on the calling thread. Each CPU gets one (see [`cpus`]): requests
/// never migrate between threads, so no work-stealing is paid for and no cache
/// line is shared per request (Pingora's "no steal" model).
fn single_threaded_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Access lines are written in batches; a thread with nothing to do writes
        // its own within 50 ms.
        .on_thread_park(tallyfy_proxy::access_log::on_park)
        .on_thread_stop(tallyfy_proxy::access_log::flush_thread)
        .build()
}

/// Starts a thread with its own runtime serving `listener`, one more socket of
/// the proxy port, until shutdown.
fn serve_on_own_thread(
    running: &app::Running,
    listener: std::net::TcpListener,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let server = running.proxy_server(listener);
    std::thread::Builder::new().name("tallyfy-proxy".to_owned()).spawn(
        move || match single_threaded_runtime() {
            Ok(runtime) => {
                runtime.block_on(server);
                tallyfy_proxy::access_log::flush_thread();
            }
            Err(error) => tracing::error!(%error, "cannot start a runtime thread"),
        },
    )
}

fn hash_key() -> ExitCode {
    let mut key = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut key) {
        eprintln!("tallyfy-proxy hash-key: cannot read standard input: {error}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    let key = key.strip_suffix(b"\n").map(|k| k.strip_suffix(b"\r").unwrap_or(k)).unwrap_or(&key);
    if key.is_empty() {
        eprintln!(
            "tallyfy-proxy hash-key: standard input is empty; pipe the key in, e.g. `printf %s \"$KEY\" | tallyfy-proxy hash-key`"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let digest = tallyfy_proxy::identity::sha256(key);
    println!("{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>());
    ExitCode::SUCCESS
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|error: ConfigError| {
        eprintln!("{error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        println!("warning: {warning}");
    }
    println!("{}: ok", config.file.display());
    println!("  listen.proxy  {}", config.listen.proxy);
    println!("  listen.admin  {}", config.listen.admin);
    println!("  upstream      {}", config.upstream.base_url);
    println!("  token_url     {}", config.upstream.token_url);
    for (credential, sources) in config.credentials.iter().zip(&config.credential_sources) {
        let sources: Vec<String> =
            sources.iter().map(|(field, source)| format!("{field} from {}", source.describe())).collect();
        println!("  credential    {} ({}; {})", credential.name, credential.kind.name(), sources.join(", "));
    }
    for identity in &config.identities {
        println!(
            "  identity      {} -> {} ({:?})",
            identity.name,
            config.credential(identity.credential).name,
            identity.matcher
        );
    }
    print_traffic(&config);
    if let Some(fleet) = &config.fleet {
        // The URL may hold a password: only its scheme is shown.
        let url = fleet.redis_url.expose();
        let tls = match url.starts_with("rediss://") {
            true if tallyfy_proxy::config::unverified_tls(url) => "rediss, TLS without a certificate check",
            true => "rediss, TLS",
            false => "redis",
        };
        println!(
            "  fleet         {} ({tls}), lease {} ms, tokens sealed with AES-256-GCM; budgets count fleet-wide",
            fleet.key_prefix,
            fleet.lease.as_millis()
        );
    }
    ExitCode::SUCCESS
}

/// The limits `check` loaded: each identity's, each `[[limits]]` rule, retries.
fn print_traffic(config: &Config) {
    for identity in &config.identities {
        if let Some(rate) = identity.limits.rate {
            println!(
                "  limit         {}.rate_limit: {}/s, burst {}",
                identity.name, rate.per_second, rate.burst
            );
        }
        if let Some(max) = identity.limits.max_in_flight {
            println!("  limit         {}.max_in_flight: {max} open at once", identity.name);
        }
    }
    for rule in &config.traffic.rules {
        let methods = rule.methods.as_ref().map_or("any method".to_owned(), |methods| {
            methods.iter().map(http::Method::as_str).collect::<Vec<_>>().join(",")
        });
        println!(
            "  limit         {}: {} per {} s, {methods} {}, per organisation and credential",
            rule.name,
            rule.max,
            rule.per.as_secs(),
            rule.path
        );
    }
    let traffic = &config.traffic;
    if traffic.retry.attempts > 1 {
        let methods = if traffic.retry.retry_unsafe {
            "GET, HEAD, OPTIONS; PUT, DELETE after a refused connection or a 503"
        } else {
            "GET, HEAD, OPTIONS"
        };
        println!(
            "  retry         {} sends at most ({methods}), budget {} % of the last 10 s",
            traffic.retry.attempts, traffic.retry.budget_percent
        );
    }
    if !traffic.retry_429_max_wait.is_zero() {
        println!("  429           waited out up to {} ms", traffic.retry_429_max_wait.as_millis());
    }
    if config.listen.unprefixed {
        println!("  unprefixed    paths outside /api are read as under it");
    }
}

async fn run(path: &Path, threads: usize) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    telemetry::init(config.log.format, &config.log.level);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // Installed before the listeners open, so an early SIGHUP reloads and an
    // early SIGTERM drains, rather than either killing a half-started proxy.
    let stop = StopSignals::install();
    let hangup = match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reload by changing the files");
            None
        }
    };
    let bound = app::bind_shared(config.listen.proxy, threads).and_then(|mut sockets| {
        let first = tokio::net::TcpListener::from_std(sockets.remove(0))?;
        Ok((first, sockets))
    });
    let (proxy, more) = match bound {
        Ok(bound) => bound,
        Err(error) => {
            tracing::error!(%error, "cannot bind the proxy listener");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let admin = match tokio::net::TcpListener::bind(config.listen.admin).await {
        Ok(admin) => admin,
        Err(error) => {
            tracing::error!(%error, "cannot bind the admin listener");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let mut running = match app::start(&config, Listeners { proxy, admin }).await {
        Ok(running) => running,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let mut threads = Vec::new();
    for listener in more {
        match serve_on_own_thread(&running, listener) {
            Ok(thread) => threads.push(thread),
            Err(error) => tracing::warn!(%error, "cannot start a runtime thread; serving on fewer"),
        }
    }
    let reload = running.reload_handle();
    tokio::spawn(async move {
        if let Some(mut hangup) = hangup {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                reload.request();
            }
        }
    });
    stop.received().await;
    tracing::info!(
        grace_ms = config.server.shutdown_grace.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    running.begin_shutdown();
    // The other threads drain while this one keeps refreshing tokens for them.
    for thread in threads {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    running.stopped().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

#[cfg(feature = "sandbox")]
async fn sandbox(listen: std::net::SocketAddr, admin: std::net::SocketAddr) -> ExitCode {
    telemetry::init(tallyfy_proxy::config::LogFormat::Text, "info");
    let stop = StopSignals::install();
    let mut mode = match tallyfy_proxy::sandbox_mode::start(listen, admin).await {
        Ok(mode) => mode,
        Err(error) => {
            eprintln!("tallyfy-proxy sandbox: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    mode.proxy.ready().await;
    println!("{}", mode.banner());
    stop.received().await;
    mode.proxy.begin_shutdown();
    mode.proxy.stopped().await;
    ExitCode::SUCCESS
}

/// SIGINT and SIGTERM, listened for from before the listeners open: a stop
/// that arrives while the proxy is starting drains it and exits 0, instead of
/// the signal's default action killing it half-started.
struct StopSignals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl StopSignals {
    fn install() -> Self {
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for {name}");
                None
            }
        };
        StopSignals {
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
        }
    }

    /// Resolves on the first SIGINT or SIGTERM.
    async fn received(mut self) {
        async fn next(signal: &mut Option<Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(&mut self.interrupt) => {}
            () = next(&mut self.terminate) => {}
        }
    }
}
