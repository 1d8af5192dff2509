//! The fetch loop: promote due retries, reclaim stalled entries, fetch, and hand each
//! job to a worker task; then the shutdown that stops it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use metrics::{counter, gauge};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process::process;
use super::report::{Finished, RunReport};
use super::shared::Shared;
use crate::error;
use crate::queue::{Delivery, Reclaimed};
use crate::telemetry::names;

/// Runs until `shutdown` resolves, or (with `once`) the queue is drained.
///
/// # Cancel safety
///
/// Dropping the future drops the running jobs' futures: their guards release their
/// locks in the background and their entries stay pending, to be reclaimed after the
/// visibility timeout.
pub(super) async fn run(
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send,
) -> RunReport {
    let s = &shared.settings;
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
    // With `once`: the last drain check found work that is not ours to fetch yet (delayed,
    // or pending for another consumer), so the next fetch may block a little for it.
    let mut waiting = false;
    tracing::info!(worker = %shared.worker, concurrency = s.concurrency, kinds = ?shared.handlers, "runner started");

    'fetch: loop {
        shared.health.beat();
        while let Some(done) = jobs.try_join_next() {
            report.tally(done);
        }
        // Wait for a free worker, beating the pulse, and watching for shutdown.
        let permit = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break 'fetch,
                p = slots.clone().acquire_owned() => break p.expect("never closed"),
                Some(done) = jobs.join_next(), if !jobs.is_empty() => report.tally(done),
                () = tokio::time::sleep(Duration::from_secs(1)) => shared.health.beat(),
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
            let _ = tokio::time::timeout(Duration::from_millis(1), slots.acquire_many(more)).await;
        }
        let free = slots.available_permits() + 1;

        if last_promote.elapsed() >= Duration::from_millis(200) {
            last_promote = Instant::now();
            let promoted = shared.queue.promote_due(256).await;
            shared.health.promote_done(promoted.is_ok());
            if let Err(e) = promoted {
                tracing::warn!(error = %error::chain(&e), "promoting delayed jobs failed");
            }
        }
        let mut batch = Vec::new();
        if last_reclaim.elapsed() >= (s.visibility / 2).max(Duration::from_millis(500)) {
            last_reclaim = Instant::now();
            match shared
                .queue
                .reclaim(s.visibility, free, &reclaim_cursor)
                .await
            {
                Ok(Reclaimed {
                    entries: claimed,
                    cursor,
                    ..
                }) => {
                    shared.health.reclaim_done(true);
                    reclaim_cursor = cursor;
                    if !claimed.is_empty() {
                        tracing::info!(count = claimed.len(), "reclaimed stalled entries");
                        counter!(names::RECLAIMED).increment(claimed.len() as u64);
                        report.reclaimed += claimed.len() as u64;
                    }
                    batch = claimed;
                }
                Err(e) => {
                    shared.health.reclaim_done(false);
                    tracing::warn!(error = %error::chain(&e), "reclaim failed");
                }
            }
        }
        if batch.is_empty() {
            // With `once`, a fetch that blocked would delay noticing the drained queue;
            // it blocks only while waiting for work another part of the queue holds.
            let block = match (s.once, waiting && jobs.is_empty()) {
                (false, _) => s.fetch_block,
                (true, true) => ONCE_POLL,
                (true, false) => Duration::ZERO,
            };
            match shared.queue.fetch(free, block).await {
                Ok(fetched) => {
                    shared.health.fetch_ok();
                    batch = fetched;
                }
                Err(e) => {
                    shared.health.fetch_failed();
                    tracing::warn!(error = %error::chain(&e), "fetch failed; retrying");
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
            if s.once {
                if !jobs.is_empty() {
                    // Nothing new while jobs run: look again when one finishes (it may
                    // have scheduled a retry, and the last one ends the run) or after a
                    // poll interval for jobs enqueued meanwhile.
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break 'fetch,
                        Some(done) = jobs.join_next() => report.tally(done),
                        () = tokio::time::sleep(ONCE_POLL) => {}
                    }
                } else if drained(&shared).await {
                    // A finished job's ack, retry or dead letter is written before its
                    // task ends, so the counts are final for everything this runner ran.
                    break 'fetch;
                } else {
                    waiting = true;
                }
            }
            continue;
        }
        waiting = false;
        // A signal that came while the fetch blocked: these jobs have not started, so
        // they go back at once rather than run during the shutdown.
        if (&mut shutdown).now_or_never().is_some() {
            drop(permit);
            put_back(&shared, batch).await;
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
            let shared = shared.clone();
            let hard_stop = hard_stop.clone();
            jobs.spawn(async move {
                gauge!(names::IN_FLIGHT).increment(1.0);
                let finished = process(&shared, delivery, hard_stop).await;
                gauge!(names::IN_FLIGHT).decrement(1.0);
                drop(permit);
                finished
            });
        }
    }

    shared.health.stopping();
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
                Some(done) => report.tally(done),
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

/// With `once`: how often to look for new or promoted jobs while waiting for running
/// jobs or for work held elsewhere (delayed jobs, entries pending for another consumer).
const ONCE_POLL: Duration = Duration::from_millis(100);

/// Returns fetched jobs that will not run here to the queue, due at once. An entry
/// that cannot be put back (or is not a job) stays pending and is reclaimed later.
async fn put_back(shared: &Shared, batch: Vec<Delivery>) {
    let queue = &shared.queue;
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
async fn drained(shared: &Shared) -> bool {
    match shared.queue.stats().await {
        Ok(st) => st.depth == 0 && st.pending == 0 && st.delayed == 0,
        Err(_) => false,
    }
}
