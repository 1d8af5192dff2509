//! What becomes of a job: one pure function from what happened to a typed decision.
//!
//! The runner asks at each step of a job (fetched, locked or not, handler stopped) and
//! carries the answer out against the queue; nothing here touches Redis, so every rule
//! of the README's failure table is a row of the table test below.

use std::fmt;
use std::time::Duration;

use rand::Rng;

use super::backoff::{backoff_delay, contended_delay, unreachable_delay};
use crate::handler::HandlerError;

/// The settings a job's fate depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Attempts before a failing job is dead-lettered; also the most deliveries of one
    /// entry.
    pub(crate) max_attempts: u32,
    /// The first retry delay.
    pub(crate) backoff_base: Duration,
    /// The longest retry delay.
    pub(crate) backoff_max: Duration,
    /// The first delay after a contended lock.
    pub(crate) requeue_delay: Duration,
}

/// A job's standing when its fate is decided.
#[derive(Debug)]
pub(crate) struct Facts<'a> {
    /// Attempts spent before this delivery.
    pub(crate) attempt: u32,
    /// Contended tries in a row before this one.
    pub(crate) requeues: u32,
    /// Times the group handed this entry out, this time included.
    pub(crate) deliveries: u64,
    /// What just happened.
    pub(crate) happened: Happened<'a>,
}

/// What happened to a job at one step.
#[derive(Debug)]
pub(crate) enum Happened<'a> {
    /// The entry is not a job.
    Malformed { reason: &'a str },
    /// A job was fetched; `handled` says whether this runner has a handler for its kind.
    Fetched {
        kind: &'a str,
        handled: bool,
        known: &'a [String],
    },
    /// The lock was asked for and not taken.
    Lock(LockOutcome<'a>),
    /// The handler stopped, and why; `returned` is what it returned, `None` if it did not
    /// return within the cancel grace.
    Ran {
        stop: Stop,
        returned: Option<&'a Result<(), HandlerError>>,
    },
}

/// Why a job's lock was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockOutcome<'a> {
    /// Held elsewhere.
    Contended,
    /// Too few lock nodes answered.
    Unreachable,
    /// The lock client refuses the resource (bad configuration); asking again cannot help.
    Refused { resource: &'a str, error: &'a str },
}

/// Why the handler stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// It returned by itself.
    Returned,
    /// Its lock was lost; it was cancelled.
    LockLost,
    /// It ran past the job timeout; it was cancelled.
    TimedOut,
    /// Shutdown's hard stop; it was cancelled.
    Shutdown,
    /// Another runner reclaimed its entry while this one stalled; it was cancelled.
    TakenOver,
}

impl Stop {
    fn why(self) -> Option<&'static str> {
        match self {
            Stop::Returned => None,
            Stop::LockLost => Some("lock lost"),
            Stop::TimedOut => Some("job timed out"),
            Stop::Shutdown => Some("shutdown"),
            Stop::TakenOver => Some("taken over"),
        }
    }
}

/// What the runner does with the job next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Go on to the next step: lock it, or run it.
    Proceed,
    /// Done: acknowledge the entry (`late` when the handler finished after it was told
    /// to stop).
    Ack { late: Option<Stop> },
    /// A failed attempt: run it again after `delay` as attempt number `attempt`.
    Retry {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// The lock was not to be had: run it again after `delay`, spending no attempt;
    /// `requeues` is its new count of contended tries in a row.
    Requeue {
        requeues: u32,
        delay: Duration,
        contended: bool,
    },
    /// Shutdown cut it short: put it back, due at once, spending no attempt.
    PutBack,
    /// Never to run again: to the dead-letter stream (before the ack).
    DeadLetter(DeadReason),
    /// Its entry is another runner's now: touch nothing.
    Leave,
}

/// Why a job went to dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeadReason {
    /// The entry is not a job.
    Malformed(String),
    /// Handed out more than `max_attempts` times, each time crashing or stalling its
    /// runner.
    Redelivered { deliveries: u64 },
    /// No handler for its kind.
    UnknownKind { kind: String, known: Vec<String> },
    /// The handler said retrying cannot help (a panic counts as that too).
    Permanent(String),
    /// The lock client refused the resource.
    LockRefused { resource: String, error: String },
    /// The last attempt failed too.
    AttemptsExhausted { attempts: u32, last: String },
}

impl DeadReason {
    /// The `reason` label of `job_runner_dead_lettered_total`.
    pub(crate) fn class(&self) -> &'static str {
        match self {
            DeadReason::Malformed(_) => "malformed",
            DeadReason::Redelivered { .. } => "redelivered",
            DeadReason::UnknownKind { .. } => "unknown_kind",
            DeadReason::Permanent(_) | DeadReason::LockRefused { .. } => "permanent",
            DeadReason::AttemptsExhausted { .. } => "attempts_exhausted",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadReason::Malformed(reason) => write!(f, "malformed job: {reason}"),
            DeadReason::Redelivered { deliveries } => write!(
                f,
                "handed out {deliveries} times and never finished: each runner that took it \
                 crashed or stalled past the visibility timeout"
            ),
            DeadReason::UnknownKind { kind, known } => write!(
                f,
                "unknown kind `{kind}` (this runner handles: {})",
                known.join(", ")
            ),
            DeadReason::Permanent(reason) => f.write_str(reason),
            DeadReason::LockRefused { resource, error } => {
                write!(f, "cannot lock resource `{resource}`: {error}")
            }
            DeadReason::AttemptsExhausted { attempts, last } => {
                write!(f, "gave up after {attempts} attempts; last: {last}")
            }
        }
    }
}

/// Decides what becomes of a job. Pure: the same facts, policy and random draws give the
/// same decision; `rng` only jitters delays.
pub(crate) fn disposition(facts: &Facts<'_>, policy: &Policy, rng: &mut impl Rng) -> Decision {
    match &facts.happened {
        Happened::Malformed { reason } => {
            Decision::DeadLetter(DeadReason::Malformed((*reason).to_owned()))
        }
        // Every reclaim hands the same entry out again: one that keeps coming back took
        // its runners down or hung them each time, and would go on doing so.
        Happened::Fetched { .. } if facts.deliveries > u64::from(policy.max_attempts) => {
            Decision::DeadLetter(DeadReason::Redelivered {
                deliveries: facts.deliveries,
            })
        }
        Happened::Fetched {
            kind,
            handled: false,
            known,
        } => Decision::DeadLetter(DeadReason::UnknownKind {
            kind: (*kind).to_owned(),
            known: known.to_vec(),
        }),
        Happened::Fetched { handled: true, .. } => Decision::Proceed,
        Happened::Lock(LockOutcome::Contended) => Decision::Requeue {
            requeues: facts.requeues.saturating_add(1),
            delay: contended_delay(policy.requeue_delay, facts.requeues, rng),
            contended: true,
        },
        // Not the job's fault, so no attempt is spent; the nodes get a while to return.
        Happened::Lock(LockOutcome::Unreachable) => Decision::Requeue {
            requeues: facts.requeues,
            delay: unreachable_delay(rng),
            contended: false,
        },
        Happened::Lock(LockOutcome::Refused { resource, error }) => {
            Decision::DeadLetter(DeadReason::LockRefused {
                resource: (*resource).to_owned(),
                error: (*error).to_owned(),
            })
        }
        Happened::Ran { stop, returned } => ran(facts, *stop, *returned, policy, rng),
    }
}

fn ran(
    facts: &Facts<'_>,
    stop: Stop,
    returned: Option<&Result<(), HandlerError>>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> Decision {
    match (stop, returned) {
        // Its new owner decides; a result from here would be a second copy's.
        (Stop::TakenOver, _) => Decision::Leave,
        (stop, Some(Ok(()))) => Decision::Ack {
            late: (stop != Stop::Returned).then_some(stop),
        },
        (Stop::Shutdown, _) => Decision::PutBack,
        (_, Some(Err(HandlerError::Permanent(reason)))) => {
            Decision::DeadLetter(DeadReason::Permanent(reason.clone()))
        }
        (stop, returned) => {
            let reason = match (returned, stop.why()) {
                (Some(Err(e)), Some(why)) => format!("{why}: {e}"),
                (Some(Err(e)), None) => e.to_string(),
                (_, why) => format!(
                    "{}; handler did not stop within the grace period",
                    why.unwrap_or("cancelled")
                ),
            };
            let attempts = facts.attempt.saturating_add(1);
            if attempts >= policy.max_attempts {
                return Decision::DeadLetter(DeadReason::AttemptsExhausted {
                    attempts,
                    last: reason,
                });
            }
            Decision::Retry {
                attempt: attempts,
                delay: backoff_delay(policy.backoff_base, policy.backoff_max, facts.attempt, rng),
                reason,
            }
        }
    }
}

#[cfg(test)]
mod table;
