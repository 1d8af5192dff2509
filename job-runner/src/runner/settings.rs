//! A runner's settings, their defaults, and the one place they are checked.

use std::fmt;
use std::time::Duration;

use fencelock::RetryPolicy;

use super::disposition::Policy;

/// A setting that is missing or out of range, named as the TOML file spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting at fault.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    /// An error in `key`.
    pub fn new(key: &str, problem: impl Into<String>) -> Self {
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

/// The longest job timeout, visibility timeout or shutdown timeout: a week. Longer is a
/// mistake (a unit mix-up, say), and would overflow the deadlines computed from it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The cancel grace unless the visibility timeout is too short for it.
const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(10);

/// A runner's settings. [`RunnerBuilder`](crate::RunnerBuilder) sets them one by one
/// (its table gives each default), or all at once with
/// [`settings`](crate::RunnerBuilder::settings); [`check`](Self::check) is the one place
/// they are validated.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunnerSettings {
    /// Jobs at once in this process.
    pub concurrency: usize,
    /// Each job's lock TTL, extended every ttl/3 while the handler runs.
    pub lock_ttl: Duration,
    /// How long to try for a contended lock before putting the job back.
    pub lock_retry: RetryPolicy,
    /// How long an entry may go unacknowledged with no sign of life before another
    /// runner reclaims it.
    pub visibility: Duration,
    /// The longest a handler may run.
    pub job_timeout: Duration,
    /// How long a cancelled handler has to return; `None`: 10 s, or less if the
    /// visibility timeout requires.
    pub cancel_grace: Option<Duration>,
    /// The longest the runner takes to stop on shutdown.
    pub shutdown_timeout: Duration,
    /// Attempts before a failing job goes to dead letters.
    pub max_attempts: u32,
    /// The first retry delay.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
    /// The first delay after a contended lock.
    pub requeue_delay: Duration,
    /// Stop by itself once the queue is drained.
    pub once: bool,
    pub(crate) fetch_block: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        RunnerSettings {
            concurrency: 16,
            lock_ttl: Duration::from_secs(10),
            lock_retry: RetryPolicy::new(2, Duration::from_millis(50), Duration::from_millis(100)),
            visibility: Duration::from_secs(30),
            job_timeout: Duration::from_secs(300),
            cancel_grace: None,
            shutdown_timeout: Duration::from_secs(25),
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            requeue_delay: Duration::from_millis(250),
            fetch_block: Duration::from_millis(500),
            once: false,
        }
    }
}

impl RunnerSettings {
    /// At shutdown, the share of the shutdown timeout that cancelled jobs get to wind down:
    /// the cancel grace, but no more than a fifth of the timeout, so that the whole
    /// shutdown (jobs finishing, then the rest cancelled, put back and unlocked) fits in
    /// the timeout a process supervisor allows before it kills the process.
    pub(crate) fn shutdown_wind_down(&self) -> Duration {
        self.cancel_grace().min(self.shutdown_timeout / 5)
    }

    /// The cancel grace in force: as set, or 10 s cut to what the visibility timeout
    /// leaves after the lock TTL and a third of it.
    pub(crate) fn cancel_grace(&self) -> Duration {
        self.cancel_grace.unwrap_or_else(|| {
            DEFAULT_CANCEL_GRACE.min(self.visibility.saturating_sub(self.visibility_floor()))
        })
    }

    /// What decides a job's fate.
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            requeue_delay: self.requeue_delay,
        }
    }

    /// What the visibility timeout must cover besides the cancel grace: the lock TTL (a
    /// stalled runner's lock must have expired before another runner reclaims its entry,
    /// or that one would find the lock taken and schedule a copy of the job) and a third
    /// of it (one extension period) as a margin.
    fn visibility_floor(&self) -> Duration {
        self.lock_ttl + self.lock_ttl / 3
    }

    /// Checks every value.
    ///
    /// # Errors
    ///
    /// The first setting out of range, named as the TOML file spells it.
    pub fn check(&self) -> Result<(), ConfigError> {
        let floor = self.visibility_floor();
        let bad = |key: &str, problem: String| Err(ConfigError::new(key, problem));
        if !(1..=4096).contains(&self.concurrency) {
            return bad(
                "concurrency",
                format!("must be 1..=4096, got {}", self.concurrency),
            );
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if self.lock_ttl < Duration::from_millis(100) || self.lock_ttl > fencelock::MAX_TTL {
            return bad(
                "lock_ttl_ms",
                format!(
                    "must be 100..={} (a day), got {}",
                    fencelock::MAX_TTL.as_millis(),
                    self.lock_ttl.as_millis()
                ),
            );
        }
        if self.visibility > MAX_TIMEOUT {
            return bad(
                "visibility_timeout_ms",
                format!(
                    "must be at most {} (a week), got {}",
                    MAX_TIMEOUT.as_millis(),
                    self.visibility.as_millis()
                ),
            );
        }
        if self.visibility <= floor || self.visibility < floor + self.cancel_grace() {
            return bad(
                "visibility_timeout_ms",
                format!(
                    "must be at least the lock TTL + the cancel grace + a third of the TTL \
                     ({:?} + {:?} + {:?}), and more than {:?} without a cancel grace; got {:?}",
                    self.lock_ttl,
                    self.cancel_grace(),
                    self.lock_ttl / 3,
                    floor,
                    self.visibility
                ),
            );
        }
        if self.job_timeout.is_zero() || self.job_timeout > MAX_TIMEOUT {
            return bad(
                "job_timeout_secs",
                format!(
                    "must be 1..={} (a week), got {}",
                    MAX_TIMEOUT.as_secs(),
                    self.job_timeout.as_secs()
                ),
            );
        }
        if self.shutdown_timeout > MAX_TIMEOUT {
            return bad(
                "shutdown_timeout_secs",
                format!(
                    "must be at most {} (a week), got {}",
                    MAX_TIMEOUT.as_secs(),
                    self.shutdown_timeout.as_secs()
                ),
            );
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return bad(
                "backoff_max_ms",
                format!(
                    "backoff_base_ms must be positive and backoff_max_ms at least that, got {} and {}",
                    self.backoff_base.as_millis(),
                    self.backoff_max.as_millis()
                ),
            );
        }
        Ok(())
    }
}
