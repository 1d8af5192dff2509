//! The runner's builder: consuming setters over [`RunnerSettings`].

use std::time::Duration;

use fencelock::{Redlock, RetryPolicy};

use super::settings::RunnerSettings;
use crate::handler::Registry;
use crate::queue::Queue;
use crate::telemetry::Health;

/// Builds a [`Runner`](crate::Runner). Consuming setters; checked by `build()`.
///
/// | setting | default |
/// |---|---|
/// | [`concurrency`](Self::concurrency) | 16 jobs at once |
/// | [`lock_ttl`](Self::lock_ttl) | 10 s, auto-extended every ttl/3 |
/// | [`lock_retry`](Self::lock_retry) | 2 retries, 50 ms + up to 100 ms jitter, then requeue |
/// | [`visibility_timeout`](Self::visibility_timeout) | 30 s |
/// | [`job_timeout`](Self::job_timeout) | 5 min |
/// | [`cancel_grace`](Self::cancel_grace) | 10 s, or less if the visibility timeout requires |
/// | [`shutdown_timeout`](Self::shutdown_timeout) | 25 s |
/// | [`max_attempts`](Self::max_attempts) | 5 |
/// | [`backoff`](Self::backoff) | 1 s doubling, at most 60 s, full jitter |
/// | [`requeue_delay`](Self::requeue_delay) | 125–250 ms, doubling per contended try, at most 5 s |
/// | [`once`](Self::once) | false |
#[derive(Debug)]
#[must_use = "a builder does nothing until `build()`"]
pub struct RunnerBuilder {
    pub(super) queue: Queue,
    pub(super) locks: Redlock,
    pub(super) handlers: Registry,
    pub(super) settings: RunnerSettings,
    pub(super) health: Option<Health>,
}

impl RunnerBuilder {
    pub(super) fn new(queue: Queue, locks: Redlock, handlers: Registry) -> Self {
        RunnerBuilder {
            queue,
            locks,
            handlers,
            settings: RunnerSettings::default(),
            health: None,
        }
    }

    /// All settings at once, replacing those set before.
    pub fn settings(mut self, settings: RunnerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// How many jobs run at once in this process.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n;
        self
    }

    /// The TTL of each job's lock. The watchdog extends it every ttl/3 while the handler
    /// runs, so a crashed runner's locks free up within one TTL.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lock_ttl = ttl;
        self
    }

    /// How long to try for a contended lock before putting the job back.
    pub fn lock_retry(mut self, policy: RetryPolicy) -> Self {
        self.settings.lock_retry = policy;
        self
    }

    /// How long an entry may go unacknowledged, with no sign of life from its worker,
    /// before another runner reclaims it. Running jobs keep their entries fresh as long as
    /// they hold their locks, so this only bounds how long a crashed or stalled runner's
    /// jobs wait. Must be at least the lock TTL + the cancel grace + a third of the TTL.
    pub fn visibility_timeout(mut self, t: Duration) -> Self {
        self.settings.visibility = t;
        self
    }

    /// The longest a handler may run; then it is cancelled and the job retried.
    pub fn job_timeout(mut self, t: Duration) -> Self {
        self.settings.job_timeout = t;
        self
    }

    /// How long a cancelled handler has to return before its future is dropped. At
    /// shutdown it is cut to a fifth of the [`shutdown_timeout`](Self::shutdown_timeout)
    /// if that is shorter. Unset, it is 10 s, or what the visibility timeout leaves after
    /// the lock TTL and a third of it, if that is less.
    pub fn cancel_grace(mut self, t: Duration) -> Self {
        self.settings.cancel_grace = Some(t);
        self
    }

    /// On shutdown, how long the runner takes at most to stop. Running jobs may finish
    /// until the last part of it (the cancel grace, at most a fifth of the timeout); then
    /// the rest are cancelled, given that last part to return, put back and unlocked.
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.settings.shutdown_timeout = t;
        self
    }

    /// Attempts before a transiently failing job goes to dead letters (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n;
        self
    }

    /// Retry delays: `base × 2^attempt`, capped at `max`, with full jitter.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.backoff_base = base;
        self.settings.backoff_max = max;
        self
    }

    /// The first delay before a job whose lock was contended runs again; it doubles with
    /// each contended try in a row, up to 5 s, jittered over its upper half.
    pub fn requeue_delay(mut self, max: Duration) -> Self {
        self.settings.requeue_delay = max;
        self
    }

    /// Stop by itself once the queue is drained: nothing to fetch, nothing delayed,
    /// nothing pending, nothing running.
    pub fn once(mut self, once: bool) -> Self {
        self.settings.once = once;
        self
    }

    /// Report the fetch loop's pulse to `health` (for `/healthz`).
    pub fn health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }
}
