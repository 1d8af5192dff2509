//! The runner: a fetch loop that hands jobs to up to `concurrency` workers, each running
//! one job's critical section under its lock.
//!
//! Per job: lock the resource (auto-extended while the handler runs), run the handler
//! with the fencing token and a cancel signal, then acknowledge the entry and release the
//! lock together. A contended lock puts the job back with jitter without spending an
//! attempt; a transient failure retries with exponential backoff; a permanent failure, or
//! the last attempt, goes to dead letters before the ack. A lock lost mid-job cancels the
//! handler and retries the job.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use fencelock::{ErrorKind, LockState, Redlock, RetryPolicy, WatchdogConfig};
use futures_util::FutureExt;
use metrics::{counter, gauge, histogram};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::{HandleFuture, HandlerError, JobContext, Registry};
use crate::job::Job;
use crate::queue::{Delivery, Queue, Reclaimed};
use crate::telemetry::{Health, names};

/// Why the runner could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting at fault.
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Settings of a [`Runner`]; see [`RunnerBuilder`] for each default.
#[derive(Debug, Clone)]
struct Settings {
    concurrency: usize,
    lock_ttl: Duration,
    lock_retry: RetryPolicy,
    visibility: Duration,
    job_timeout: Duration,
    /// `None` until set: then derived from the visibility timeout at build.
    cancel_grace: Option<Duration>,
    shutdown_timeout: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    requeue_delay: Duration,
    fetch_block: Duration,
    once: bool,
}

impl Settings {
    /// At shutdown, the share of the shutdown timeout that cancelled jobs get to wind down:
    /// the cancel grace, but no more than a fifth of the timeout, so that the whole
    /// shutdown (jobs finishing, then the rest cancelled, put back and unlocked) fits in
    /// the timeout a process supervisor allows before it kills the process.
    fn shutdown_wind_down(&self) -> Duration {
        self.cancel_grace().min(self.shutdown_timeout / 5)
    }

    fn cancel_grace(&self) -> Duration {
        self.cancel_grace.unwrap_or(DEFAULT_CANCEL_GRACE)
    }

    /// What the visibility timeout must cover besides the cancel grace: the lock TTL (a
    /// stalled runner's lock must have expired before another runner reclaims its entry,
    /// or that one would find the lock taken and schedule a copy of the job) and a third
    /// of it (one extension period) as a margin.
    fn visibility_floor(&self) -> Duration {
        self.lock_ttl + self.lock_ttl / 3
    }
}

/// The cancel grace unless the visibility timeout is too short for it.
const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(10);

/// Builds a [`Runner`]. Consuming setters; checked by [`build`](Self::build).
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
    queue: Queue,
    locks: Redlock,
    handlers: Registry,
    settings: Settings,
    health: Option<Health>,
}

impl RunnerBuilder {
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

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// Names the first setting that is out of range: zero concurrency or attempts, a
    /// zero TTL or timeout, a visibility timeout shorter than the lock TTL + the cancel
    /// grace + a third of the TTL, a client without fencing tokens, or no handlers.
    pub fn build(mut self) -> Result<Runner, ConfigError> {
        let floor = self.settings.visibility_floor();
        if self.settings.cancel_grace.is_none() {
            let room = self.settings.visibility.saturating_sub(floor);
            self.settings.cancel_grace = Some(DEFAULT_CANCEL_GRACE.min(room));
        }
        let s = &self.settings;
        let bad = |key, problem: String| Err(ConfigError { key, problem });
        if s.concurrency == 0 || s.concurrency > 4096 {
            return bad(
                "concurrency",
                format!("must be 1..=4096, got {}", s.concurrency),
            );
        }
        if s.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if s.lock_ttl < Duration::from_millis(100) {
            return bad(
                "lock_ttl",
                format!("must be at least 100ms, got {:?}", s.lock_ttl),
            );
        }
        if s.visibility <= floor || s.visibility < floor + s.cancel_grace() {
            return bad(
                "visibility_timeout",
                format!(
                    "must be at least the lock TTL + the cancel grace + a third of the TTL \
                     ({:?} + {:?} + {:?}), and more than {:?} without a cancel grace; got {:?}",
                    s.lock_ttl,
                    s.cancel_grace(),
                    s.lock_ttl / 3,
                    floor,
                    s.visibility
                ),
            );
        }
        if s.job_timeout.is_zero() {
            return bad("job_timeout", "must be positive".into());
        }
        if s.backoff_base.is_zero() || s.backoff_max < s.backoff_base {
            return bad(
                "backoff",
                format!(
                    "base must be positive and max at least base, got {:?} and {:?}",
                    s.backoff_base, s.backoff_max
                ),
            );
        }
        if !self.locks.fencing() {
            return bad(
                "lock_nodes",
                "the lock client must be built with fencing(true): handlers need tokens".into(),
            );
        }
        if self.handlers.is_empty() {
            return bad("handlers", "no handler is registered".into());
        }
        let health = self
            .health
            .unwrap_or_else(|| Health::new(Duration::from_secs(15)));
        Ok(Runner {
            inner: Arc::new(Inner {
                worker: self.queue.consumer().into(),
                queue: self.queue,
                locks: self.locks,
                handlers: self.handlers,
                settings: self.settings,
                health,
            }),
        })
    }
}

/// A job runner: fetches jobs from its [`Queue`] and runs each under a lock from its
/// [`Redlock`] client. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    locks: Redlock,
    handlers: Registry,
    settings: Settings,
    health: Health,
    worker: Arc<str>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("worker", &self.inner.worker)
            .field("handlers", &self.inner.handlers)
            .field("concurrency", &self.inner.settings.concurrency)
            .finish_non_exhaustive()
    }
}

/// What a run did, for the caller and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Jobs done and acknowledged.
    pub done: u64,
    /// Jobs put back for a retry after a transient failure.
    pub retried: u64,
    /// Jobs put back because their lock was contended or the lock quorum unreachable.
    pub requeued: u64,
    /// Jobs sent to dead letters.
    pub dead: u64,
    /// Entries reclaimed from other consumers.
    pub reclaimed: u64,
    /// Jobs cut short by shutdown and put back.
    pub interrupted: u64,
    /// Jobs whose entry another runner reclaimed while this one stalled; left to it.
    pub taken_over: u64,
}

/// How one job ended, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    Done,
    Retried,
    Requeued,
    Dead,
    Interrupted,
    /// Its entry could not be updated; it stays pending and is reclaimed later.
    Left,
    /// Its entry is another runner's now (reclaimed while this one stalled); left to it.
    TakenOver,
}

impl Finished {
    fn label(self) -> &'static str {
        match self {
            Finished::Done => "done",
            Finished::Retried => "retried",
            Finished::Requeued => "requeued",
            Finished::Dead => "dead",
            Finished::Interrupted => "interrupted",
            Finished::Left => "left_pending",
            Finished::TakenOver => "taken_over",
        }
    }
}

impl Runner {
    /// A builder for a runner on `queue`, locking with `locks` (built with fencing on),
    /// running `handlers`.
    pub fn builder(queue: Queue, locks: Redlock, handlers: Registry) -> RunnerBuilder {
        RunnerBuilder {
            queue,
            locks,
            handlers,
            settings: Settings {
                concurrency: 16,
                lock_ttl: Duration::from_secs(10),
                lock_retry: RetryPolicy::new(
                    2,
                    Duration::from_millis(50),
                    Duration::from_millis(100),
                ),
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
            },
            health: None,
        }
    }

    /// The queue it runs jobs from.
    pub fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    /// The fetch loop's health, for `/healthz`.
    pub fn health(&self) -> Health {
        self.inner.health.clone()
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
        let inner = &self.inner;
        let s = &inner.settings;
        let slots = Arc::new(Semaphore::new(s.concurrency));
        let hard_stop = CancellationToken::new();
        let mut jobs: JoinSet<Finished> = JoinSet::new();
        let mut report = RunReport::default();
        let mut shutdown = std::pin::pin!(shutdown);
        // Both are due at the first turn (`checked_sub`: the clock may be younger).
        let mut last_promote = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        let mut last_reclaim = Instant::now()
            .checked_sub(s.visibility)
            .unwrap_or_else(Instant::now);
        let mut reclaim_cursor = String::from("0-0");
        let mut idle_turns = 0u32;
        tracing::info!(worker = %inner.worker, concurrency = s.concurrency, kinds = ?inner.handlers, "runner started");

        'fetch: loop {
            inner.health.beat();
            while let Some(done) = jobs.try_join_next() {
                tally(&mut report, done);
            }
            // Wait for a free worker, beating the pulse, and watching for shutdown.
            let permit = loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'fetch,
                    p = slots.clone().acquire_owned() => break p.expect("never closed"),
                    Some(done) = jobs.join_next(), if !jobs.is_empty() => tally(&mut report, done),
                    () = tokio::time::sleep(Duration::from_secs(1)) => inner.health.beat(),
                }
            };
            // Under load, one fetch per freed worker would cap throughput at the fetch
            // round-trip rate: wait until a quarter of the workers are free, or 1 ms at most,
            // so that a fetch fills several. Jobs finish in bursts (a node's reply ends a
            // whole batch of them), so the wait usually ends well before the 1 ms, which a
            // plain sleep would spend idle. The permits are only counted here, not kept.
            let enough = s.concurrency / 4;
            if slots.available_permits() + 1 < enough {
                let more = u32::try_from(enough - 1).expect("concurrency is at most 4096");
                let _ =
                    tokio::time::timeout(Duration::from_millis(1), slots.acquire_many(more)).await;
            }
            let free = slots.available_permits() + 1;

            if last_promote.elapsed() >= Duration::from_millis(200) {
                last_promote = Instant::now();
                let promoted = inner.queue.promote_due(256).await;
                inner.health.promote_done(promoted.is_ok());
                if let Err(e) = promoted {
                    tracing::warn!(error = %error_chain(&e), "promoting delayed jobs failed");
                }
            }
            let mut batch = Vec::new();
            if last_reclaim.elapsed() >= (s.visibility / 2).max(Duration::from_millis(500)) {
                last_reclaim = Instant::now();
                match inner
                    .queue
                    .reclaim(s.visibility, free, &reclaim_cursor)
                    .await
                {
                    Ok(Reclaimed {
                        entries: claimed,
                        cursor,
                        ..
                    }) => {
                        inner.health.reclaim_done(true);
                        reclaim_cursor = cursor;
                        if !claimed.is_empty() {
                            tracing::info!(count = claimed.len(), "reclaimed stalled entries");
                            counter!(names::RECLAIMED).increment(claimed.len() as u64);
                            report.reclaimed += claimed.len() as u64;
                        }
                        batch = claimed;
                    }
                    Err(e) => {
                        inner.health.reclaim_done(false);
                        tracing::warn!(error = %error_chain(&e), "reclaim failed");
                    }
                }
            }
            if batch.is_empty() {
                let block = if s.once {
                    Duration::from_millis(100)
                } else {
                    s.fetch_block
                };
                match inner.queue.fetch(free, block).await {
                    Ok(fetched) => {
                        inner.health.fetch_ok();
                        batch = fetched;
                    }
                    Err(e) => {
                        inner.health.fetch_failed();
                        tracing::warn!(error = %error_chain(&e), "fetch failed; retrying");
                        drop(permit);
                        tokio::select! {
                            () = &mut shutdown => break 'fetch,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        continue;
                    }
                }
            }
            if batch.is_empty() {
                drop(permit);
                if s.once && jobs.is_empty() {
                    idle_turns += 1;
                    // Drained only if nothing is delayed or pending anywhere either.
                    if idle_turns >= 3 && self.drained().await {
                        break 'fetch;
                    }
                }
                continue;
            }
            idle_turns = 0;
            // A signal that came while the fetch blocked: these jobs have not started, so
            // they go back at once rather than run during the shutdown.
            if (&mut shutdown).now_or_never().is_some() {
                drop(permit);
                self.put_back(batch).await;
                break 'fetch;
            }
            let mut permit = Some(permit);
            for delivery in batch {
                let permit = match permit.take() {
                    Some(p) => p,
                    None => slots
                        .clone()
                        .try_acquire_owned()
                        .expect("fetched no more than the free slots"),
                };
                let runner = self.clone();
                let hard_stop = hard_stop.clone();
                jobs.spawn(async move {
                    gauge!(names::IN_FLIGHT).increment(1.0);
                    let finished = runner.process(delivery, hard_stop).await;
                    gauge!(names::IN_FLIGHT).decrement(1.0);
                    drop(permit);
                    finished
                });
            }
        }

        inner.health.stopping();
        tracing::info!(
            running = jobs.len(),
            timeout_s = s.shutdown_timeout.as_secs_f64(),
            "stopped fetching; waiting for running jobs"
        );
        let deadline = tokio::time::sleep(s.shutdown_timeout - s.shutdown_wind_down());
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = jobs.join_next() => match next {
                    Some(done) => tally(&mut report, done),
                    None => break,
                },
                () = &mut deadline, if !hard_stop.is_cancelled() => {
                    tracing::warn!(running = jobs.len(), "shutdown timeout: cancelling running jobs");
                    hard_stop.cancel();
                }
            }
        }
        tracing::info!(?report, "runner stopped");
        report
    }

    /// Returns fetched jobs that will not run here to the queue, due at once. An entry
    /// that cannot be put back (or is not a job) stays pending and is reclaimed later.
    async fn put_back(&self, batch: Vec<Delivery>) {
        let queue = &self.inner.queue;
        let returns = batch.iter().filter_map(|d| {
            let job = d.job.as_ref().ok()?;
            Some(queue.retry_later(&d.entry_id, job, Duration::ZERO))
        });
        let returned = futures_util::future::join_all(returns).await;
        let failed = returned.iter().filter(|r| r.is_err()).count();
        tracing::info!(
            jobs = batch.len(),
            failed,
            "shutdown: put back jobs fetched as it began"
        );
    }

    /// Nothing waiting, delayed or pending in the queue.
    async fn drained(&self) -> bool {
        match self.inner.queue.stats().await {
            Ok(st) => st.depth == 0 && st.pending == 0 && st.delayed == 0,
            Err(_) => false,
        }
    }

    async fn process(&self, delivery: Delivery, hard_stop: CancellationToken) -> Finished {
        let started = Instant::now();
        let job = match &delivery.job {
            Ok(job) => job.clone(),
            Err(malformed) => {
                let reason = format!("malformed job: {}", malformed.reason);
                tracing::warn!(entry = %delivery.entry_id, %reason, "dead-lettering");
                let finished = self.dead(&delivery, "malformed", &reason).await;
                counter!(names::JOBS, "kind" => "(malformed)", "outcome" => finished.label())
                    .increment(1);
                tracing::info!(
                    entry = %delivery.entry_id,
                    outcome = finished.label(),
                    duration_ms = started.elapsed().as_secs_f64() * 1e3,
                    "job finished"
                );
                return finished;
            }
        };
        let span = tracing::info_span!(
            "job",
            id = %job.id,
            kind = %job.kind,
            resource = %job.resource,
            attempt = job.attempt,
            token = tracing::field::Empty,
        );
        // Only kinds this runner handles become label values: the kind is whatever a
        // producer wrote, and each value would be a time series kept for good.
        let kind = if self.inner.handlers.get(&job.kind).is_some() {
            job.kind.clone()
        } else {
            "unknown".to_owned()
        };
        let finished = self
            .process_job(delivery, job, hard_stop)
            .instrument(span.clone())
            .await;
        counter!(names::JOBS, "kind" => kind, "outcome" => finished.label()).increment(1);
        span.in_scope(|| {
            tracing::info!(
                outcome = finished.label(),
                duration_ms = started.elapsed().as_secs_f64() * 1e3,
                "job finished"
            );
        });
        finished
    }

    async fn process_job(
        &self,
        delivery: Delivery,
        mut job: Job,
        hard_stop: CancellationToken,
    ) -> Finished {
        let inner = &self.inner;
        let s = &inner.settings;
        // Every reclaim hands the same entry out again: one that keeps coming back took
        // its runners down or hung them each time, and would go on doing so.
        if delivery.deliveries > u64::from(s.max_attempts) {
            let reason = format!(
                "handed out {} times and never finished: each runner that took it crashed or \
                 stalled past the visibility timeout",
                delivery.deliveries
            );
            tracing::warn!(%reason, "dead-lettering");
            return self.dead(&delivery, "redelivered", &reason).await;
        }
        let Some(handler) = inner.handlers.get(&job.kind) else {
            let known: Vec<&str> = inner.handlers.kinds().collect();
            let reason = format!(
                "unknown kind `{}` (this runner handles: {})",
                job.kind,
                known.join(", ")
            );
            tracing::warn!(%reason, "dead-lettering");
            return self.dead(&delivery, "unknown_kind", &reason).await;
        };

        let started = Instant::now();
        let acquired = inner
            .locks
            .lock_with_retry(&[job.resource.as_str()], s.lock_ttl, s.lock_retry)
            .await;
        histogram!(names::LOCK_ACQUIRE_DURATION).record(started.elapsed().as_secs_f64());
        let guard = match acquired {
            Ok(guard) => {
                counter!(names::LOCK_ACQUIRE, "outcome" => "acquired").increment(1);
                job.requeues = 0;
                guard
            }
            Err(e) => {
                let (outcome, delay) = match e.kind() {
                    ErrorKind::Contended => {
                        let delay = contended_delay(
                            s.requeue_delay,
                            job.requeues,
                            &mut SmallRng::from_os_rng(),
                        );
                        job.requeues = job.requeues.saturating_add(1);
                        ("contended", delay)
                    }
                    ErrorKind::Config => {
                        counter!(names::LOCK_ACQUIRE, "outcome" => "error").increment(1);
                        let reason = format!("cannot lock resource `{}`: {e}", job.resource);
                        return self.dead(&delivery, "permanent", &reason).await;
                    }
                    // The lock quorum is unreachable (the error names the failed nodes):
                    // not the job's fault, so no attempt is spent; wait a little longer.
                    _ => {
                        tracing::warn!(error = %e, "lock quorum unavailable; job put back");
                        (
                            "no_quorum",
                            Duration::from_millis(500) + self.jitter(Duration::from_secs(1)),
                        )
                    }
                };
                counter!(names::LOCK_ACQUIRE, "outcome" => outcome).increment(1);
                tracing::debug!(
                    outcome,
                    delay_ms = delay.as_millis() as u64,
                    "lock not taken; job put back"
                );
                return match inner
                    .queue
                    .retry_later(&delivery.entry_id, &job, delay)
                    .await
                {
                    Ok(true) => Finished::Requeued,
                    Ok(false) => taken_over(),
                    Err(qe) => {
                        tracing::warn!(error = %error_chain(&qe), "requeue failed; the entry stays pending");
                        Finished::Left
                    }
                };
            }
        };
        let token = guard
            .fencing_token()
            .expect("fencing is on: checked at build");
        tracing::Span::current().record("token", token);

        let watchdog = guard.auto_extend_with(
            watchdog_for(s.job_timeout + s.cancel_grace() + s.lock_ttl, s.lock_ttl)
                .cancel_on_loss(false),
        );
        let health = watchdog.health();
        let cancel = CancellationToken::new();
        let ctx = JobContext {
            fencing_token: token,
            cancel: cancel.clone(),
            lock: health.clone(),
            worker: inner.worker.clone(),
        };
        let ran_at = Instant::now();
        let ended = {
            let job = &job;
            let handler_future: HandleFuture<'_> = Box::pin(async move {
                // A panicking handler would panic again on every redelivery: dead-letter it.
                AssertUnwindSafe(handler.handle_boxed(job, ctx))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Err(HandlerError::permanent("the handler panicked")))
            });
            self.supervise(handler_future, &delivery, &health, &cancel, &hard_stop)
                .await
        };
        let elapsed = ran_at.elapsed();
        histogram!(names::JOB_DURATION, "kind" => job.kind.clone()).record(elapsed.as_secs_f64());
        let guard = watchdog.stop().await;

        let (result, why) = match ended {
            Ended::TakenOver(returned) => {
                tracing::debug!(handler_returned = returned.is_some(), "handler stopped");
                // Its new owner decides what happens to the job; the lock goes at once.
                if let Err(e) = guard.release().await {
                    tracing::debug!(error = %e, "release failed; the lock expires by its TTL");
                }
                return taken_over();
            }
            Ended::Returned(r) => (r, None),
            Ended::Lost(r) => {
                counter!(names::LOCKS_LOST).increment(1);
                (r, Some("lock lost"))
            }
            Ended::TimedOut(r) => (r, Some("job timed out")),
            Ended::Interrupted(r) => (r, Some("shutdown")),
        };
        match (result, why) {
            (Some(Ok(())), why) => {
                if let Some(why) = why {
                    tracing::warn!(why, "handler finished after it was told to stop");
                }
                let (acked, released) =
                    tokio::join!(inner.queue.ack(&delivery.entry_id), guard.release());
                if let Err(e) = released {
                    tracing::debug!(error = %e, "release failed; the lock expires by its TTL");
                }
                match acked {
                    Ok(true) => Finished::Done,
                    Ok(false) => taken_over(),
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "ack failed; the entry will be reclaimed and run again");
                        Finished::Left
                    }
                }
            }
            (result, why) => {
                // Release first: the retry may run at once, elsewhere.
                if let Err(e) = guard.release().await {
                    tracing::debug!(error = %e, "release failed; the lock expires by its TTL");
                }
                match (result, why) {
                    (_, Some("shutdown")) => {
                        match inner
                            .queue
                            .retry_later(&delivery.entry_id, &job, Duration::ZERO)
                            .await
                        {
                            Ok(true) => Finished::Interrupted,
                            Ok(false) => taken_over(),
                            Err(_) => Finished::Left,
                        }
                    }
                    (Some(Err(HandlerError::Permanent(reason))), _) => {
                        tracing::warn!(%reason, "permanent failure; dead-lettering");
                        self.dead(&delivery, "permanent", &reason).await
                    }
                    (result, why) => {
                        let reason = match (result, why) {
                            (Some(Err(e)), Some(why)) => format!("{why}: {e}"),
                            (Some(Err(e)), None) => e.to_string(),
                            (_, why) => format!(
                                "{}; handler did not stop within the grace period",
                                why.unwrap_or("cancelled")
                            ),
                        };
                        self.retry(&delivery, job.clone(), &reason).await
                    }
                }
            }
        }
    }

    /// Runs the handler until it returns, its lock is lost, it times out, its entry is
    /// taken over, or shutdown's hard stop; then cancels it and gives it the cancel grace.
    /// Keeps its entry fresh all along, grace included, because the lock is extended all
    /// along too: an entry left to go stale while its lock is held would be reclaimed by a
    /// runner that finds the lock taken and schedules a second copy of the job.
    async fn supervise(
        &self,
        mut fut: HandleFuture<'_>,
        delivery: &Delivery,
        health: &fencelock::LockHealth,
        cancel: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Ended {
        let s = &self.inner.settings;
        let timeout = tokio::time::sleep(s.job_timeout);
        tokio::pin!(timeout);
        let mut touch =
            tokio::time::interval_at(Instant::now() + s.visibility / 3, s.visibility / 3);
        let mut at_risk_seen = false;
        let mut taken = false;
        let stop: fn(Option<Result<(), HandlerError>>) -> Ended;
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Ended::Returned(Some(r)),
                state = health.at_risk(), if !at_risk_seen => {
                    at_risk_seen = true;
                    if let LockState::Lost(reason) = state {
                        tracing::warn!(?reason, "lock lost mid-job; cancelling the handler");
                        stop = Ended::Lost;
                        break;
                    }
                    counter!(names::LOCK_EXTEND_FAILED).increment(1);
                    tracing::warn!("lock extensions failing; the lock is at risk");
                }
                reason = health.lost(), if at_risk_seen => {
                    tracing::warn!(?reason, "lock lost mid-job; cancelling the handler");
                    stop = Ended::Lost;
                    break;
                }
                () = &mut timeout => {
                    tracing::warn!(timeout_s = s.job_timeout.as_secs_f64(), "job timed out; cancelling the handler");
                    stop = Ended::TimedOut;
                    break;
                }
                () = hard_stop.cancelled() => {
                    stop = Ended::Interrupted;
                    break;
                }
                _ = touch.tick() => {
                    if self.touch(delivery).await {
                        taken = true;
                        stop = Ended::TakenOver;
                        break;
                    }
                }
            }
        }
        cancel.cancel();
        // The cancel grace, cut short by shutdown's hard stop (now or later) so that the
        // runner stops within its shutdown timeout.
        let grace = tokio::time::sleep(s.cancel_grace());
        tokio::pin!(grace);
        let returned = loop {
            tokio::select! {
                biased;
                r = &mut fut => break Some(r),
                () = &mut grace => break None,
                () = hard_stop.cancelled() => {
                    break tokio::time::timeout(s.shutdown_wind_down(), &mut fut).await.ok();
                }
                _ = touch.tick(), if !taken => taken = self.touch(delivery).await,
            }
        };
        if taken {
            return Ended::TakenOver(returned);
        }
        stop(returned)
    }

    /// Refreshes the job's entry; true when it is another runner's now (this one stalled
    /// past the visibility timeout and the entry was reclaimed).
    async fn touch(&self, delivery: &Delivery) -> bool {
        match self.inner.queue.touch(&[delivery.entry_id.as_str()]).await {
            Ok(lost) if !lost.is_empty() => {
                tracing::warn!(
                    "another runner reclaimed this job's entry while this one stalled; \
                     cancelling the handler and leaving the job to it"
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not refresh the job's entry; another runner may reclaim it");
                false
            }
        }
    }

    async fn retry(&self, delivery: &Delivery, mut job: Job, reason: &str) -> Finished {
        let s = &self.inner.settings;
        let attempts = job.attempt + 1;
        if attempts >= s.max_attempts {
            let reason = format!("gave up after {attempts} attempts; last: {reason}");
            tracing::warn!(%reason, "dead-lettering");
            return self.dead(delivery, "attempts_exhausted", &reason).await;
        }
        let delay = backoff_delay(
            s.backoff_base,
            s.backoff_max,
            job.attempt,
            &mut SmallRng::from_os_rng(),
        );
        job.attempt = attempts;
        tracing::info!(%reason, delay_ms = delay.as_millis() as u64, next_attempt = attempts, "transient failure; retrying later");
        match self
            .inner
            .queue
            .retry_later(&delivery.entry_id, &job, delay)
            .await
        {
            Ok(true) => Finished::Retried,
            Ok(false) => taken_over(),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "scheduling the retry failed; the entry stays pending");
                Finished::Left
            }
        }
    }

    async fn dead(&self, delivery: &Delivery, class: &'static str, reason: &str) -> Finished {
        match self.inner.queue.dead_letter(delivery, reason).await {
            Ok(true) => {
                counter!(names::DEAD_LETTERED, "reason" => class).increment(1);
                Finished::Dead
            }
            Ok(false) => taken_over(),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "dead-lettering failed; the entry stays pending");
                Finished::Left
            }
        }
    }

    fn jitter(&self, max: Duration) -> Duration {
        if max.is_zero() {
            return max;
        }
        SmallRng::from_os_rng().random_range(Duration::ZERO..=max)
    }
}

/// A watchdog that keeps a lock of `ttl` for up to `hold`: fencelock's default limits
/// (an hour, 10 000 extensions) would cut a long job's lock short, and the job would then
/// retry until it is dead-lettered. Extensions come every ttl/3; twice as many again are
/// allowed for retried extensions.
pub(crate) fn watchdog_for(hold: Duration, ttl: Duration) -> WatchdogConfig {
    let period_ms = (ttl.as_millis() / 3).max(1);
    let extensions = (hold.as_millis() / period_ms).saturating_mul(2) + 3;
    WatchdogConfig::default()
        .max_hold(hold)
        .max_extensions(u32::try_from(extensions).unwrap_or(u32::MAX))
}

/// The longest a job whose lock keeps being held elsewhere waits before it tries again.
const MAX_CONTENDED_DELAY: Duration = Duration::from_secs(5);

/// The delay before a job whose lock was held elsewhere tries again, after `requeues`
/// such tries in a row: `first` doubling each time, at most [`MAX_CONTENDED_DELAY`], with
/// jitter over its upper half. Jobs waiting on one busy resource then go round less and
/// less often, and leave the workers to other resources' jobs, instead of each coming
/// back every `first` for as long as the holder runs.
fn contended_delay(first: Duration, requeues: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = first
        .saturating_mul(1u32 << requeues.min(16))
        .min(MAX_CONTENDED_DELAY.max(first));
    ceiling / 2 + rng.random_range(Duration::ZERO..=ceiling - ceiling / 2)
}

/// The delay before the retry that follows failed attempt number `attempt` (0 for the
/// first): `base` doubling per attempt, at most `max`, with full jitter that never goes
/// below a tenth of the step, so that a burst of failures spreads out but still backs off.
fn backoff_delay(base: Duration, max: Duration, attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(max);
    let floor = ceiling / 10;
    floor + rng.random_range(Duration::ZERO..=ceiling - floor)
}

/// The entry was not this runner's any more when it came to retire it.
fn taken_over() -> Finished {
    tracing::warn!(
        "another runner reclaimed this job's entry while this one stalled; leaving the job to it"
    );
    Finished::TakenOver
}

enum Ended {
    Returned(Option<Result<(), HandlerError>>),
    /// Another runner reclaimed the entry; the handler was cancelled.
    TakenOver(Option<Result<(), HandlerError>>),
    Lost(Option<Result<(), HandlerError>>),
    TimedOut(Option<Result<(), HandlerError>>),
    Interrupted(Option<Result<(), HandlerError>>),
}

fn tally(report: &mut RunReport, joined: Result<Finished, tokio::task::JoinError>) {
    match joined {
        Ok(Finished::Done) => report.done += 1,
        Ok(Finished::Retried) => report.retried += 1,
        Ok(Finished::Requeued) => report.requeued += 1,
        Ok(Finished::Dead) => report.dead += 1,
        Ok(Finished::Interrupted) => report.interrupted += 1,
        Ok(Finished::TakenOver) => report.taken_over += 1,
        Ok(Finished::Left) => {}
        Err(e) => tracing::error!(error = %e, "a job task panicked; its entry will be reclaimed"),
    }
}

/// An error and its sources, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job may run up to its timeout (at most a week) plus the cancel grace; its lock
    /// must be extended that long, whatever the TTL.
    #[test]
    fn the_watchdog_keeps_the_lock_as_long_as_a_job_may_run() {
        let week = Duration::from_secs(7 * 24 * 3600);
        for ttl in [
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::from_secs(24 * 3600),
        ] {
            let hold = week + Duration::from_secs(10) + ttl;
            let config = watchdog_for(hold, ttl);
            let needed = hold.as_millis() / (ttl.as_millis() / 3);
            let text = format!("{config:?}");
            assert!(text.contains(&format!("max_hold: {hold:?}")), "{text}");
            let allowed: u128 = text
                .split("max_extensions: ")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap();
            assert!(
                allowed >= needed,
                "ttl {ttl:?}: {allowed} < {needed} extensions"
            );
        }
    }

    #[test]
    fn contended_requeues_back_off_up_to_a_cap() {
        let first = Duration::from_millis(250);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut last_low = Duration::ZERO;
        for requeues in 0..40u32 {
            let delays: Vec<Duration> = (0..200)
                .map(|_| contended_delay(first, requeues, &mut rng))
                .collect();
            let low = *delays.iter().min().unwrap();
            let high = *delays.iter().max().unwrap();
            let ceiling = (first * 2u32.pow(requeues.min(16))).min(MAX_CONTENDED_DELAY);
            assert!(
                low >= ceiling / 2 && high <= ceiling,
                "{requeues}: {low:?}..{high:?}"
            );
            assert!(low >= last_low, "{requeues}: the wait never shrinks");
            last_low = ceiling / 2;
        }
        // After a handful of tries a waiting job comes back at most every 2.5-5 s, not
        // every 0-250 ms.
        assert!(contended_delay(first, 6, &mut rng) >= MAX_CONTENDED_DELAY / 2);
        assert_eq!(contended_delay(Duration::ZERO, 3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_inside_each_step() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        let mut rng = SmallRng::seed_from_u64(7);
        for attempt in 0..40u32 {
            let ceiling = (base * 2u32.pow(attempt.min(20))).min(max);
            let delays: Vec<Duration> = (0..500)
                .map(|_| backoff_delay(base, max, attempt, &mut rng))
                .collect();
            let low = *delays.iter().min().unwrap();
            let high = *delays.iter().max().unwrap();
            assert!(
                low >= ceiling / 10 && high <= ceiling,
                "attempt {attempt}: delays {low:?}..{high:?} outside {:?}..{ceiling:?}",
                ceiling / 10
            );
            // Jittered: 500 draws cover most of the step, not one point of it.
            assert!(
                high - low > ceiling / 2,
                "attempt {attempt}: delays {low:?}..{high:?} are not spread over the step"
            );
        }
    }
}
