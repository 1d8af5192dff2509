//! The runner: a fetch loop that hands jobs to up to `concurrency` workers, each running
//! one job's critical section under its lock.
//!
//! Per job: lock the resource (auto-extended while the handler runs), run the handler
//! with the fencing token and a cancel signal, then acknowledge the entry and release the
//! lock together. What happens to a job at each step is decided in one place,
//! `disposition`; `process` carries it out against the queue and the lock.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fencelock::Redlock;

use crate::handler::Registry;
use crate::queue::Queue;
use crate::telemetry::Health;

mod backoff;
mod builder;
mod disposition;
mod fetch;
mod process;
mod report;
mod settings;
mod shared;
mod supervise;

pub use builder::RunnerBuilder;
pub use report::RunReport;
pub use settings::{ConfigError, MAX_TIMEOUT, RunnerSettings};

use shared::Shared;

/// A job runner: fetches jobs from its [`Queue`] and runs each under a lock from its
/// [`Redlock`] client. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    shared: Arc<Shared>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("worker", &self.shared.worker)
            .field("handlers", &self.shared.handlers)
            .field("concurrency", &self.shared.settings.concurrency)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A builder for a runner on `queue`, locking with `locks` (built with fencing on),
    /// running `handlers`.
    pub fn builder(queue: Queue, locks: Redlock, handlers: Registry) -> RunnerBuilder {
        RunnerBuilder::new(queue, locks, handlers)
    }

    /// The queue it runs jobs from.
    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    /// The fetch loop's health, for `/healthz`.
    pub fn health(&self) -> Health {
        self.shared.health.clone()
    }

    /// Runs until `shutdown` resolves (or, with [`once`](RunnerBuilder::once), until the
    /// queue is drained).
    ///
    /// On shutdown it stops fetching and returns within the shutdown timeout. Running jobs
    /// may finish until its last part (the cancel grace, at most a fifth of the timeout);
    /// jobs still running then are cancelled and given that last part to return, their
    /// locks released, and they are put back to run again; if even that fails, their
    /// entries stay pending and another runner reclaims them. No job is lost.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the running jobs' futures: their guards release their
    /// locks in the background and their entries stay pending, to be reclaimed after the
    /// visibility timeout. Prefer resolving `shutdown`.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> RunReport {
        fetch::run(self.shared.clone(), shutdown).await
    }
}

impl RunnerBuilder {
    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// Names the first setting that is out of range, by its TOML key: zero concurrency
    /// or attempts, a TTL or timeout out of range, a visibility timeout shorter than the
    /// lock TTL + the cancel grace + a third of the TTL, a client without fencing tokens,
    /// or no handlers.
    pub fn build(self) -> Result<Runner, ConfigError> {
        self.settings.check()?;
        if !self.locks.fencing() {
            return Err(ConfigError::new(
                "lock_nodes",
                "the lock client must be built with fencing(true): handlers need tokens",
            ));
        }
        if self.handlers.is_empty() {
            return Err(ConfigError::new("handlers", "no handler is registered"));
        }
        let health = self
            .health
            .unwrap_or_else(|| Health::new(Duration::from_secs(15)));
        Ok(Runner {
            shared: Arc::new(Shared {
                worker: self.queue.consumer().into(),
                kinds: self.handlers.kinds().map(str::to_owned).collect(),
                queue: self.queue,
                locks: self.locks,
                handlers: self.handlers,
                settings: self.settings,
                health,
            }),
        })
    }
}
