//! Watching one running handler: its lock, its timeout, shutdown, and its entry.

use fencelock::{LockHealth, LockState};
use metrics::counter;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::disposition::Stop;
use super::shared::Shared;
use crate::error;
use crate::handler::{HandleFuture, HandlerError};
use crate::queue::Delivery;
use crate::telemetry::names;

/// Runs the handler until it returns, its lock is lost, it times out, its entry is
/// taken over, or shutdown's hard stop; then cancels it and gives it the cancel grace.
/// Returns why it stopped and what it returned, `None` if it did not return in time.
///
/// Keeps its entry fresh all along, grace included, because the lock is extended all
/// along too: an entry left to go stale while its lock is held would be reclaimed by a
/// runner that finds the lock taken and schedules a second copy of the job.
///
/// # Cancel safety
///
/// Dropping it drops the handler's future mid-run; the caller's lock guard, dropped with
/// it, releases the lock in the background.
pub(super) async fn supervise(
    shared: &Shared,
    mut fut: HandleFuture<'_>,
    delivery: &Delivery,
    health: &LockHealth,
    cancel: &CancellationToken,
    hard_stop: &CancellationToken,
) -> (Stop, Option<Result<(), HandlerError>>) {
    let s = &shared.settings;
    let timeout = tokio::time::sleep(s.job_timeout);
    tokio::pin!(timeout);
    let mut touch = tokio::time::interval_at(Instant::now() + s.visibility / 3, s.visibility / 3);
    let mut at_risk_seen = false;
    let stop = loop {
        tokio::select! {
            biased;
            r = &mut fut => return (Stop::Returned, Some(r)),
            state = health.at_risk(), if !at_risk_seen => {
                at_risk_seen = true;
                if let LockState::Lost(reason) = state {
                    tracing::warn!(?reason, "lock lost mid-job; cancelling the handler");
                    break Stop::LockLost;
                }
                counter!(names::LOCK_EXTEND_FAILED).increment(1);
                tracing::warn!("lock extensions failing; the lock is at risk");
            }
            reason = health.lost(), if at_risk_seen => {
                tracing::warn!(?reason, "lock lost mid-job; cancelling the handler");
                break Stop::LockLost;
            }
            () = &mut timeout => {
                tracing::warn!(timeout_s = s.job_timeout.as_secs_f64(), "job timed out; cancelling the handler");
                break Stop::TimedOut;
            }
            () = hard_stop.cancelled() => break Stop::Shutdown,
            _ = touch.tick() => {
                if taken_over(shared, delivery).await {
                    break Stop::TakenOver;
                }
            }
        }
    };
    cancel.cancel();
    let mut taken = stop == Stop::TakenOver;
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
            _ = touch.tick(), if !taken => taken = taken_over(shared, delivery).await,
        }
    };
    if taken {
        return (Stop::TakenOver, returned);
    }
    (stop, returned)
}

/// Refreshes the job's entry; true when it is another runner's now (this one stalled
/// past the visibility timeout and the entry was reclaimed).
async fn taken_over(shared: &Shared, delivery: &Delivery) -> bool {
    match shared.queue.touch(&[delivery.entry_id.as_str()]).await {
        Ok(lost) if !lost.is_empty() => {
            tracing::warn!(
                "another runner reclaimed this job's entry while this one stalled; \
                 cancelling the handler and leaving the job to it"
            );
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(error = %error::chain(&e), "could not refresh the job's entry; another runner may reclaim it");
            false
        }
    }
}
