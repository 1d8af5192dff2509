//! Whether a node is up or down, as its calls find it.
//!
//! A node that refuses connections, or leaves [`DOWN_AFTER_MISSES`] rounds in a row without
//! an answer, is marked down: its calls fail at once instead of costing each round a node
//! timeout, and one probe at a time asks it for a `PING`, with backoff, until it answers
//! and is marked up again. A node that answers late but answers is not down: any reply
//! clears its misses. Being down only turns what would have been a timeout into an
//! immediate failure, so no safety argument depends on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use redis::RedisError;

/// Rounds in a row that a node may leave unanswered before it is marked down: one slow
/// round is not an outage, and a paused node costs at most this many node timeouts.
pub(crate) const DOWN_AFTER_MISSES: u32 = 2;

/// The first probe's delay after a node goes down, doubled after each failed probe up to
/// [`MAX_PROBE_BACKOFF`].
const MIN_PROBE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(1);

/// A node's health, shared by its handles, its driver and its probe.
#[derive(Debug, Default)]
pub(crate) struct Health {
    down: AtomicBool,
    /// Rounds in a row that found no answer, since the node last answered.
    misses: AtomicU32,
    /// How often the node was marked down, and up again.
    downs: AtomicU64,
    ups: AtomicU64,
}

/// One lock node's health, as [`Redlock::node_health`](crate::Redlock::node_health)
/// reports it: for dashboards and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeHealth {
    /// The node's address (`host:port`, never the password).
    pub node: String,
    /// False while the node is marked down: its calls fail at once, and a probe asks it
    /// for a `PING` with backoff until it answers.
    pub up: bool,
    /// How often the node was marked down since the client was built.
    pub marked_down: u64,
    /// How often it was marked up again.
    pub marked_up: u64,
}

impl Health {
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    pub(crate) fn report(&self, node: &str) -> NodeHealth {
        NodeHealth {
            node: node.to_owned(),
            up: !self.is_down(),
            marked_down: self.downs.load(Ordering::Relaxed),
            marked_up: self.ups.load(Ordering::Relaxed),
        }
    }

    /// The node answered something (late or not).
    pub(crate) fn answered(&self) {
        if self.misses.load(Ordering::Relaxed) != 0 {
            self.misses.store(0, Ordering::Relaxed);
        }
    }

    /// A round gave up on the node. Returns true if that marked it down.
    pub(crate) fn missed(&self) -> bool {
        let misses = self.misses.fetch_add(1, Ordering::Relaxed) + 1;
        misses >= DOWN_AFTER_MISSES && self.mark_down()
    }

    /// Marks the node down. Returns true if it was up: the caller starts the probe.
    pub(crate) fn mark_down(&self) -> bool {
        let was_up = !self.down.swap(true, Ordering::AcqRel);
        if was_up {
            self.downs.fetch_add(1, Ordering::Relaxed);
        }
        was_up
    }

    /// Marks the node up. Returns true if it was down.
    pub(crate) fn mark_up(&self) -> bool {
        self.misses.store(0, Ordering::Relaxed);
        let was_down = self.down.swap(false, Ordering::AcqRel);
        if was_down {
            self.ups.fetch_add(1, Ordering::Relaxed);
        }
        was_down
    }
}

/// What a probe needs to ask the node for a `PING`: implemented by the node's driver queue
/// (and by a model node).
pub(crate) trait Probe: Send + Sync + 'static {
    /// One `PING`, answered or failed; the node's driver bounds how long it may take.
    fn ping(&self) -> impl Future<Output = Result<(), RedisError>> + Send;
    /// Whether anyone still uses the node: a probe for a dropped client stops.
    fn alive(&self) -> bool;
}

/// Probes a node that was just marked down until it answers, then marks it up. Runs on
/// the current runtime; without one, the node stays down (no calls are made without one
/// either).
pub(crate) fn spawn_probe<P: Probe>(addr: Arc<str>, health: Arc<Health>, probe: P) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut backoff = MIN_PROBE_BACKOFF;
        loop {
            tokio::time::sleep(backoff).await;
            if !probe.alive() {
                return;
            }
            match probe.ping().await {
                Ok(()) => {
                    if health.mark_up() {
                        tracing::info!(node = %addr, "lock node answers again; marked up");
                    }
                    return;
                }
                Err(error) => {
                    tracing::debug!(node = %addr, %error, "lock node still down");
                    backoff = (backoff * 2).min(MAX_PROBE_BACKOFF);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_down_after_consecutive_misses_and_any_answer_clears_them() {
        let health = Health::default();
        assert!(!health.missed(), "one miss is not an outage");
        health.answered();
        assert!(!health.missed(), "an answer cleared the first miss");
        assert!(health.missed(), "the second miss in a row marks it down");
        assert!(health.is_down());
        assert!(!health.missed(), "already down: no second transition");
        assert!(health.mark_up());
        assert!(!health.mark_up(), "already up");
        assert!(!health.is_down());
        assert!(!health.missed(), "marking up cleared the misses");
        let report = health.report("n:1");
        assert_eq!(
            (report.up, report.marked_down, report.marked_up),
            (true, 1, 1)
        );
    }

    #[test]
    fn a_refused_connection_marks_down_at_once() {
        let health = Health::default();
        assert!(health.mark_down());
        assert!(!health.mark_down(), "one transition, one log line");
        assert!(health.is_down());
        assert_eq!(health.report("n:1").marked_down, 1);
    }
}
