//! A lock-guarded job runner built on [`fencelock`].
//!
//! Jobs travel through a Redis Stream with a consumer group ([`queue`]). A [`Runner`]
//! fetches them and runs each one's [`Handler`] under a quorum lock on the job's resource,
//! kept alive by auto-extension, with the lock's fencing token in hand. For any one
//! resource at most one handler runs at a time, and a handler that lost its lock cannot
//! commit: the protected resource (the payment ledger, in the built-in example behind
//! the `payment-demo` feature) rejects its stale token.
//!
//! Layers, each importing only those below it: [`job`] and [`handler`] (what a job is and
//! what runs it); [`queue`] (the stream, delayed set and dead letters); the runner (its
//! settings and builder, the fetch loop, per-job supervision, and `disposition`, the one
//! place that decides what becomes of a job); [`handlers`] (`exec`, and `payment` with the
//! feature). [`telemetry`] and [`error`] are leaves.
//!
//! ```no_run
//! use job_runner::{Handler, HandlerError, Job, JobContext, Queue, Registry, Runner};
//! use job_runner::fencelock::Redlock;
//!
//! struct SendEmail;
//!
//! impl Handler for SendEmail {
//!     async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
//!         println!("sending {} under token {}", job.payload, ctx.fencing_token);
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let locks = Redlock::builder()
//!     .nodes(["redis://127.0.0.1:7001", "redis://127.0.0.1:7002", "redis://127.0.0.1:7003"])
//!     .fencing(true)
//!     .build()
//!     .await?;
//! let queue = Queue::connect("redis://127.0.0.1:6379", "jobs", "worker-1").await?;
//! let runner = Runner::builder(queue, locks, Registry::new().with("email", SendEmail))
//!     .concurrency(8)
//!     .build()?;
//! runner.run(async { tokio::signal::ctrl_c().await.ok(); }).await;
//! # Ok(()) }
//! ```

pub mod error;
pub mod handler;
pub mod handlers;
pub mod job;
#[cfg(feature = "payment-demo")]
pub mod ledger;
pub mod queue;
mod runner;
pub mod telemetry;

pub use fencelock;
pub use handler::{Handler, HandlerError, JobContext, Noop, Registry};
pub use job::{Job, NewJob};
pub use queue::stats::QueueStats;
pub use queue::{Delivery, Queue, QueueError, Reclaimed};
pub use runner::{ConfigError, MAX_TIMEOUT, RunReport, Runner, RunnerBuilder, RunnerSettings};

#[cfg(test)]
mod send_sync {
    fn is_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn shared_types_are_send_sync() {
        is_send_sync::<crate::Runner>();
        is_send_sync::<crate::Queue>();
        is_send_sync::<crate::Registry>();
        is_send_sync::<crate::JobContext>();
        is_send_sync::<crate::telemetry::Health>();
    }
}
