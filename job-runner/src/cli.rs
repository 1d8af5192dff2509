//! The `job-runner` command line: subcommands, their flags, and what each one does.
//!
//! Exit codes: 0 on success and after a clean shutdown; 1 when a command fails; 69
//! (`EX_UNAVAILABLE`) when Redis cannot be reached at startup; 75 (`EX_TEMPFAIL`) when
//! `lock exec` cannot take or loses its lock; 78 (`EX_CONFIG`) on a configuration error;
//! 130 after a second shutdown signal. `lock exec` otherwise passes on its child's code.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use fencelock::{Redlock, RetryPolicy};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, FileConfig, LogFormat, Overrides, Settings, redact};
use crate::exec::{ChildEnd, ChildIo, EX_TEMPFAIL, ExecHandler, run_child};
use crate::handler::{Noop, Registry};
use crate::job::NewJob;
use crate::ledger::Ledger;
use crate::payment::{PaymentHandler, SimulatedGateway};
use crate::queue::{DeadRetryError, Queue, QueueError};
use crate::telemetry::{self, Health};
use crate::worker::{Runner, error_chain};

/// Prints a line on stdout; a closed stdout (`job-runner info | head -1`) is not an error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// As `say!`, without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// Exit code: configuration error.
pub const EX_CONFIG: i32 = 78;
/// Exit code: a service could not be reached at startup.
pub const EX_UNAVAILABLE: i32 = 69;

const EXAMPLES: &str = "\
Examples:
  # Run 16 workers against three lock nodes and a queue Redis
  job-runner run --lock-nodes redis://a:6379,redis://b:6379,redis://c:6379 --queue redis://q:6379 -c 16

  # Enqueue a payment (the built-in `payment` kind pays an order in the SQLite ledger)
  job-runner enqueue payment --resource order:42 --payload '{\"order_id\":42,\"amount_cents\":1999}'

  # Queue depth, pending, delayed, dead, and locks held per node
  job-runner info

  # Inspect and retry dead letters
  job-runner dead list
  job-runner dead retry --all

  # A distributed flock: run a command while holding a lock
  job-runner lock exec --resource nightly-report -- ./report.sh

  # Prove the payment ledger charged every order exactly once
  job-runner ledger audit --ledger job-runner-ledger.db

Settings come from flags, then JOB_RUNNER_* variables (REDIS_URL for the queue), then the
TOML file given with --config, then defaults.";

/// A lock-guarded job runner: jobs from a Redis Stream, each run under a quorum lock with
/// a fencing token.
#[derive(Debug, Parser)]
#[command(name = "job-runner", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// Settings shared by every subcommand.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings shared by every subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, global = true, env = "JOB_RUNNER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The queue's Redis URL [env: JOB_RUNNER_QUEUE, then REDIS_URL] [default: redis://127.0.0.1:6379]
    #[arg(long, global = true, value_name = "URL")]
    pub queue: Option<String>,
    /// The queue's name, the prefix of its keys [default: jobs]
    #[arg(
        long,
        global = true,
        env = "JOB_RUNNER_QUEUE_NAME",
        value_name = "NAME"
    )]
    pub queue_name: Option<String>,
    /// The largest job, in bytes, that `enqueue` writes and `run` runs; larger entries
    /// found in the queue are dead-lettered unparsed [default: 1048576]
    #[arg(
        long,
        global = true,
        env = "JOB_RUNNER_MAX_PAYLOAD_BYTES",
        value_name = "BYTES"
    )]
    pub max_payload_bytes: Option<usize>,
    /// The most dead letters kept; writing one more drops the oldest [default: 100000]
    #[arg(
        long,
        global = true,
        env = "JOB_RUNNER_MAX_DEAD_LETTERS",
        value_name = "N"
    )]
    pub max_dead_letters: Option<u64>,
    /// Lock nodes, comma-separated Redis URLs.
    #[arg(
        long,
        global = true,
        env = "JOB_RUNNER_LOCK_NODES",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub lock_nodes: Option<Vec<String>>,
    /// Log format [default: text]
    #[arg(long, global = true, env = "JOB_RUNNER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run workers until SIGTERM or SIGINT (a second signal exits at once).
    Run(RunArgs),
    /// Add a job to the queue.
    Enqueue(EnqueueArgs),
    /// Show queue depth, pending, delayed and dead counts, and locks held per node.
    Info,
    /// Inspect and retry dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Distributed locking from the shell.
    #[command(subcommand)]
    Lock(LockCommand),
    /// The payment ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

/// `ledger` subcommands.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Check "charged exactly once" over the attempt log; exits 1 on any violation.
    Audit {
        /// The ledger file [default: the `ledger` setting]
        #[arg(long, env = "JOB_RUNNER_LEDGER", value_name = "FILE")]
        ledger: Option<PathBuf>,
    },
}

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Jobs at once [default: 16]
    #[arg(short = 'c', long, env = "JOB_RUNNER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Threads for async work; 1 runs everything on one thread, which is fastest for
    /// the built-in handlers (none blocks; the ledger uses a blocking pool) [default: 1]
    #[arg(long, env = "JOB_RUNNER_THREADS")]
    pub threads: Option<usize>,
    /// Seconds the runner takes at most to stop on a signal: jobs still running in the last
    /// fifth are cancelled and put back [default: 25]
    #[arg(short = 't', long = "timeout", env = "JOB_RUNNER_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Exit once the queue is drained (nothing waiting, delayed, pending or running).
    #[arg(long)]
    pub once: bool,
    /// This process's consumer name [default: HOSTNAME-PID-RANDOM]
    #[arg(long, env = "JOB_RUNNER_CONSUMER")]
    pub consumer: Option<String>,
    /// Lock TTL in ms; locks are auto-extended while a job runs [default: 10000]
    #[arg(long, env = "JOB_RUNNER_LOCK_TTL_MS")]
    pub lock_ttl_ms: Option<u64>,
    /// How long a lock command waits for one node, in ms [default: 50]
    #[arg(long, env = "JOB_RUNNER_LOCK_NODE_TIMEOUT_MS")]
    pub lock_node_timeout_ms: Option<u64>,
    /// Idle time in ms after which another runner reclaims an unacknowledged job [default: 30000]
    #[arg(long, env = "JOB_RUNNER_VISIBILITY_TIMEOUT_MS")]
    pub visibility_timeout_ms: Option<u64>,
    /// Longest a job may run, in seconds [default: 300]
    #[arg(long, env = "JOB_RUNNER_JOB_TIMEOUT_SECS")]
    pub job_timeout_secs: Option<u64>,
    /// Attempts before a failing job goes to dead letters; a job handed out more times
    /// than this without finishing (its runners crashed on it) goes there too [default: 5]
    #[arg(long, env = "JOB_RUNNER_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Retry delay after a first failure, in ms; it doubles per attempt [default: 1000]
    #[arg(long, env = "JOB_RUNNER_BACKOFF_BASE_MS")]
    pub backoff_base_ms: Option<u64>,
    /// Longest retry delay, in ms [default: 60000]
    #[arg(long, env = "JOB_RUNNER_BACKOFF_MAX_MS")]
    pub backoff_max_ms: Option<u64>,
    /// Where /metrics and /healthz listen, or `off` [default: 127.0.0.1:9464]
    #[arg(long, env = "JOB_RUNNER_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// The payment ledger's SQLite file [default: job-runner-ledger.db]
    #[arg(long, env = "JOB_RUNNER_LEDGER", value_name = "FILE")]
    pub ledger: Option<PathBuf>,
    /// Turn the ledger's fencing check off, to demonstrate what it prevents. Never in production.
    #[arg(long, env = "JOB_RUNNER_UNSAFE_NO_FENCING")]
    pub unsafe_no_fencing: bool,
    /// Highest latency of the simulated payment gateway, in ms [default: 0]
    #[arg(long, env = "JOB_RUNNER_GATEWAY_LATENCY_MS")]
    pub gateway_latency_ms: Option<u64>,
    /// Fraction of simulated charges that fail transiently [default: 0]
    #[arg(long, env = "JOB_RUNNER_GATEWAY_FAILURE_RATE")]
    pub gateway_failure_rate: Option<f64>,
    /// An exec job kind and the shell command it runs, e.g. `report=./report.sh` (repeatable).
    #[arg(long = "exec", value_name = "KIND=COMMAND", value_parser = parse_exec)]
    pub exec: Vec<(String, String)>,
    /// The runner's environment variables exec commands get besides the job's own; all
    /// others are withheld [default: PATH,HOME,LANG,LC_ALL,TZ,TMPDIR]
    #[arg(
        long,
        env = "JOB_RUNNER_EXEC_ENV",
        value_name = "NAME,...",
        value_delimiter = ','
    )]
    pub exec_env: Option<Vec<String>>,
    /// Print the settings in force, as TOML, and exit.
    #[arg(long)]
    pub print_config: bool,
}

fn parse_exec(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((kind, cmd)) if !kind.is_empty() && !cmd.is_empty() => {
            Ok((kind.to_owned(), cmd.to_owned()))
        }
        _ => Err(format!("expected KIND=COMMAND, got `{s}`")),
    }
}

/// Flags of `enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The job kind, e.g. `payment`.
    pub kind: String,
    /// The lock key the job runs under, e.g. `order:42`.
    #[arg(long)]
    pub resource: String,
    /// The payload, as JSON.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Enqueue this many copies (duplicates are harmless for idempotent handlers).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

/// `dead` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead letters, oldest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Put dead letters back in the queue with their attempts reset.
    Retry {
        /// The dead-letter entry id (from `dead list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// `lock` subcommands.
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Run a command while holding a lock on RESOURCE, like flock(1) across machines. The
    /// child gets FENCING_TOKEN and LOCK_RESOURCE in its environment. If the lock is lost,
    /// the child gets SIGTERM (then SIGKILL) and the exit code is 75.
    Exec(LockExecArgs),
}

/// Flags of `lock exec`.
#[derive(Debug, Args)]
pub struct LockExecArgs {
    /// The lock key.
    #[arg(long)]
    pub resource: String,
    /// Lock TTL in ms; auto-extended while the command runs.
    #[arg(long, default_value_t = 10_000)]
    pub ttl_ms: u64,
    /// How long to wait for the lock, in seconds; 0 tries once [default: 30; when not
    /// given and too many lock nodes are unreachable for a quorum, fails at once].
    #[arg(long)]
    pub wait_secs: Option<u64>,
    /// The longest the lock is held, in seconds: a command still running then gets
    /// SIGTERM and the exit code is 75, as for a lost lock.
    #[arg(long, default_value_t = 3600)]
    pub max_hold_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when the child must stop.
    #[arg(long, default_value_t = 5)]
    pub kill_grace_secs: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl Cli {
    /// The settings in force: flags, then environment, then the `--config` file, then
    /// defaults.
    ///
    /// # Errors
    ///
    /// A setting that is invalid, by key.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let file = match &self.global.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut o = Overrides {
            queue: self
                .global
                .queue
                .clone()
                .or_else(|| env("JOB_RUNNER_QUEUE")),
            redis_url: env("REDIS_URL"),
            queue_name: self.global.queue_name.clone(),
            max_payload_bytes: self.global.max_payload_bytes,
            max_dead_letters: self.global.max_dead_letters,
            lock_nodes: self.global.lock_nodes.clone(),
            log_format: self.global.log_format,
            ..Overrides::default()
        };
        if let Command::Run(run) = &self.command {
            o.concurrency = run.concurrency;
            o.threads = run.threads;
            o.shutdown_timeout_secs = run.shutdown_timeout_secs;
            o.consumer = run.consumer.clone();
            o.lock_ttl_ms = run.lock_ttl_ms;
            o.lock_node_timeout_ms = run.lock_node_timeout_ms;
            o.backoff_base_ms = run.backoff_base_ms;
            o.backoff_max_ms = run.backoff_max_ms;
            o.visibility_timeout_ms = run.visibility_timeout_ms;
            o.job_timeout_secs = run.job_timeout_secs;
            o.max_attempts = run.max_attempts;
            o.metrics_addr = run.metrics_addr.clone();
            o.ledger = run.ledger.clone();
            o.ledger_fencing = run.unsafe_no_fencing.then_some(false);
            o.gateway_latency_ms = run.gateway_latency_ms;
            o.gateway_failure_rate = run.gateway_failure_rate;
            o.exec = run.exec.clone();
            o.exec_env = run.exec_env.clone();
        }
        Settings::resolve(o, file)
    }
}

/// A failure that ends the command with an exit code.
#[derive(Debug)]
pub struct Exit {
    /// The code.
    pub code: i32,
    /// What to print on stderr.
    pub message: String,
}

impl Exit {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Exit {
            code,
            message: message.into(),
        }
    }
}

impl From<ConfigError> for Exit {
    fn from(e: ConfigError) -> Self {
        Exit::new(EX_CONFIG, e.to_string())
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits the process at once with
/// code 130; jobs still running stay unacknowledged and are reclaimed by other runners.
pub async fn shutdown_signal() {
    let mut signals = Signals::new();
    signals.next().await;
    tracing::info!("shutdown requested; send the signal again to exit at once");
    // The same handlers stay installed, so a second signal that comes quickly is not lost.
    tokio::spawn(async move {
        signals.next().await;
        eprintln!("job-runner: second signal, exiting now; unfinished jobs stay pending");
        // `exit` runs no destructors: take the children down first, or a `lock exec`
        // command would run on after its lock expires.
        crate::exec::kill_children();
        std::process::exit(130);
    });
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = signal(SignalKind::terminate())
            .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
            .ok();
        Signals { streams }
    }

    async fn next(&mut self) {
        match &mut self.streams {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Runs the parsed command. `shutdown` stops `run` (and `lock exec`) when it resolves.
///
/// # Errors
///
/// An [`Exit`] with the code and message to end the process with.
///
/// # Cancel safety
///
/// Resolve `shutdown` rather than dropping the future. If it is dropped anyway, locks held
/// by running jobs or by `lock exec` are released in the background (or expire by their
/// TTL), a `lock exec` child is killed, and unfinished jobs stay pending for another runner.
pub async fn dispatch(
    cli: Cli,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, Exit> {
    match cli.command {
        Command::Run(args) => {
            if args.print_config {
                say_raw!("{}", settings.to_toml());
                return Ok(0);
            }
            run(settings, args.once, shutdown).await.map(|()| 0)
        }
        Command::Enqueue(args) => enqueue(&settings, args).await.map(|()| 0),
        Command::Info => info(&settings).await.map(|()| 0),
        Command::Dead(cmd) => dead(&settings, cmd).await.map(|()| 0),
        Command::Lock(LockCommand::Exec(args)) => lock_exec(&settings, args, shutdown).await,
        Command::Ledger(LedgerCommand::Audit { ledger }) => {
            let path = ledger.unwrap_or(settings.ledger);
            if !path.exists() {
                return Err(Exit::new(1, format!("no ledger at {}", path.display())));
            }
            let audit = Ledger::open(&path)
                .and_then(|l| l.audit())
                .map_err(|e| Exit::new(1, error_chain(&e)))?;
            say!("{audit}");
            Ok(if audit.violations() == 0 { 0 } else { 1 })
        }
    }
}

async fn connect_queue(settings: &Settings, consumer: &str) -> Result<Queue, Exit> {
    Queue::connect(&settings.queue, &settings.queue_name, consumer)
        .await
        .map(|q| {
            q.max_entry_bytes(settings.max_payload_bytes)
                .max_dead(settings.max_dead_letters)
        })
        .map_err(|e| {
            Exit::new(
                EX_UNAVAILABLE,
                format!(
                    "cannot reach the queue at {}: {}",
                    redact(&settings.queue),
                    error_chain(&e)
                ),
            )
        })
}

/// The lock client. Its restart quarantine covers `longest_ttl`, the longest TTL this
/// process locks with: a lock node that restarted without its data must not vote again
/// while a lock it granted may still be valid.
async fn connect_locks(settings: &Settings, longest_ttl: Duration) -> Result<Redlock, Exit> {
    let nodes = settings.require_lock_nodes()?;
    Redlock::builder()
        .nodes(nodes.iter().cloned())
        .node_timeout(Duration::from_millis(settings.lock_node_timeout_ms))
        .restart_quarantine(longest_ttl.max(fencelock::DEFAULT_RESTART_QUARANTINE))
        .fencing(true)
        .build()
        .await
        .map_err(|e| Exit::new(EX_CONFIG, format!("config error in `lock_nodes`: {e}")))
}

/// `job-runner run`: the runner, its handlers, and the metrics endpoint, until `shutdown`.
///
/// # Errors
///
/// On a configuration error or when the queue or the ledger cannot be opened.
///
/// # Cancel safety
///
/// As [`Runner::run`]: resolve `shutdown` for a graceful stop; a dropped future leaves
/// unfinished jobs pending and their locks released in the background.
pub async fn run(
    settings: Settings,
    once: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Exit> {
    let locks = connect_locks(&settings, settings.lock_ttl()).await?;
    let queue = connect_queue(&settings, &settings.consumer).await?;
    let ledger = Ledger::open_with(&settings.ledger, settings.ledger_fencing).map_err(|e| {
        Exit::new(
            1,
            format!(
                "cannot open the ledger {}: {}",
                settings.ledger.display(),
                error_chain(&e)
            ),
        )
    })?;
    if !settings.ledger_fencing {
        tracing::warn!("the ledger's fencing check is OFF: stale writes will be accepted");
    }
    let gateway = SimulatedGateway::new(
        Duration::ZERO,
        Duration::from_millis(settings.gateway_latency_ms),
        settings.gateway_failure_rate,
    );
    let mut handlers = Registry::new()
        .with("payment", PaymentHandler::new(ledger, gateway))
        .with("noop", Noop);
    if !settings.exec.is_empty() {
        let mut exec =
            ExecHandler::new(settings.exec.clone()).env_allow(settings.exec_env.iter().cloned());
        // This is the binary (the library's users build their own runner), so it can
        // supervise its own commands.
        if let Ok(me) = std::env::current_exe() {
            exec = exec.supervisor(me);
        }
        for kind in settings.exec.keys() {
            handlers.insert(kind.clone(), exec.clone());
        }
    }
    let health = Health::new(Duration::from_secs(15));
    let runner = Runner::builder(queue, locks, handlers)
        .concurrency(settings.concurrency)
        .lock_ttl(settings.lock_ttl())
        .visibility_timeout(Duration::from_millis(settings.visibility_timeout_ms))
        .job_timeout(Duration::from_secs(settings.job_timeout_secs))
        .shutdown_timeout(Duration::from_secs(settings.shutdown_timeout_secs))
        .max_attempts(settings.max_attempts)
        .backoff(
            Duration::from_millis(settings.backoff_base_ms),
            Duration::from_millis(settings.backoff_max_ms),
        )
        .once(once)
        .health(health.clone())
        .build()
        .map_err(|e| {
            Exit::new(
                EX_CONFIG,
                format!("config error in `{}`: {}", e.key, e.problem),
            )
        })?;

    let stop_http = CancellationToken::new();
    let server = match settings.metrics_addr {
        Some(addr) => {
            let listener = telemetry::bind(addr)
                .await
                .map_err(|e| Exit::new(EX_UNAVAILABLE, e.to_string()))?;
            tracing::info!(%addr, "serving /metrics and /healthz");
            let handle = telemetry::install_recorder();
            let stop = stop_http.clone();
            Some(tokio::spawn(telemetry::serve(
                listener,
                handle,
                health,
                async move { stop.cancelled().await },
            )))
        }
        None => None,
    };
    let gauges = tokio::spawn(report_queue_gauges(runner.queue().clone()));
    runner.run(shutdown).await;
    gauges.abort();
    stop_http.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
}

async fn report_queue_gauges(queue: Queue) {
    use crate::telemetry::names;
    loop {
        if let Ok(st) = queue.stats().await {
            metrics::gauge!(names::QUEUE_DEPTH).set(st.depth as f64);
            metrics::gauge!(names::QUEUE_PENDING).set(st.pending as f64);
            metrics::gauge!(names::QUEUE_DELAYED).set(st.delayed as f64);
            metrics::gauge!(names::QUEUE_DEAD).set(st.dead as f64);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn enqueue(settings: &Settings, args: EnqueueArgs) -> Result<(), Exit> {
    let payload: serde_json::Value = serde_json::from_str(&args.payload)
        .map_err(|e| Exit::new(1, format!("--payload is not JSON: {e}")))?;
    if args.kind.is_empty() || args.resource.is_empty() {
        return Err(Exit::new(1, "kind and --resource must be non-empty"));
    }
    let queue = connect_queue(settings, "cli").await?;
    let jobs = vec![NewJob::new(args.kind, args.resource, payload); args.count.max(1)];
    let ids = queue
        .enqueue_many(&jobs)
        .await
        .map_err(|e| Exit::new(1, error_chain(&e)))?;
    for id in ids {
        say!("{id}");
    }
    Ok(())
}

async fn info(settings: &Settings) -> Result<(), Exit> {
    let queue = connect_queue(settings, "cli").await?;
    let st = queue
        .stats()
        .await
        .map_err(|e| Exit::new(1, error_chain(&e)))?;
    say!(
        "queue     {} ({})",
        settings.queue_name,
        redact(&settings.queue)
    );
    say!("depth     {}", st.depth);
    say!("pending   {}", st.pending);
    say!("delayed   {}", st.delayed);
    say!("dead      {}", st.dead);
    say!("consumers {}", st.consumers);
    for node in &settings.lock_nodes {
        let held = match locks_held(node).await {
            Ok(n) => n.to_string(),
            Err(e) => format!("unreachable ({e})"),
        };
        say!("locks held on {}: {held}", redact(node));
    }
    Ok(())
}

/// Lock keys on one node: every key but the lock crate's own bookkeeping.
async fn locks_held(url: &str) -> Result<u64, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let count = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut iter: redis::AsyncIter<'_, String> = redis::AsyncCommands::scan(&mut conn).await?;
        let mut n = 0u64;
        while let Some(key) = iter.next_item().await {
            if !key?.starts_with("fencelock:") {
                n += 1;
            }
        }
        Ok::<_, redis::RedisError>(n)
    };
    match tokio::time::timeout(Duration::from_secs(2), count).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 2s".into()),
    }
}

async fn dead(settings: &Settings, cmd: DeadCommand) -> Result<(), Exit> {
    let queue = connect_queue(settings, "cli").await?;
    match cmd {
        DeadCommand::List { limit } => {
            let entries = queue
                .dead_list(limit)
                .await
                .map_err(|e| Exit::new(1, error_chain(&e)))?;
            if entries.is_empty() {
                say!("no dead letters");
            }
            for e in entries {
                say!("{}  {}\n    {}", e.id, e.reason, e.raw);
            }
        }
        DeadCommand::Retry { id: Some(id), .. } => {
            let moved = queue
                .dead_retry(&id)
                .await
                .map_err(|e| Exit::new(1, error_chain(&e)))?;
            if !moved {
                return Err(Exit::new(1, format!("no dead letter with id {id}")));
            }
            say!("retried {id}");
        }
        DeadCommand::Retry { id: None, .. } => {
            let failed = |e: QueueError| Exit::new(1, error_chain(&e));
            // Every entry there now, once: jobs that fail again while this runs land
            // after `until` and wait for the next `dead retry`.
            let until = queue.dead_last_id().await.map_err(failed)?;
            let (mut moved, mut skipped) = (0, 0);
            let mut after: Option<String> = None;
            while let Some(until) = &until {
                let page = queue
                    .dead_page(after.as_deref(), Some(until), 100)
                    .await
                    .map_err(failed)?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                for e in &page {
                    match queue.dead_retry(&e.id).await {
                        Ok(true) => moved += 1,
                        Ok(false) => {}
                        Err(e @ DeadRetryError::Malformed { .. }) => {
                            skipped += 1;
                            eprintln!("{e}");
                        }
                        Err(err) => return Err(Exit::new(1, error_chain(&err))),
                    }
                }
            }
            say!("retried {moved} dead letters; {skipped} left in place (not jobs)");
        }
    }
    Ok(())
}

async fn lock_exec(
    settings: &Settings,
    args: LockExecArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, Exit> {
    let ttl = Duration::from_millis(args.ttl_ms);
    let locks = connect_locks(settings, ttl).await?;
    let wait_secs = args.wait_secs.unwrap_or(DEFAULT_LOCK_WAIT_SECS);
    if args.wait_secs.is_none() {
        // Waiting only makes sense for a lock that is held elsewhere or nodes that come
        // and go; when so many nodes cannot be reached that no quorum can answer, say so
        // now rather than after the whole wait.
        match locks
            .lock_with_retry(&[args.resource.as_str()], ttl, RetryPolicy::never())
            .await
        {
            Err(fencelock::Error::NoQuorum {
                succeeded: 0,
                failures,
                quorum,
                ..
            }) if failures.len() > locks.nodes().len() - quorum
                && failures
                    .iter()
                    .all(|f| !matches!(f, fencelock::NodeFailure::Restarted { .. })) =>
            {
                let failures: Vec<String> = failures.iter().map(ToString::to_string).collect();
                return Err(Exit::new(
                    EX_UNAVAILABLE,
                    format!(
                        "lock nodes unreachable, so no quorum of {quorum} can answer ({}); not waiting for them (pass --wait-secs to wait)",
                        failures.join("; ")
                    ),
                ));
            }
            Err(e) if e.kind() == fencelock::ErrorKind::Config => {
                return Err(Exit::new(EX_CONFIG, e.to_string()));
            }
            Ok(guard) => return run_locked(guard, args, shutdown).await,
            Err(_) => {}
        }
    }
    // Retry about every 150 ms for the whole wait.
    let retries = (wait_secs * 1000 / 150) as u32;
    let policy = RetryPolicy::new(
        retries,
        Duration::from_millis(100),
        Duration::from_millis(100),
    );
    let guard = match locks
        .lock_with_retry(&[args.resource.as_str()], ttl, policy)
        .await
    {
        Ok(guard) => guard,
        Err(e) if e.kind() == fencelock::ErrorKind::Config => {
            return Err(Exit::new(EX_CONFIG, e.to_string()));
        }
        Err(e) => {
            return Err(Exit::new(
                EX_TEMPFAIL,
                format!(
                    "could not take the lock on `{}` within {wait_secs}s: {e}",
                    args.resource
                ),
            ));
        }
    };
    run_locked(guard, args, shutdown).await
}

/// The default of `lock exec --wait-secs`.
const DEFAULT_LOCK_WAIT_SECS: u64 = 30;

/// Runs `lock exec`'s command under `guard`, kept alive by a watchdog, until it exits or
/// the lock is lost or a signal comes.
async fn run_locked(
    guard: fencelock::LockGuard,
    args: LockExecArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, Exit> {
    let token = guard.fencing_token().unwrap_or_default();
    tracing::info!(resource = %args.resource, token, "lock taken; running the command");
    let watchdog = guard.auto_extend_with(
        crate::worker::watchdog_for(
            Duration::from_secs(args.max_hold_secs),
            Duration::from_millis(args.ttl_ms),
        )
        .cancel_on_loss(false),
    );
    let health = watchdog.health();
    let cancel = CancellationToken::new();
    let env = [
        ("FENCING_TOKEN", token.to_string()),
        ("LOCK_RESOURCE", args.resource.clone()),
    ];
    let child = run_child(
        &args.command,
        &env,
        ChildIo::Inherit,
        &args.resource,
        &cancel,
        Duration::from_secs(args.kill_grace_secs),
    );
    tokio::pin!(child);
    tokio::pin!(shutdown);
    let mut lost = false;
    let end = loop {
        tokio::select! {
            end = &mut child => break end,
            _ = health.lost(), if !lost => {
                tracing::error!(resource = %args.resource, "lock lost; stopping the command");
                lost = true;
                cancel.cancel();
            }
            () = &mut shutdown, if !cancel.is_cancelled() => {
                tracing::info!("signal received; stopping the command");
                cancel.cancel();
            }
        }
    };
    let guard = watchdog.stop().await;
    if let Err(e) = guard.release().await {
        tracing::debug!(error = %e, "release failed; the lock expires by its TTL");
    }
    let end = end.map_err(|e| Exit::new(1, e.to_string()))?;
    if lost {
        return Err(Exit::new(
            EX_TEMPFAIL,
            format!("lost the lock on `{}` while the command ran", args.resource),
        ));
    }
    let status = match end {
        ChildEnd::Exited(s) | ChildEnd::Cancelled(s) => s,
    };
    Ok(exit_code(status))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Sets up `tracing` on stderr: human-readable or JSON, filtered by `RUST_LOG` (default
/// `info`).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
