//! Settings of the `job-runner` binary, and where they come from.
//!
//! Precedence, highest first: command-line flags; environment variables
//! (`JOB_RUNNER_*`, and `REDIS_URL` for the queue); the TOML file named by `--config`;
//! the defaults. Every setting is checked before any work starts, and an error names the
//! key and the problem.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A setting that is missing or out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting, as the TOML file spells it.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(key: &str, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_owned(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error in `{}`: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The TOML file. Every key is optional; unknown keys are an error.
///
/// ```toml
/// queue = "redis://queue:6379"
/// lock_nodes = ["redis://n1:6379", "redis://n2:6379", "redis://n3:6379"]
/// concurrency = 16
///
/// [exec]
/// report = ["./report.sh", "--nightly"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The queue's Redis URL.
    pub queue: Option<String>,
    /// The queue's name (key prefix).
    pub queue_name: Option<String>,
    /// The lock nodes' Redis URLs.
    pub lock_nodes: Option<Vec<String>>,
    /// This process's consumer name.
    pub consumer: Option<String>,
    /// Jobs at once.
    pub concurrency: Option<usize>,
    /// Runtime threads for async work (1: one thread).
    pub threads: Option<usize>,
    /// Seconds running jobs get on shutdown.
    pub shutdown_timeout_secs: Option<u64>,
    /// Lock TTL in ms.
    pub lock_ttl_ms: Option<u64>,
    /// Per-node timeout of lock commands in ms.
    pub lock_node_timeout_ms: Option<u64>,
    /// Visibility timeout in ms.
    pub visibility_timeout_ms: Option<u64>,
    /// Job timeout in seconds.
    pub job_timeout_secs: Option<u64>,
    /// Attempts before dead letters.
    pub max_attempts: Option<u32>,
    /// First retry delay in ms.
    pub backoff_base_ms: Option<u64>,
    /// Longest retry delay in ms.
    pub backoff_max_ms: Option<u64>,
    /// `host:port` for `/metrics` and `/healthz`, or `off`.
    pub metrics_addr: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// The payment ledger's SQLite file.
    pub ledger: Option<PathBuf>,
    /// The ledger's fencing check (never turn it off outside a demonstration).
    pub ledger_fencing: Option<bool>,
    /// Highest latency of the simulated payment gateway, in ms.
    pub gateway_latency_ms: Option<u64>,
    /// Fraction of simulated charges that fail transiently.
    pub gateway_failure_rate: Option<f64>,
    /// Command (program and arguments) per exec job kind.
    pub exec: Option<BTreeMap<String, Vec<String>>>,
    /// The runner's environment variables exec commands get (all others are withheld).
    pub exec_env: Option<Vec<String>>,
    /// The largest job entry, in bytes, enqueued or run.
    pub max_payload_bytes: Option<usize>,
    /// The most dead letters kept; the oldest beyond it are dropped.
    pub max_dead_letters: Option<u64>,
}

impl FileConfig {
    /// Reads and parses `path`.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or is not valid TOML with known keys; the error
    /// names the file, and the key where the parser can tell.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
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

/// What the command line and the environment say; `None` where they are silent. Filled
/// by the CLI (clap reads flags and `JOB_RUNNER_*` variables, flags first).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--queue` / `JOB_RUNNER_QUEUE`.
    pub queue: Option<String>,
    /// `REDIS_URL`, below `JOB_RUNNER_QUEUE`.
    pub redis_url: Option<String>,
    /// `--queue-name`.
    pub queue_name: Option<String>,
    /// `--lock-nodes` (comma-separated).
    pub lock_nodes: Option<Vec<String>>,
    /// `--consumer`.
    pub consumer: Option<String>,
    /// `-c`.
    pub concurrency: Option<usize>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `-t`.
    pub shutdown_timeout_secs: Option<u64>,
    /// `--lock-ttl-ms`.
    pub lock_ttl_ms: Option<u64>,
    /// `--lock-node-timeout-ms`.
    pub lock_node_timeout_ms: Option<u64>,
    /// `--backoff-base-ms`.
    pub backoff_base_ms: Option<u64>,
    /// `--backoff-max-ms`.
    pub backoff_max_ms: Option<u64>,
    /// `--visibility-timeout-ms`.
    pub visibility_timeout_ms: Option<u64>,
    /// `--job-timeout-secs`.
    pub job_timeout_secs: Option<u64>,
    /// `--max-attempts`.
    pub max_attempts: Option<u32>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--ledger`.
    pub ledger: Option<PathBuf>,
    /// `--unsafe-no-fencing` sets it to false.
    pub ledger_fencing: Option<bool>,
    /// `--gateway-latency-ms`.
    pub gateway_latency_ms: Option<u64>,
    /// `--gateway-failure-rate`.
    pub gateway_failure_rate: Option<f64>,
    /// `--exec KIND=COMMAND`, run through `sh -c`.
    pub exec: Vec<(String, String)>,
    /// `--exec-env NAME,...`.
    pub exec_env: Option<Vec<String>>,
    /// `--max-payload-bytes`.
    pub max_payload_bytes: Option<usize>,
    /// `--max-dead-letters`.
    pub max_dead_letters: Option<u64>,
}

/// The settings in force, after precedence and checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// The queue's Redis URL (default `redis://127.0.0.1:6379`).
    pub queue: String,
    /// The queue's name (default `jobs`).
    pub queue_name: String,
    /// The lock nodes (no default: required for `run` and `lock exec`).
    pub lock_nodes: Vec<String>,
    /// This process's consumer name (default `<hostname>-<pid>-<random>`).
    pub consumer: String,
    /// Jobs at once (default 16).
    pub concurrency: usize,
    /// Threads of the async runtime (default 1: a current-thread runtime). Blocking work
    /// (the SQLite ledger) runs on tokio's blocking pool either way.
    pub threads: usize,
    /// Seconds running jobs get on shutdown (default 25).
    pub shutdown_timeout_secs: u64,
    /// Lock TTL in ms (default 10 000).
    pub lock_ttl_ms: u64,
    /// Per-node lock command timeout in ms (default 50).
    pub lock_node_timeout_ms: u64,
    /// Visibility timeout in ms (default 30 000).
    pub visibility_timeout_ms: u64,
    /// Job timeout in seconds (default 300).
    pub job_timeout_secs: u64,
    /// Attempts before dead letters (default 5).
    pub max_attempts: u32,
    /// First retry delay in ms (default 1 000).
    pub backoff_base_ms: u64,
    /// Longest retry delay in ms (default 60 000).
    pub backoff_max_ms: u64,
    /// Where `/metrics` and `/healthz` listen (default `127.0.0.1:9464`; `off` for none).
    pub metrics_addr: Option<SocketAddr>,
    /// Log format (default text).
    pub log_format: LogFormat,
    /// The payment ledger (default `job-runner-ledger.db`).
    pub ledger: PathBuf,
    /// The ledger's fencing check (default on).
    pub ledger_fencing: bool,
    /// Highest simulated gateway latency in ms (default 0).
    pub gateway_latency_ms: u64,
    /// Simulated gateway failure fraction (default 0).
    pub gateway_failure_rate: f64,
    /// Commands per exec kind (default none).
    pub exec: BTreeMap<String, Vec<String>>,
    /// The runner's environment variables exec commands get, besides the job's own
    /// (default `PATH`, `HOME`, `LANG`, `LC_ALL`, `TZ`, `TMPDIR`).
    pub exec_env: Vec<String>,
    /// The largest job entry, in bytes, that `enqueue` writes and `run` parses (default
    /// 1 MiB): larger entries found in the queue are dead-lettered unparsed.
    pub max_payload_bytes: usize,
    /// The most dead letters kept (default 100 000); writing one more drops the oldest,
    /// counted in `job_runner_dead_letters_dropped_total`.
    pub max_dead_letters: u64,
}

/// The longest job timeout: a week. Longer is a mistake (a unit mix-up, say), and would
/// overflow the deadlines computed from it.
const MAX_JOB_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// The longest lock TTL: a day. Locks are extended while their holder runs, so a long
/// TTL only makes a crashed holder's lock outlive it longer.
const MAX_LOCK_TTL_MS: u64 = 24 * 3600 * 1000;

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

impl Settings {
    /// Applies precedence (overrides, then file, then defaults) and checks every value.
    ///
    /// # Errors
    ///
    /// The first setting that is invalid, by its key.
    pub fn resolve(o: Overrides, file: FileConfig) -> Result<Settings, ConfigError> {
        let f = file;
        let metrics = o
            .metrics_addr
            .or(f.metrics_addr)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_addr = if metrics == "off" {
            None
        } else {
            Some(metrics.parse::<SocketAddr>().map_err(|e| {
                ConfigError::new(
                    "metrics_addr",
                    format!("`{metrics}` is not host:port or `off`: {e}"),
                )
            })?)
        };
        let mut exec = f.exec.unwrap_or_default();
        for (kind, command) in o.exec {
            exec.insert(kind, vec!["sh".into(), "-c".into(), command]);
        }
        let s = Settings {
            queue: o
                .queue
                .or(o.redis_url)
                .or(f.queue)
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            queue_name: o
                .queue_name
                .or(f.queue_name)
                .unwrap_or_else(|| "jobs".into()),
            lock_nodes: o.lock_nodes.or(f.lock_nodes).unwrap_or_default(),
            consumer: o.consumer.or(f.consumer).unwrap_or_else(default_consumer),
            concurrency: o.concurrency.or(f.concurrency).unwrap_or(16),
            threads: o.threads.or(f.threads).unwrap_or(1),
            shutdown_timeout_secs: o
                .shutdown_timeout_secs
                .or(f.shutdown_timeout_secs)
                .unwrap_or(25),
            lock_ttl_ms: o.lock_ttl_ms.or(f.lock_ttl_ms).unwrap_or(10_000),
            lock_node_timeout_ms: o
                .lock_node_timeout_ms
                .or(f.lock_node_timeout_ms)
                .unwrap_or(50),
            visibility_timeout_ms: o
                .visibility_timeout_ms
                .or(f.visibility_timeout_ms)
                .unwrap_or(30_000),
            job_timeout_secs: o.job_timeout_secs.or(f.job_timeout_secs).unwrap_or(300),
            max_attempts: o.max_attempts.or(f.max_attempts).unwrap_or(5),
            backoff_base_ms: o.backoff_base_ms.or(f.backoff_base_ms).unwrap_or(1_000),
            backoff_max_ms: o.backoff_max_ms.or(f.backoff_max_ms).unwrap_or(60_000),
            metrics_addr,
            log_format: o.log_format.or(f.log_format).unwrap_or_default(),
            ledger: o
                .ledger
                .or(f.ledger)
                .unwrap_or_else(|| "job-runner-ledger.db".into()),
            ledger_fencing: o.ledger_fencing.or(f.ledger_fencing).unwrap_or(true),
            gateway_latency_ms: o.gateway_latency_ms.or(f.gateway_latency_ms).unwrap_or(0),
            gateway_failure_rate: o
                .gateway_failure_rate
                .or(f.gateway_failure_rate)
                .unwrap_or(0.0),
            exec,
            max_dead_letters: o
                .max_dead_letters
                .or(f.max_dead_letters)
                .unwrap_or(crate::queue::DEFAULT_MAX_DEAD),
            max_payload_bytes: o
                .max_payload_bytes
                .or(f.max_payload_bytes)
                .unwrap_or(crate::queue::DEFAULT_MAX_ENTRY_BYTES),
            exec_env: o.exec_env.or(f.exec_env).unwrap_or_else(|| {
                crate::exec::DEFAULT_ENV_ALLOW
                    .iter()
                    .map(|&v| v.to_owned())
                    .collect()
            }),
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let url = |key: &str, url: &str| {
            redis::Client::open(url)
                .map(drop)
                .map_err(|e| ConfigError::new(key, format!("`{url}` is not a Redis URL: {e}")))
        };
        url("queue", &self.queue)?;
        if self.max_dead_letters == 0 {
            return Err(ConfigError::new(
                "max_dead_letters",
                "must be at least 1".to_owned(),
            ));
        }
        if !(256..=512 * 1024 * 1024).contains(&self.max_payload_bytes) {
            return Err(ConfigError::new(
                "max_payload_bytes",
                format!(
                    "must be 256..=536870912 (512 MiB, Redis's own limit), got {}",
                    self.max_payload_bytes
                ),
            ));
        }
        if let Some(bad) = self
            .exec_env
            .iter()
            .find(|v| v.is_empty() || v.contains('=') || v.contains('\0'))
        {
            return Err(ConfigError::new(
                "exec_env",
                format!("`{bad}` is not an environment variable name"),
            ));
        }
        for node in &self.lock_nodes {
            url("lock_nodes", node)?;
        }
        if self.queue_name.is_empty() || self.queue_name.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "queue_name",
                "must be non-empty without spaces",
            ));
        }
        if self.consumer.is_empty() {
            return Err(ConfigError::new("consumer", "must be non-empty"));
        }
        if !(1..=4096).contains(&self.concurrency) {
            return Err(ConfigError::new(
                "concurrency",
                format!("must be 1..=4096, got {}", self.concurrency),
            ));
        }
        if !(1..=256).contains(&self.threads) {
            return Err(ConfigError::new(
                "threads",
                format!("must be 1..=256, got {}", self.threads),
            ));
        }
        if !(100..=MAX_LOCK_TTL_MS).contains(&self.lock_ttl_ms) {
            return Err(ConfigError::new(
                "lock_ttl_ms",
                format!(
                    "must be 100..={MAX_LOCK_TTL_MS} (a day), got {}",
                    self.lock_ttl_ms
                ),
            ));
        }
        if self.lock_node_timeout_ms == 0
            || self.lock_node_timeout_ms.saturating_mul(10) > self.lock_ttl_ms
        {
            return Err(ConfigError::new(
                "lock_node_timeout_ms",
                format!(
                    "must be positive and at most a tenth of lock_ttl_ms ({}), got {}",
                    self.lock_ttl_ms, self.lock_node_timeout_ms
                ),
            ));
        }
        if self.visibility_timeout_ms > MAX_JOB_TIMEOUT_SECS * 1000 {
            return Err(ConfigError::new(
                "visibility_timeout_ms",
                format!(
                    "must be at most {} (a week), got {}",
                    MAX_JOB_TIMEOUT_SECS * 1000,
                    self.visibility_timeout_ms
                ),
            ));
        }
        if self.visibility_timeout_ms <= self.lock_ttl_ms {
            return Err(ConfigError::new(
                "visibility_timeout_ms",
                format!(
                    "must exceed lock_ttl_ms ({}), got {}: a reclaimed job would find its lock still held",
                    self.lock_ttl_ms, self.visibility_timeout_ms
                ),
            ));
        }
        if !(1..=MAX_JOB_TIMEOUT_SECS).contains(&self.job_timeout_secs) {
            return Err(ConfigError::new(
                "job_timeout_secs",
                format!(
                    "must be 1..={MAX_JOB_TIMEOUT_SECS} (a week), got {}",
                    self.job_timeout_secs
                ),
            ));
        }
        if self.shutdown_timeout_secs > MAX_JOB_TIMEOUT_SECS {
            return Err(ConfigError::new(
                "shutdown_timeout_secs",
                format!(
                    "must be at most {MAX_JOB_TIMEOUT_SECS} (a week), got {}",
                    self.shutdown_timeout_secs
                ),
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new("max_attempts", "must be at least 1"));
        }
        if self.backoff_base_ms == 0 || self.backoff_max_ms < self.backoff_base_ms {
            return Err(ConfigError::new(
                "backoff_max_ms",
                format!(
                    "backoff_base_ms must be positive and backoff_max_ms at least that, got {} and {}",
                    self.backoff_base_ms, self.backoff_max_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.gateway_failure_rate) {
            return Err(ConfigError::new(
                "gateway_failure_rate",
                format!("must be in [0, 1], got {}", self.gateway_failure_rate),
            ));
        }
        for (kind, argv) in &self.exec {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(ConfigError::new(
                    &format!("exec.{kind}"),
                    "needs a program to run",
                ));
            }
            if kind == "payment" || kind == "noop" {
                return Err(ConfigError::new(
                    &format!("exec.{kind}"),
                    format!("`{kind}` is a built-in kind"),
                ));
            }
        }
        Ok(())
    }

    /// The lock nodes, or an error naming the key when there are none.
    ///
    /// # Errors
    ///
    /// When no lock node is configured.
    pub fn require_lock_nodes(&self) -> Result<&[String], ConfigError> {
        if self.lock_nodes.is_empty() {
            return Err(ConfigError::new(
                "lock_nodes",
                "no lock nodes: set --lock-nodes, JOB_RUNNER_LOCK_NODES or `lock_nodes` in the config file",
            ));
        }
        Ok(&self.lock_nodes)
    }

    /// `lock_ttl_ms` as a duration.
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// This configuration as TOML, for `--print-config`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.queue = redact(&shown.queue);
        shown.lock_nodes = shown.lock_nodes.iter().map(|u| redact(u)).collect();
        let mut text = toml::to_string(&shown).unwrap_or_default();
        if shown.metrics_addr.is_none() {
            text.push_str("metrics_addr = \"off\"\n");
        }
        text
    }
}

/// A URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Option<Vec<String>> {
        Some(vec!["redis://127.0.0.1:7001".into()])
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file = FileConfig {
            concurrency: Some(2),
            queue_name: Some("from-file".into()),
            lock_nodes: nodes(),
            ..FileConfig::default()
        };
        let o = Overrides {
            concurrency: Some(4),
            ..Overrides::default()
        };
        let s = Settings::resolve(o, file.clone()).unwrap();
        assert_eq!(s.concurrency, 4);
        assert_eq!(s.threads, 1, "one runtime thread by default");
        let threads = |o: Option<usize>, f: Option<usize>| {
            let file = FileConfig {
                threads: f,
                ..file.clone()
            };
            let o = Overrides {
                threads: o,
                ..Overrides::default()
            };
            Settings::resolve(o, file).unwrap().threads
        };
        assert_eq!(threads(None, Some(2)), 2);
        assert_eq!(threads(Some(3), Some(2)), 3);
        assert_eq!(s.queue_name, "from-file");
        assert_eq!(s.max_attempts, 5);
    }

    #[test]
    fn timing_settings_take_flags_over_the_file_and_stay_in_range() {
        let file = FileConfig {
            lock_node_timeout_ms: Some(80),
            backoff_base_ms: Some(200),
            backoff_max_ms: Some(5_000),
            ..FileConfig::default()
        };
        let s = Settings::resolve(Overrides::default(), file.clone()).unwrap();
        assert_eq!(
            (s.lock_node_timeout_ms, s.backoff_base_ms, s.backoff_max_ms),
            (80, 200, 5_000)
        );
        let o = Overrides {
            lock_node_timeout_ms: Some(30),
            backoff_base_ms: Some(10),
            backoff_max_ms: Some(90),
            ..Overrides::default()
        };
        let s = Settings::resolve(o, file).unwrap();
        assert_eq!(
            (s.lock_node_timeout_ms, s.backoff_base_ms, s.backoff_max_ms),
            (30, 10, 90)
        );
        // Values whose deadlines would overflow are refused by name, not left to panic.
        let key = |o: Overrides| Settings::resolve(o, FileConfig::default()).unwrap_err().key;
        let huge = Overrides {
            job_timeout_secs: Some(u64::MAX),
            ..Overrides::default()
        };
        assert_eq!(key(huge), "job_timeout_secs");
        let huge = Overrides {
            lock_ttl_ms: Some(u64::MAX),
            ..Overrides::default()
        };
        assert_eq!(key(huge), "lock_ttl_ms");
        let huge = Overrides {
            lock_node_timeout_ms: Some(u64::MAX),
            ..Overrides::default()
        };
        assert_eq!(key(huge), "lock_node_timeout_ms");
        let huge = Overrides {
            visibility_timeout_ms: Some(u64::MAX),
            ..Overrides::default()
        };
        assert_eq!(key(huge), "visibility_timeout_ms");
        let huge = Overrides {
            shutdown_timeout_secs: Some(u64::MAX),
            ..Overrides::default()
        };
        assert_eq!(key(huge), "shutdown_timeout_secs");
    }

    #[test]
    fn job_runner_queue_beats_redis_url_beats_file() {
        let file = FileConfig {
            queue: Some("redis://file:6379".into()),
            ..FileConfig::default()
        };
        let o = Overrides {
            redis_url: Some("redis://env:6379".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Settings::resolve(o.clone(), file.clone()).unwrap().queue,
            "redis://env:6379"
        );
        let o = Overrides {
            queue: Some("redis://flag:6379".into()),
            ..o
        };
        assert_eq!(
            Settings::resolve(o, file).unwrap().queue,
            "redis://flag:6379"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let bad = |o: Overrides, f: FileConfig| Settings::resolve(o, f).unwrap_err().key;
        assert_eq!(
            bad(
                Overrides {
                    concurrency: Some(0),
                    ..Overrides::default()
                },
                FileConfig::default()
            ),
            "concurrency"
        );
        assert_eq!(
            bad(
                Overrides::default(),
                FileConfig {
                    threads: Some(0),
                    ..FileConfig::default()
                }
            ),
            "threads"
        );
        assert_eq!(
            bad(
                Overrides::default(),
                FileConfig {
                    lock_nodes: Some(vec!["http//nope".into()]),
                    ..FileConfig::default()
                }
            ),
            "lock_nodes"
        );
        assert_eq!(
            bad(
                Overrides {
                    visibility_timeout_ms: Some(5_000),
                    ..Overrides::default()
                },
                FileConfig::default()
            ),
            "visibility_timeout_ms"
        );
        assert_eq!(
            bad(
                Overrides {
                    metrics_addr: Some("nine".into()),
                    ..Overrides::default()
                },
                FileConfig::default()
            ),
            "metrics_addr"
        );
        let no_nodes = Settings::resolve(Overrides::default(), FileConfig::default()).unwrap();
        assert_eq!(no_nodes.require_lock_nodes().unwrap_err().key, "lock_nodes");
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let err = toml::from_str::<FileConfig>("concurency = 3\n").unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://u:secret@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
