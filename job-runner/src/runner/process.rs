//! One job, start to finish: ask [`disposition`] at each step and carry out its answer.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use fencelock::{ErrorKind, LockGuard, WatchdogConfig};
use futures_util::FutureExt;
use metrics::{counter, histogram};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::disposition::{Decision, Facts, Happened, LockOutcome, Stop, disposition};
use super::report::Finished;
use super::shared::Shared;
use super::supervise::supervise;
use crate::error;
use crate::handler::{HandleFuture, HandlerError, JobContext};
use crate::job::Job;
use crate::queue::Delivery;
use crate::telemetry::names;

/// Runs one delivered entry to its end, with its log line and metrics.
///
/// # Cancel safety
///
/// Dropping it drops the handler and the job's lock guard, which releases the lock in
/// the background; the entry stays pending and is reclaimed after the visibility timeout.
pub(super) async fn process(
    shared: &Shared,
    delivery: Delivery,
    hard_stop: CancellationToken,
) -> Finished {
    let started = Instant::now();
    let job = match &delivery.job {
        Ok(job) => job.clone(),
        Err(malformed) => {
            let facts = Facts {
                attempt: 0,
                requeues: 0,
                deliveries: delivery.deliveries,
                happened: Happened::Malformed {
                    reason: &malformed.reason,
                },
            };
            let decision = decide(shared, &facts);
            let finished = carry_out(shared, &delivery, None, decision, None).await;
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
    let kind = if shared.handlers.get(&job.kind).is_some() {
        job.kind.clone()
    } else {
        "unknown".to_owned()
    };
    let finished = run_job(shared, &delivery, job, hard_stop)
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

fn facts<'a>(job: &Job, delivery: &Delivery, happened: Happened<'a>) -> Facts<'a> {
    Facts {
        attempt: job.attempt,
        requeues: job.requeues,
        deliveries: delivery.deliveries,
        happened,
    }
}

fn decide(shared: &Shared, facts: &Facts<'_>) -> Decision {
    disposition(facts, &shared.settings.policy(), &mut rand::rng())
}

async fn run_job(
    shared: &Shared,
    delivery: &Delivery,
    mut job: Job,
    hard_stop: CancellationToken,
) -> Finished {
    let s = &shared.settings;
    let handler = shared.handlers.get(&job.kind);
    let fetched = facts(
        &job,
        delivery,
        Happened::Fetched {
            kind: &job.kind,
            handled: handler.is_some(),
            known: &shared.kinds,
        },
    );
    let handler = match (decide(shared, &fetched), handler) {
        (Decision::Proceed, Some(handler)) => handler,
        (decision, _) => return carry_out(shared, delivery, Some(job), decision, None).await,
    };

    let started = Instant::now();
    let acquired = shared
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
            let error = e.to_string();
            let outcome = match e.kind() {
                ErrorKind::Contended => LockOutcome::Contended,
                ErrorKind::Config => LockOutcome::Refused {
                    resource: &job.resource,
                    error: &error,
                },
                _ => {
                    tracing::warn!(error = %e, "lock quorum unavailable; job put back");
                    LockOutcome::Unreachable
                }
            };
            let label = match outcome {
                LockOutcome::Contended => "contended",
                LockOutcome::Unreachable => "no_quorum",
                _ => "error",
            };
            counter!(names::LOCK_ACQUIRE, "outcome" => label).increment(1);
            let decision = decide(shared, &facts(&job, delivery, Happened::Lock(outcome)));
            return carry_out(shared, delivery, Some(job), decision, None).await;
        }
    };
    let token = guard
        .fencing_token()
        .expect("fencing is on: checked at build");
    tracing::Span::current().record("token", token);

    let watchdog = guard.auto_extend_with(
        WatchdogConfig::holding(s.job_timeout + s.cancel_grace() + s.lock_ttl, s.lock_ttl)
            .cancel_on_loss(false),
    );
    let health = watchdog.health();
    let cancel = CancellationToken::new();
    let ctx = JobContext {
        fencing_token: token,
        cancel: cancel.clone(),
        lock: health.clone(),
        worker: shared.worker.clone(),
    };
    let ran_at = Instant::now();
    let (stop, returned) = {
        let job = &job;
        let handler_future: HandleFuture<'_> = Box::pin(async move {
            // A panicking handler would panic again on every redelivery: dead-letter it.
            AssertUnwindSafe(handler.handle_boxed(job, ctx))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(HandlerError::permanent("the handler panicked")))
        });
        supervise(
            shared,
            handler_future,
            delivery,
            &health,
            &cancel,
            &hard_stop,
        )
        .await
    };
    histogram!(names::JOB_DURATION, "kind" => job.kind.clone())
        .record(ran_at.elapsed().as_secs_f64());
    let guard = watchdog.stop().await;
    if stop == Stop::LockLost {
        counter!(names::LOCKS_LOST).increment(1);
    }
    if stop == Stop::TakenOver {
        tracing::debug!(handler_returned = returned.is_some(), "handler stopped");
    }
    let decision = decide(
        shared,
        &facts(
            &job,
            delivery,
            Happened::Ran {
                stop,
                returned: returned.as_ref(),
            },
        ),
    );
    carry_out(shared, delivery, Some(job), decision, Some(guard)).await
}

/// Does what `decision` says to the entry and the lock. The lock goes before the entry
/// is put back (the job may run again at once, elsewhere), and with the ack otherwise.
async fn carry_out(
    shared: &Shared,
    delivery: &Delivery,
    job: Option<Job>,
    decision: Decision,
    guard: Option<LockGuard>,
) -> Finished {
    let queue = &shared.queue;
    if let Decision::Ack { late } = decision {
        if let Some(late) = late {
            tracing::warn!(why = ?late, "handler finished after it was told to stop");
        }
        let (acked, ()) = tokio::join!(queue.ack(&delivery.entry_id), release(guard));
        return match acked {
            Ok(true) => Finished::Done,
            Ok(false) => taken_over(),
            Err(e) => {
                tracing::warn!(error = %error::chain(&e), "ack failed; the entry will be reclaimed and run again");
                Finished::Left
            }
        };
    }
    release(guard).await;
    let put_back = |job: Job, delay: Duration, done: Finished, what: &'static str| async move {
        match queue.retry_later(&delivery.entry_id, &job, delay).await {
            Ok(true) => done,
            Ok(false) => taken_over(),
            Err(e) => {
                tracing::warn!(error = %error::chain(&e), "{what} failed; the entry stays pending");
                Finished::Left
            }
        }
    };
    match (decision, job) {
        (Decision::Leave, _) => taken_over(),
        (Decision::DeadLetter(reason), _) => {
            tracing::warn!(entry = %delivery.entry_id, %reason, "dead-lettering");
            match queue.dead_letter(delivery, &reason.to_string()).await {
                Ok(true) => {
                    counter!(names::DEAD_LETTERED, "reason" => reason.class()).increment(1);
                    Finished::Dead
                }
                Ok(false) => taken_over(),
                Err(e) => {
                    tracing::warn!(error = %error::chain(&e), "dead-lettering failed; the entry stays pending");
                    Finished::Left
                }
            }
        }
        (
            Decision::Retry {
                attempt,
                delay,
                reason,
            },
            Some(mut job),
        ) => {
            tracing::info!(%reason, delay_ms = delay.as_millis() as u64, next_attempt = attempt, "transient failure; retrying later");
            job.attempt = attempt;
            put_back(job, delay, Finished::Retried, "scheduling the retry").await
        }
        (
            Decision::Requeue {
                requeues,
                delay,
                contended,
            },
            Some(mut job),
        ) => {
            tracing::debug!(
                contended,
                delay_ms = delay.as_millis() as u64,
                "lock not taken; job put back"
            );
            job.requeues = requeues;
            put_back(job, delay, Finished::Requeued, "requeue").await
        }
        (Decision::PutBack, Some(job)) => {
            put_back(
                job,
                Duration::ZERO,
                Finished::Interrupted,
                "putting the job back",
            )
            .await
        }
        // Proceed is not an ending, and every decision that needs the job has one.
        (decision, _) => {
            tracing::error!(
                ?decision,
                "no way to carry out this decision; the entry stays pending"
            );
            Finished::Left
        }
    }
}

async fn release(guard: Option<LockGuard>) {
    if let Some(guard) = guard
        && let Err(e) = guard.release().await
    {
        tracing::debug!(error = %e, "release failed; the lock expires by its TTL");
    }
}

/// The entry was not this runner's any more when it came to retire it.
fn taken_over() -> Finished {
    tracing::warn!(
        "another runner reclaimed this job's entry while this one stalled; leaving the job to it"
    );
    Finished::TakenOver
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fencelock::WatchdogConfig;

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
            let config = WatchdogConfig::holding(hold, ttl);
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
}
