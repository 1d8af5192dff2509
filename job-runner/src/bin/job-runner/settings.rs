//! The binary's settings: each one declared once below, with its flag, environment
//! variable, TOML key (its name), default and doc; then where they come from and the
//! checks.
//!
//! Precedence, highest first: command-line flags; environment variables
//! (`JOB_RUNNER_*`, and `REDIS_URL` for the queue); the TOML file named by `--config`;
//! the defaults. Every setting is checked before any work starts, and an error names the
//! key and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use job_runner::handlers::exec::DEFAULT_ENV_ALLOW;
use job_runner::queue::{DEFAULT_MAX_DEAD, DEFAULT_MAX_ENTRY_BYTES};
use job_runner::{ConfigError, RunnerSettings};
use serde::{Deserialize, Serialize};

mod declare;
#[cfg(test)]
mod tests;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

declare::settings! {
    /// The queue's Redis URL (`rediss://` for TLS, `redis://user:pass@host` for an ACL
    /// user); REDIS_URL is read below JOB_RUNNER_QUEUE
    #[arg(global = true, long, env = "JOB_RUNNER_QUEUE", value_name = "URL")]
    queue: String = "redis://127.0.0.1:6379".into();

    /// The queue's name, the prefix of its keys
    #[arg(global = true, long, env = "JOB_RUNNER_QUEUE_NAME", value_name = "NAME")]
    queue_name: String = "jobs".into();

    /// Lock nodes, comma-separated Redis URLs (required for `run` and `lock exec`)
    #[arg(global = true, long, env = "JOB_RUNNER_LOCK_NODES", value_delimiter = ',', value_name = "URLS")]
    lock_nodes: Vec<String> = Vec::new();

    /// This process's consumer name [default: HOSTNAME-PID-RANDOM]
    #[arg(global = true, long, env = "JOB_RUNNER_CONSUMER")]
    consumer: String = default_consumer();

    /// Jobs at once
    #[arg(global = true, short = 'c', long, env = "JOB_RUNNER_CONCURRENCY")]
    concurrency: usize = 16;

    /// Threads for async work; 1 runs everything on one thread, which is fastest for
    /// the built-in handlers (none blocks; the ledger uses a blocking pool)
    #[arg(global = true, long, env = "JOB_RUNNER_THREADS")]
    threads: usize = 1;

    /// Seconds the runner takes at most to stop on a signal: jobs still running in the
    /// last fifth are cancelled and put back
    #[arg(global = true, short = 't', long = "timeout", env = "JOB_RUNNER_SHUTDOWN_TIMEOUT")]
    shutdown_timeout_secs: u64 = 25;

    /// Lock TTL in ms; locks are auto-extended while a job runs
    #[arg(global = true, long, env = "JOB_RUNNER_LOCK_TTL_MS")]
    lock_ttl_ms: u64 = 10_000;

    /// How long a lock command waits for one node, in ms (at most a tenth of the TTL)
    #[arg(global = true, long, env = "JOB_RUNNER_LOCK_NODE_TIMEOUT_MS")]
    lock_node_timeout_ms: u64 = 50;

    /// How long a lock node keeps a resource's fencing counter after its last lock, in
    /// ms (1 ms to 30 days): the nodes' memory grows with the orders locked within it,
    /// not with every order ever locked
    #[arg(global = true, long, env = "JOB_RUNNER_LOCK_FENCE_WINDOW_MS")]
    lock_fence_window_ms: u64 = fencelock::DEFAULT_FENCE_WINDOW.as_millis() as u64;

    /// Idle time in ms after which another runner reclaims an unacknowledged job
    #[arg(global = true, long, env = "JOB_RUNNER_VISIBILITY_TIMEOUT_MS")]
    visibility_timeout_ms: u64 = 30_000;

    /// Longest a job may run, in seconds
    #[arg(global = true, long, env = "JOB_RUNNER_JOB_TIMEOUT_SECS")]
    job_timeout_secs: u64 = 300;

    /// Attempts before a failing job goes to dead letters; a job handed out more times
    /// than this without finishing (its runners crashed on it) goes there too
    #[arg(global = true, long, env = "JOB_RUNNER_MAX_ATTEMPTS")]
    max_attempts: u32 = 5;

    /// Retry delay after a first failure, in ms; it doubles per attempt
    #[arg(global = true, long, env = "JOB_RUNNER_BACKOFF_BASE_MS")]
    backoff_base_ms: u64 = 1_000;

    /// Longest retry delay, in ms
    #[arg(global = true, long, env = "JOB_RUNNER_BACKOFF_MAX_MS")]
    backoff_max_ms: u64 = 60_000;

    /// Where /metrics and /healthz listen, or `off`
    #[arg(global = true, long, env = "JOB_RUNNER_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: String = "127.0.0.1:9464".into();

    /// Log format
    #[arg(global = true, long, env = "JOB_RUNNER_LOG_FORMAT", value_enum)]
    log_format: LogFormat = LogFormat::Text;

    /// The payment ledger's SQLite file (WAL; runners on one host may share it), opened
    /// by the first payment job [default: $XDG_STATE_HOME/job-runner/ledger.db, or
    /// ~/.local/state/job-runner/ledger.db]
    #[arg(global = true, long, env = "JOB_RUNNER_LEDGER", value_name = "FILE")]
    ledger: PathBuf = default_ledger();

    /// The ledger's fencing check; `--unsafe-no-fencing` turns it off, to demonstrate
    /// what it prevents. Never in production
    #[arg(
        global = true,
        long = "unsafe-no-fencing",
        env = "JOB_RUNNER_UNSAFE_NO_FENCING",
        num_args = 0,
        default_missing_value = "true",
        value_parser = unsafe_no_fencing,
    )]
    ledger_fencing: bool = true;

    /// Highest latency of the simulated payment gateway, in ms
    #[arg(global = true, long, env = "JOB_RUNNER_GATEWAY_LATENCY_MS")]
    gateway_latency_ms: u64 = 0;

    /// Fraction of simulated charges that fail transiently
    #[arg(global = true, long, env = "JOB_RUNNER_GATEWAY_FAILURE_RATE")]
    gateway_failure_rate: f64 = 0.0;

    /// The runner's environment variables exec commands get besides the job's own; all
    /// others are withheld
    #[arg(global = true, long, env = "JOB_RUNNER_EXEC_ENV", value_name = "NAME,...", value_delimiter = ',')]
    exec_env: Vec<String> = DEFAULT_ENV_ALLOW.iter().map(|&v| v.to_owned()).collect();

    /// The largest job, in bytes, that `enqueue` writes and `run` runs; larger entries
    /// found in the queue are dead-lettered unparsed
    #[arg(global = true, long, env = "JOB_RUNNER_MAX_PAYLOAD_BYTES", value_name = "BYTES")]
    max_payload_bytes: usize = DEFAULT_MAX_ENTRY_BYTES;

    /// The most dead letters kept; writing one more drops the oldest
    #[arg(global = true, long, env = "JOB_RUNNER_MAX_DEAD_LETTERS", value_name = "N")]
    max_dead_letters: u64 = DEFAULT_MAX_DEAD;

    /// Command (program and arguments) per exec job kind, from the file's `[exec]`
    /// table; `run --exec KIND=COMMAND` adds to it
    #[arg(skip)]
    exec: BTreeMap<String, Vec<String>> = BTreeMap::new();
}

/// `--unsafe-no-fencing` (or its variable set to a true value) turns fencing off.
fn unsafe_no_fencing(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "no" | "off" | "n" | "f" => Ok(true),
        "1" | "true" | "yes" | "on" | "y" | "t" => Ok(false),
        other => Err(format!("expected true or false, got `{other}`")),
    }
}

/// The ledger's home: the user's state directory (XDG), never the working directory,
/// where a runner would scatter ledgers over wherever it was started. Empty when there
/// is no such directory: then `--ledger` is required for payment jobs.
fn default_ledger() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|d| !d.is_empty())
                .map(|home| PathBuf::from(home).join(".local/state"))
        });
    state.map_or_else(PathBuf::new, |dir| dir.join("job-runner/ledger.db"))
}

fn default_consumer() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

impl Layer {
    /// Reads and parses the TOML file at `path`.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or is not valid TOML with known keys; the error
    /// names the file, and the key where the parser can tell.
    pub(crate) fn load(path: &Path) -> Result<Layer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        toml::from_str(&text).map_err(|e| {
            ConfigError::new(
                "config",
                format!("{}: {}", path.display(), e.to_string().trim_end()),
            )
        })
    }
}

impl Settings {
    /// `flags` (the command line and the environment) over `redis_url` (for the queue)
    /// over `file` over the defaults, with `exec` commands from the command line added,
    /// then checked.
    ///
    /// # Errors
    ///
    /// The first setting that is invalid, by its key.
    pub(crate) fn resolve(
        mut flags: Layer,
        redis_url: Option<String>,
        file: Layer,
        exec: &[(String, String)],
    ) -> Result<Settings, ConfigError> {
        flags.queue = flags.queue.or(redis_url);
        let mut s = flags.over(file);
        for (kind, command) in exec {
            s.exec.insert(
                kind.clone(),
                vec!["sh".into(), "-c".into(), command.clone()],
            );
        }
        s.check()?;
        Ok(s)
    }

    /// The runner's share of the settings.
    pub(crate) fn runner(&self) -> RunnerSettings {
        let mut r = RunnerSettings::default();
        r.concurrency = self.concurrency;
        r.lock_ttl = self.lock_ttl();
        r.visibility = Duration::from_millis(self.visibility_timeout_ms);
        r.job_timeout = Duration::from_secs(self.job_timeout_secs);
        r.shutdown_timeout = Duration::from_secs(self.shutdown_timeout_secs);
        r.max_attempts = self.max_attempts;
        r.backoff_base = Duration::from_millis(self.backoff_base_ms);
        r.backoff_max = Duration::from_millis(self.backoff_max_ms);
        r
    }

    /// Where `/metrics` and `/healthz` listen, `None` for `off`.
    pub(crate) fn metrics_socket(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_addr == "off" {
            return Ok(None);
        }
        self.metrics_addr.parse().map(Some).map_err(|e| {
            ConfigError::new(
                "metrics_addr",
                format!("`{}` is not host:port or `off`: {e}", self.metrics_addr),
            )
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let url = |key: &str, url: &str| {
            redis::Client::open(url).map(drop).map_err(|e| {
                ConfigError::new(key, format!("`{}` is not a Redis URL: {e}", redact(url)))
            })
        };
        url("queue", &self.queue)?;
        for node in &self.lock_nodes {
            url("lock_nodes", node)?;
        }
        self.metrics_socket()?;
        let bad = |key: &str, problem: String| Err(ConfigError::new(key, problem));
        if self.max_dead_letters == 0 {
            return bad("max_dead_letters", "must be at least 1".to_owned());
        }
        if !(256..=512 * 1024 * 1024).contains(&self.max_payload_bytes) {
            return bad(
                "max_payload_bytes",
                format!(
                    "must be 256..=536870912 (512 MiB, Redis's own limit), got {}",
                    self.max_payload_bytes
                ),
            );
        }
        if let Some(name) = self
            .exec_env
            .iter()
            .find(|v| v.is_empty() || v.contains('=') || v.contains('\0'))
        {
            return bad(
                "exec_env",
                format!("`{name}` is not an environment variable name"),
            );
        }
        if self.queue_name.is_empty() || self.queue_name.contains(char::is_whitespace) {
            return bad("queue_name", "must be non-empty without spaces".to_owned());
        }
        if self.consumer.is_empty() {
            return bad("consumer", "must be non-empty".to_owned());
        }
        if !(1..=256).contains(&self.threads) {
            return bad("threads", format!("must be 1..=256, got {}", self.threads));
        }
        self.runner().check()?;
        if self.lock_node_timeout_ms == 0
            || self.lock_node_timeout_ms.saturating_mul(10) > self.lock_ttl_ms
        {
            return bad(
                "lock_node_timeout_ms",
                format!(
                    "must be positive and at most a tenth of lock_ttl_ms ({}), got {}",
                    self.lock_ttl_ms, self.lock_node_timeout_ms
                ),
            );
        }
        const MAX_FENCE_WINDOW_MS: u64 = 30 * 24 * 3_600_000;
        if !(1..=MAX_FENCE_WINDOW_MS).contains(&self.lock_fence_window_ms) {
            return bad(
                "lock_fence_window_ms",
                format!(
                    "must be 1..={MAX_FENCE_WINDOW_MS} (1 ms to 30 days), got {}",
                    self.lock_fence_window_ms
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.gateway_failure_rate) {
            return bad(
                "gateway_failure_rate",
                format!("must be in [0, 1], got {}", self.gateway_failure_rate),
            );
        }
        for (kind, argv) in &self.exec {
            if argv.is_empty() || argv[0].is_empty() {
                return bad(&format!("exec.{kind}"), "needs a program to run".to_owned());
            }
            if kind == "payment" || kind == "noop" {
                return bad(
                    &format!("exec.{kind}"),
                    format!("`{kind}` is a built-in kind"),
                );
            }
        }
        Ok(())
    }

    /// The lock nodes, or an error naming the key when there are none.
    ///
    /// # Errors
    ///
    /// When no lock node is configured.
    pub(crate) fn require_lock_nodes(&self) -> Result<&[String], ConfigError> {
        if self.lock_nodes.is_empty() {
            return Err(ConfigError::new(
                "lock_nodes",
                "no lock nodes: set --lock-nodes, JOB_RUNNER_LOCK_NODES or `lock_nodes` in the config file",
            ));
        }
        Ok(&self.lock_nodes)
    }

    /// `lock_ttl_ms` as a duration.
    pub(crate) fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// This configuration as TOML, for `--print-config`, passwords hidden.
    pub(crate) fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.queue = redact(&shown.queue);
        shown.lock_nodes = shown.lock_nodes.iter().map(|u| redact(u)).collect();
        toml::to_string(&shown).unwrap_or_default()
    }
}

/// A URL with its password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => format!("{}***{}", &url[..scheme + 3], &url[at..]),
            }
        }
        _ => url.to_owned(),
    }
}
