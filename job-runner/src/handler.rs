//! What runs a job: the [`Handler`] trait, the context a handler gets, and the registry
//! that maps job kinds to handlers.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fencelock::LockHealth;
use tokio_util::sync::CancellationToken;

use crate::job::Job;

/// What a handler gets besides the job.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The fencing token of the lock the job runs under. Pass it with every write to the
    /// protected resource, and have the resource reject tokens older than the newest it
    /// has seen.
    pub fencing_token: u64,
    /// Cancelled when the handler must stop: the lock was lost, the job timed out, or the
    /// runner is shutting down. Stop promptly; anything written after it fires may be
    /// rejected by the fence.
    pub cancel: CancellationToken,
    /// The lock's health, for handlers that want to checkpoint when it is at risk.
    pub lock: LockHealth,
    /// The name of the worker process (its consumer name), for audit logs.
    pub worker: Arc<str>,
}

/// Why a handler did not finish a job. The runner retries transient failures with backoff
/// and dead-letters permanent ones.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerError {
    /// Try again later (a timeout, an unavailable dependency, a lost lock).
    Transient(String),
    /// Trying again cannot help (bad payload, a refused charge); goes to dead letters.
    Permanent(String),
}

impl HandlerError {
    /// A transient failure.
    pub fn transient(reason: impl Into<String>) -> Self {
        HandlerError::Transient(reason.into())
    }

    /// A permanent failure.
    pub fn permanent(reason: impl Into<String>) -> Self {
        HandlerError::Permanent(reason.into())
    }

    /// Whether the runner retries it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Transient(_))
    }

    /// The reason given.
    pub fn reason(&self) -> &str {
        match self {
            HandlerError::Transient(r) | HandlerError::Permanent(r) => r,
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for HandlerError {}

/// The critical section of one kind of job.
///
/// The runner calls it with the job's lock held and kept alive by auto-extension. It
/// returns `Ok` when the job is done (the runner then acknowledges it), or a
/// [`HandlerError`].
///
/// ```
/// use job_runner::{Handler, HandlerError, Job, JobContext};
///
/// struct Greet;
///
/// impl Handler for Greet {
///     async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
///         let name = job.payload["name"]
///             .as_str()
///             .ok_or_else(|| HandlerError::permanent("payload has no `name`"))?;
///         println!("hello {name}, under fencing token {}", ctx.fencing_token);
///         Ok(())
///     }
/// }
/// ```
///
/// # Cancel safety
///
/// The runner first signals [`JobContext::cancel`] and waits a grace period; only if the
/// handler has not returned by then is its future dropped. Write handlers so that being
/// dropped at an `.await` leaves the protected resource consistent (for example, one
/// transaction per write, guarded by the fencing token).
pub trait Handler: Send + Sync + 'static {
    /// Runs the job.
    fn handle(
        &self,
        job: &Job,
        ctx: JobContext,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A boxed handler future.
pub(crate) type HandleFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// The object-safe form of [`Handler`] the registry stores.
pub(crate) trait DynHandler: Send + Sync {
    fn handle_boxed<'a>(&'a self, job: &'a Job, ctx: JobContext) -> HandleFuture<'a>;
}

impl<H: Handler> DynHandler for H {
    fn handle_boxed<'a>(&'a self, job: &'a Job, ctx: JobContext) -> HandleFuture<'a> {
        Box::pin(self.handle(job, ctx))
    }
}

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn DynHandler>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers `handler` for jobs of `kind`, replacing any earlier one.
    #[must_use]
    pub fn with(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.insert(kind, handler);
        self
    }

    /// Registers `handler` for jobs of `kind`, replacing any earlier one.
    pub fn insert(&mut self, kind: impl Into<String>, handler: impl Handler) {
        self.handlers.insert(kind.into(), Arc::new(handler));
    }

    /// The registered kinds.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    pub(crate) fn get(&self, kind: &str) -> Option<Arc<dyn DynHandler>> {
        self.handlers.get(kind).cloned()
    }
}

/// Does nothing and succeeds: for smoke tests and for measuring the runner itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

impl Handler for Noop {
    async fn handle(&self, _job: &Job, _ctx: JobContext) -> Result<(), HandlerError> {
        Ok(())
    }
}
