//! The command line: subcommands and their flags. The settings' flags are declared with
//! the settings themselves ([`Layer`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::Layer;

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
  job-runner ledger audit --ledger /var/lib/job-runner/ledger.db

Settings come from flags, then JOB_RUNNER_* variables (REDIS_URL for the queue), then the
TOML file given with --config, then defaults; `job-runner run --print-config` shows them.";

/// A lock-guarded job runner: jobs from a Redis Stream, each run under a quorum lock with
/// a fencing token.
#[derive(Debug, Parser)]
#[command(name = "job-runner", version, about, after_help = EXAMPLES)]
pub(crate) struct Cli {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, global = true, env = "JOB_RUNNER_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The settings given on the command line or in the environment.
    #[command(flatten)]
    pub(crate) settings: Layer,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
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
pub(crate) enum LedgerCommand {
    /// Check "charged exactly once" over the attempt log; exits 1 on any violation.
    Audit,
}

/// Flags of `run` besides the settings.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Exit once the queue is drained (nothing waiting, delayed, pending or running).
    #[arg(long)]
    pub(crate) once: bool,
    /// An exec job kind and the shell command it runs, e.g. `report=./report.sh` (repeatable).
    #[arg(long = "exec", value_name = "KIND=COMMAND", value_parser = parse_exec)]
    pub(crate) exec: Vec<(String, String)>,
    /// Print the settings in force, as TOML, and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
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
pub(crate) struct EnqueueArgs {
    /// The job kind, e.g. `payment`.
    pub(crate) kind: String,
    /// The lock key the job runs under, e.g. `order:42`.
    #[arg(long)]
    pub(crate) resource: String,
    /// The payload, as JSON.
    #[arg(long, default_value = "{}")]
    pub(crate) payload: String,
    /// Enqueue this many copies (duplicates are harmless for idempotent handlers).
    #[arg(long, default_value_t = 1)]
    pub(crate) count: usize,
}

/// `dead` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
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
pub(crate) enum LockCommand {
    /// Run a command while holding a lock on RESOURCE, like flock(1) across machines. The
    /// child gets FENCING_TOKEN and LOCK_RESOURCE in its environment. If the lock is lost,
    /// the child gets SIGTERM (then SIGKILL) and the exit code is 75.
    Exec(LockExecArgs),
}

/// Flags of `lock exec`.
#[derive(Debug, Args)]
pub(crate) struct LockExecArgs {
    /// The lock key.
    #[arg(long)]
    pub(crate) resource: String,
    /// Lock TTL in ms; auto-extended while the command runs.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) ttl_ms: u64,
    /// How long to wait for the lock, in seconds; 0 tries once [default: 30; when not
    /// given and too many lock nodes are unreachable for a quorum, fails at once].
    #[arg(long)]
    pub(crate) wait_secs: Option<u64>,
    /// The longest the lock is held, in seconds: a command still running then gets
    /// SIGTERM and the exit code is 75, as for a lost lock.
    #[arg(long, default_value_t = 3600)]
    pub(crate) max_hold_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when the child must stop.
    #[arg(long, default_value_t = 5)]
    pub(crate) kill_grace_secs: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}
