//! The failure table as data: one row per thing that can happen to a job, what the
//! runner must do, checked without Redis.
//!
//! Rows of the README's table that are not one job's fate are decided elsewhere and
//! tested there: a wiped or rolled-back queue node (the queue; `runner_hostile`), a
//! SIGKILLed runner (the exec supervisor and reclaim; `crash`, `runner_takeover`),
//! failing reclaims (`/healthz`; `telemetry`), the dead-letter cap (the queue; `queue`).

use std::ops::RangeInclusive;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

const POLICY: Policy = Policy {
    max_attempts: 5,
    backoff_base: Duration::from_millis(1000),
    backoff_max: Duration::from_millis(60_000),
    requeue_delay: Duration::from_millis(250),
};

struct Row {
    what: &'static str,
    facts: Facts<'static>,
    /// The decision, its delay (if any) set to zero.
    then: Decision,
    /// Where the delay must fall.
    delay: Option<RangeInclusive<Duration>>,
}

fn facts(
    attempt: u32,
    requeues: u32,
    deliveries: u64,
    happened: Happened<'static>,
) -> Facts<'static> {
    Facts {
        attempt,
        requeues,
        deliveries,
        happened,
    }
}

fn ran(
    attempt: u32,
    stop: Stop,
    returned: Option<&'static Result<(), HandlerError>>,
) -> Facts<'static> {
    facts(attempt, 0, 1, Happened::Ran { stop, returned })
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn retry(attempt: u32, reason: &str) -> Decision {
    Decision::Retry {
        attempt,
        delay: Duration::ZERO,
        reason: reason.to_owned(),
    }
}

fn dead(reason: DeadReason) -> Decision {
    Decision::DeadLetter(reason)
}

static OK: Result<(), HandlerError> = Ok(());
static TRANSIENT: std::sync::LazyLock<Result<(), HandlerError>> =
    std::sync::LazyLock::new(|| Err(HandlerError::transient("gateway timeout")));
static PERMANENT: std::sync::LazyLock<Result<(), HandlerError>> =
    std::sync::LazyLock::new(|| Err(HandlerError::permanent("card declined")));
static PANICKED: std::sync::LazyLock<Result<(), HandlerError>> =
    std::sync::LazyLock::new(|| Err(HandlerError::permanent("the handler panicked")));
static NOT_AN_ORDER: std::sync::LazyLock<Result<(), HandlerError>> =
    std::sync::LazyLock::new(|| {
        Err(HandlerError::permanent(
            "payment jobs must lock `order:<order_id>`",
        ))
    });
static KNOWN: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| vec!["noop".to_owned(), "payment".to_owned()]);

fn rows() -> Vec<Row> {
    let fetched = |deliveries, kind, handled| {
        facts(
            0,
            0,
            deliveries,
            Happened::Fetched {
                kind,
                handled,
                known: &KNOWN,
            },
        )
    };
    let lock = |requeues, outcome| facts(2, requeues, 1, Happened::Lock(outcome));
    vec![
        Row {
            what: "an entry that is not a job (or over max_payload_bytes): dead-lettered alone",
            facts: facts(
                0,
                0,
                1,
                Happened::Malformed {
                    reason: "not a job: EOF",
                },
            ),
            then: dead(DeadReason::Malformed("not a job: EOF".into())),
            delay: None,
        },
        Row {
            what: "a job of a kind no handler takes: dead-lettered",
            facts: fetched(1, "email", false),
            then: dead(DeadReason::UnknownKind {
                kind: "email".into(),
                known: KNOWN.clone(),
            }),
            delay: None,
        },
        Row {
            what: "a job of a known kind, first delivery: go on and lock it",
            facts: fetched(1, "payment", true),
            then: Decision::Proceed,
            delay: None,
        },
        Row {
            what: "an entry handed out max_attempts times: still runs",
            facts: fetched(5, "payment", true),
            then: Decision::Proceed,
            delay: None,
        },
        Row {
            what: "an entry handed out more than max_attempts times (it crashes or hangs its runners): dead-lettered",
            facts: fetched(6, "payment", true),
            then: dead(DeadReason::Redelivered { deliveries: 6 }),
            delay: None,
        },
        Row {
            what: "a contended lock, first time: put back within 125-250 ms, no attempt spent",
            facts: lock(0, LockOutcome::Contended),
            then: Decision::Requeue {
                requeues: 1,
                delay: Duration::ZERO,
                contended: true,
            },
            delay: Some(ms(125)..=ms(250)),
        },
        Row {
            what: "a contended lock, many times in a row: the wait doubles up to 5 s",
            facts: lock(9, LockOutcome::Contended),
            then: Decision::Requeue {
                requeues: 10,
                delay: Duration::ZERO,
                contended: true,
            },
            delay: Some(ms(2500)..=ms(5000)),
        },
        Row {
            what: "an unreachable lock quorum: put back after 0.5-1.5 s, no attempt spent",
            facts: lock(4, LockOutcome::Unreachable),
            then: Decision::Requeue {
                requeues: 4,
                delay: Duration::ZERO,
                contended: false,
            },
            delay: Some(ms(500)..=ms(1500)),
        },
        Row {
            what: "the lock client refuses the resource: dead-lettered",
            facts: lock(
                0,
                LockOutcome::Refused {
                    resource: "",
                    error: "empty resource",
                },
            ),
            then: dead(DeadReason::LockRefused {
                resource: String::new(),
                error: "empty resource".into(),
            }),
            delay: None,
        },
        Row {
            what: "the handler succeeds: acked",
            facts: ran(0, Stop::Returned, Some(&OK)),
            then: Decision::Ack { late: None },
            delay: None,
        },
        Row {
            what: "a duplicate of a paid order's job (the handler says done): acked",
            facts: ran(3, Stop::Returned, Some(&OK)),
            then: Decision::Ack { late: None },
            delay: None,
        },
        Row {
            what: "a transient failure, first attempt: retried after 0.1-1 s as attempt 1",
            facts: ran(0, Stop::Returned, Some(&TRANSIENT)),
            then: retry(1, "gateway timeout"),
            delay: Some(ms(100)..=ms(1000)),
        },
        Row {
            what: "a transient failure, third attempt: the backoff doubles",
            facts: ran(2, Stop::Returned, Some(&TRANSIENT)),
            then: retry(3, "gateway timeout"),
            delay: Some(ms(400)..=ms(4000)),
        },
        Row {
            what: "a transient failure on the last attempt: dead-lettered",
            facts: ran(4, Stop::Returned, Some(&TRANSIENT)),
            then: dead(DeadReason::AttemptsExhausted {
                attempts: 5,
                last: "gateway timeout".into(),
            }),
            delay: None,
        },
        Row {
            what: "a permanent failure: dead-lettered at once",
            facts: ran(0, Stop::Returned, Some(&PERMANENT)),
            then: dead(DeadReason::Permanent("card declined".into())),
            delay: None,
        },
        Row {
            what: "a panicking handler: dead-lettered at once",
            facts: ran(1, Stop::Returned, Some(&PANICKED)),
            then: dead(DeadReason::Permanent("the handler panicked".into())),
            delay: None,
        },
        Row {
            what: "a payment job whose resource is not order:<id>: dead-lettered",
            facts: ran(0, Stop::Returned, Some(&NOT_AN_ORDER)),
            then: dead(DeadReason::Permanent(
                "payment jobs must lock `order:<order_id>`".into(),
            )),
            delay: None,
        },
        Row {
            what: "the lock is lost mid-job and the handler stops with an error: retried",
            facts: ran(0, Stop::LockLost, Some(&TRANSIENT)),
            then: retry(1, "lock lost: gateway timeout"),
            delay: Some(ms(100)..=ms(1000)),
        },
        Row {
            what: "the lock is lost and the handler ignores the cancel: retried after the grace",
            facts: ran(1, Stop::LockLost, None),
            then: retry(2, "lock lost; handler did not stop within the grace period"),
            delay: Some(ms(200)..=ms(2000)),
        },
        Row {
            what: "the lock is lost on the last attempt: dead-lettered",
            facts: ran(4, Stop::LockLost, None),
            then: dead(DeadReason::AttemptsExhausted {
                attempts: 5,
                last: "lock lost; handler did not stop within the grace period".into(),
            }),
            delay: None,
        },
        Row {
            what: "the lock is lost but the handler finishes anyway: acked, noted as late",
            facts: ran(0, Stop::LockLost, Some(&OK)),
            then: Decision::Ack {
                late: Some(Stop::LockLost),
            },
            delay: None,
        },
        Row {
            what: "a job timeout: retried",
            facts: ran(0, Stop::TimedOut, None),
            then: retry(
                1,
                "job timed out; handler did not stop within the grace period",
            ),
            delay: Some(ms(100)..=ms(1000)),
        },
        Row {
            what: "shutdown cancels a running job: put back at once, no attempt spent",
            facts: ran(4, Stop::Shutdown, Some(&TRANSIENT)),
            then: Decision::PutBack,
            delay: None,
        },
        Row {
            what: "shutdown cancels a job whose handler does not return: put back",
            facts: ran(0, Stop::Shutdown, None),
            then: Decision::PutBack,
            delay: None,
        },
        Row {
            what: "shutdown cancels a permanent failure: put back, not dead-lettered",
            facts: ran(0, Stop::Shutdown, Some(&PERMANENT)),
            then: Decision::PutBack,
            delay: None,
        },
        Row {
            what: "a job that finishes during shutdown: acked",
            facts: ran(0, Stop::Shutdown, Some(&OK)),
            then: Decision::Ack {
                late: Some(Stop::Shutdown),
            },
            delay: None,
        },
        Row {
            what: "the runner stalled past the visibility timeout, its entry reclaimed: left to the new owner",
            facts: ran(0, Stop::TakenOver, Some(&OK)),
            then: Decision::Leave,
            delay: None,
        },
        Row {
            what: "taken over while the handler failed: left to the new owner, not retried",
            facts: ran(4, Stop::TakenOver, Some(&PERMANENT)),
            then: Decision::Leave,
            delay: None,
        },
    ]
}

/// Every row whose decision `decide` gets wrong, with what it said.
fn wrong_rows(decide: impl Fn(&Facts<'_>, &Policy, &mut SmallRng) -> Decision) -> Vec<String> {
    let mut wrong = Vec::new();
    for row in rows() {
        // Many draws: a delay range must hold for every jitter, not one.
        for seed in 0..200 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut got = decide(&row.facts, &POLICY, &mut rng);
            let delay = match &mut got {
                Decision::Retry { delay, .. } | Decision::Requeue { delay, .. } => {
                    Some(std::mem::take(delay))
                }
                _ => None,
            };
            let delay_ok = match (&row.delay, delay) {
                (Some(range), Some(d)) => range.contains(&d),
                (None, None) => true,
                _ => false,
            };
            if got != row.then || !delay_ok {
                wrong.push(format!("{}: got {got:?} after {delay:?}", row.what));
                break;
            }
        }
    }
    wrong
}

#[test]
fn every_row_of_the_failure_table_decides_as_documented() {
    let wrong = wrong_rows(disposition);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The checker fires: a disposition that spends an attempt on a contended lock (the
/// bug that dead-letters jobs waiting on a busy resource) fails exactly those rows.
#[test]
fn the_table_catches_a_planted_bug() {
    let planted = |facts: &Facts<'_>, policy: &Policy, rng: &mut SmallRng| match disposition(
        facts, policy, rng,
    ) {
        Decision::Requeue {
            delay,
            contended: true,
            ..
        } => Decision::Retry {
            attempt: facts.attempt + 1,
            delay,
            reason: "contended".into(),
        },
        other => other,
    };
    let wrong = wrong_rows(planted);
    assert_eq!(wrong.len(), 2, "{wrong:#?}");
    assert!(
        wrong.iter().all(|w| w.contains("contended lock")),
        "{wrong:#?}"
    );
}

#[test]
fn dead_letter_reasons_read_as_before() {
    let reasons = [
        (
            DeadReason::Redelivered { deliveries: 6 },
            "redelivered",
            "handed out 6 times and never finished",
        ),
        (
            DeadReason::UnknownKind {
                kind: "x".into(),
                known: KNOWN.clone(),
            },
            "unknown_kind",
            "unknown kind `x` (this runner handles: noop, payment)",
        ),
        (
            DeadReason::AttemptsExhausted {
                attempts: 5,
                last: "boom".into(),
            },
            "attempts_exhausted",
            "gave up after 5 attempts; last: boom",
        ),
        (
            DeadReason::Malformed("no `job` field".into()),
            "malformed",
            "malformed job: no `job` field",
        ),
    ];
    for (reason, class, text) in reasons {
        assert_eq!(reason.class(), class);
        assert!(reason.to_string().starts_with(text), "{reason}");
    }
}
