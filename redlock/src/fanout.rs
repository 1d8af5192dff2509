//! The fan-out: one operation sent to every node at once under one deadline, the replies
//! counted into a quorum tally, and grants that arrive after a round decided taken back.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
#[cfg(feature = "sim")]
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, join_all};
use tokio::time::Instant;

use crate::clock;
use crate::error::NodeFailure;
use crate::node::{LateGrants, Node, Payload, Reply};
use crate::ops::{Extend, Op, Outcome, Release, Vote};
use crate::quorum::{Decision, Tally, quorum};

/// The nodes, their quorum and the time each may take: cheap to clone, so that background
/// work (a drain, a release) can carry its own.
#[derive(Clone)]
pub(crate) struct Fanout {
    nodes: Arc<[Node]>,
    quorum: usize,
    node_timeout: Duration,
}

/// When a round stops waiting for replies (before its deadline).
pub(crate) enum Until {
    /// When every node has answered: cleanup should reach every node.
    AllReplied,
    /// As soon as the quorum is certain, one way or the other; with what to do about a
    /// grant that arrives later.
    Decided(Option<LateGrants>),
}

/// How long calls a round no longer waits for may still finish in the background.
#[cfg(feature = "sim")]
const STRAGGLER_GRACE: Duration = Duration::from_secs(30);

/// One node's call in a round.
enum Slot<F: Future> {
    /// Not answered yet.
    Out(F),
    /// Answered, not yet counted.
    In(F::Output),
    /// Counted.
    Counted,
}

/// Polls every call still out, then hands over the first answer not yet counted, with its
/// node's index; `None` once every answer is counted. Every call is polled each time, so a
/// model node's call (which starts when first polled) starts with its round even when
/// another answers at once. A round has one call per node, so scanning them all costs less
/// than the per-call allocations a `FuturesUnordered` makes.
fn next_reply<F: Future + Unpin>(
    slots: &mut [Slot<F>],
    cx: &mut Context<'_>,
) -> Poll<Option<(usize, F::Output)>> {
    for slot in slots.iter_mut() {
        if let Slot::Out(call) = slot
            && let Poll::Ready(reply) = Pin::new(call).poll(cx)
        {
            *slot = Slot::In(reply);
        }
    }
    let mut out = false;
    for (i, slot) in slots.iter_mut().enumerate() {
        match std::mem::replace(slot, Slot::Counted) {
            Slot::In(reply) => return Poll::Ready(Some((i, reply))),
            Slot::Out(call) => {
                *slot = Slot::Out(call);
                out = true;
            }
            Slot::Counted => {}
        }
    }
    if out {
        Poll::Pending
    } else {
        Poll::Ready(None)
    }
}

/// The replies of one round.
#[derive(Debug)]
pub(crate) struct Replies {
    pub(crate) tally: Tally,
    pub(crate) failures: Vec<NodeFailure>,
    /// The largest and smallest successful reply: with fencing, the tokens.
    pub(crate) highest: u64,
    pub(crate) lowest: u64,
    /// How many nodes said they came up empty and have not been seeded.
    pub(crate) unseeded: usize,
    /// The nodes (by index) whose connection broke under the command.
    pub(crate) broken: Vec<usize>,
}

/// How a release round went, per node.
#[derive(Debug, Default)]
pub(crate) struct ReleaseOutcome {
    pub(crate) deleted: usize,
    pub(crate) failures: Vec<NodeFailure>,
}

impl Fanout {
    pub(crate) fn new(nodes: Vec<Node>, node_timeout: Duration) -> Self {
        Fanout {
            quorum: quorum(nodes.len()),
            nodes: nodes.into(),
            node_timeout,
        }
    }

    pub(crate) fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// How many nodes must agree: `n / 2 + 1`.
    pub(crate) fn quorum(&self) -> usize {
        self.quorum
    }

    pub(crate) fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    /// When a round started at `start` gives up on the nodes that have not answered: after
    /// the node timeout, but never past the lock's validity.
    pub(crate) fn round_deadline(&self, start: Instant, valid_until: Instant) -> Instant {
        valid_until.min(clock::after(start, self.node_timeout))
    }

    /// Runs `op` on every node at once and counts the replies as `op` reads them: done,
    /// refused, or a node that may not vote after a restart. One
    /// deadline bounds the whole round (a timer per node costs more than the round itself on
    /// a fast network); nodes that have not answered by then count as timed out. With
    /// `until_decided`, returns as soon as the tally is decided, dropping the replies still
    /// in flight.
    pub(crate) async fn broadcast(
        &self,
        operation: &'static str,
        op: Op,
        deadline: Instant,
        until: Until,
    ) -> Replies {
        let (until_decided, late) = match until {
            Until::AllReplied => (false, None),
            Until::Decided(late) => (true, late),
        };
        let start = Instant::now();
        let nodes = &self.nodes;
        let mut out = Replies {
            tally: Tally::new(nodes.len()),
            failures: Vec::new(),
            highest: 0,
            lowest: u64::MAX,
            unseeded: 0,
            broken: Vec::new(),
        };
        let payload = Payload::new(op);
        // One slot per node: those still out when the round ends have not answered.
        let mut calls: Vec<Slot<Reply>> = nodes
            .iter()
            .map(|node| Slot::Out(node.eval_shared(&payload, late.as_ref())))
            .collect();
        let mut expiry = pin!(tokio::time::sleep_until(deadline));
        loop {
            // Unconstrained by tokio's cooperative budget, so that a model node's call (which
            // starts when first polled; a Redis node's is queued when made) starts on the
            // first poll: one held back by the budget and started later, from the background
            // drain below, could land after this client's next command to that node (a
            // release overtaken by its own acquisition).
            let next = tokio::task::unconstrained(poll_fn(|cx| match next_reply(&mut calls, cx) {
                Poll::Ready(reply) => Poll::Ready(Either::Left(reply)),
                Poll::Pending => expiry.as_mut().poll(cx).map(Either::Right),
            }));
            match next.await {
                Either::Left(Some((i, reply))) => {
                    let node = nodes[i].addr();
                    let vote = reply.and_then(|n| {
                        payload.op().decode(n).map(Outcome::vote).map_err(|error| {
                            NodeFailure::Redis {
                                node: node.to_owned(),
                                error,
                            }
                        })
                    });
                    let outcome = match vote {
                        Ok(Vote::Yes(n)) => {
                            out.tally.ok += 1;
                            out.highest = out.highest.max(n);
                            out.lowest = out.lowest.min(n);
                            "ok"
                        }
                        Ok(Vote::No) => {
                            out.tally.refused += 1;
                            "refused"
                        }
                        Ok(Vote::Restarted { unseeded }) => {
                            out.tally.failed += 1;
                            out.unseeded += usize::from(unseeded);
                            out.failures.push(NodeFailure::Restarted {
                                node: node.to_owned(),
                                unseeded,
                            });
                            "restarted"
                        }
                        Err(failure) => {
                            if let NodeFailure::Redis { error, .. } = &failure
                                && (error.is_io_error() || error.is_connection_dropped())
                            {
                                out.broken.push(i);
                            }
                            out.tally.failed += 1;
                            out.failures.push(failure);
                            "failed"
                        }
                    };
                    tracing::trace!(
                        operation,
                        node,
                        outcome,
                        latency_us = start.elapsed().as_micros() as u64,
                        "node reply"
                    );
                    if until_decided && out.tally.decision() != Decision::Pending {
                        break;
                    }
                }
                Either::Left(None) => break,
                Either::Right(()) => {
                    let unanswered = nodes
                        .iter()
                        .zip(&calls)
                        .filter(|(_, c)| matches!(c, Slot::Out(_)));
                    for (node, _) in unanswered {
                        node.missed();
                        out.tally.failed += 1;
                        out.failures.push(NodeFailure::Timeout {
                            node: node.addr().to_owned(),
                            after: deadline.saturating_duration_since(start),
                        });
                    }
                    break;
                }
            }
        }
        // A Redis node's driver runs the calls still unanswered and takes back their late
        // grants by itself. A model node's calls live in their futures: let those finish
        // in the background rather than drop them, so that each keeps its place in the
        // node's order, and a stalled node's calls end with the grace.
        #[cfg(feature = "sim")]
        if calls.iter().any(|c| matches!(c, Slot::Out(_)))
            && nodes.iter().any(Node::needs_drain)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let fanout = self.clone();
            runtime.spawn(tokio::time::timeout_at(
                deadline + STRAGGLER_GRACE,
                async move {
                    while let Some((i, reply)) = poll_fn(|cx| next_reply(&mut calls, cx)).await {
                        if let Some(late) = &late
                            && let Ok(Ok(Vote::Yes(_))) =
                                reply.map(|n| payload.op().decode(n).map(Outcome::vote))
                            && late.over.load(Ordering::SeqCst)
                        {
                            // Granted after the acquisition was over: take it back.
                            let release = Op::Release(Release {
                                keys: late.keys.clone(),
                                values: late.values.to_vec(),
                            });
                            let _ = fanout.nodes[i].eval(release, None).await;
                        }
                    }
                },
            ));
        }
        out
    }

    /// Compare-and-delete on every node, in parallel, bounded by the node timeout. With
    /// `retry_broken`, nodes whose connection broke get one more try (the guard's release,
    /// and the background release of a dropped guard); cleanup after a failed round skips
    /// that, since its SET cannot have reached a node whose connection was down.
    ///
    /// Waits for every node rather than a quorum: a command handed to a connection is not
    /// yet written to its socket, and a process that exits right after `release` (a CLI,
    /// a short job) would otherwise leave keys behind until their TTL.
    pub(crate) async fn release_all(
        &self,
        keys: &Arc<[String]>,
        values: &[Arc<str>],
        retry_broken: bool,
    ) -> ReleaseOutcome {
        let release = Release {
            keys: keys.clone(),
            values: values.to_vec(),
        };
        let deadline = clock::after(Instant::now(), self.node_timeout);
        let replies = self
            .broadcast(
                "release",
                Op::Release(release.clone()),
                deadline,
                Until::AllReplied,
            )
            .await;
        let mut outcome = ReleaseOutcome {
            deleted: replies.tally.ok,
            failures: replies.failures,
        };
        if !retry_broken || replies.broken.is_empty() {
            return outcome;
        }
        // A node that restarted (or whose connection dropped) is reconnected on demand:
        // one more try there, in parallel, rather than leaving our key behind until its TTL
        // (a node with AOF keeps our key across its restart).
        let retries = join_all(replies.broken.iter().map(|&i| {
            let node = &self.nodes[i];
            let call = node.run(Op::Release(release.clone()));
            async move { (node, tokio::time::timeout(self.node_timeout, call).await) }
        }))
        .await;
        for (node, retry) in retries {
            if let Ok(Ok(Outcome::Released(deleted))) = retry {
                outcome.failures.retain(|f| f.node() != node.addr());
                outcome.deleted += usize::from(deleted > 0);
            }
        }
        outcome
    }

    /// Compare-and-PEXPIRE on every node, decided at quorum, bounded by the node timeout
    /// and the current validity. A node counts when its keys hold any of `values` (the
    /// acquisition's and its hand-off chain's). Never deletes anything.
    pub(crate) async fn extend_all(
        &self,
        keys: &Arc<[String]>,
        values: &[Arc<str>],
        ttl: Duration,
        valid_until: Instant,
    ) -> Replies {
        let extend = Op::Extend(Extend {
            keys: keys.clone(),
            ttl_ms: clock::millis_ceil(ttl),
            values: values.to_vec(),
        });
        let deadline = self.round_deadline(Instant::now(), valid_until);
        self.broadcast("extend", extend, deadline, Until::Decided(None))
            .await
    }

    /// Releases in the background: the guard's `Drop` and cancelled acquisitions use this.
    /// Never blocks; without a runtime the keys expire with their TTL.
    /// `keep` is dropped once the release is done (a local turn: the next local waiter
    /// starts only then).
    pub(crate) fn spawn_release<T: Send + 'static>(
        &self,
        keys: Arc<[String]>,
        values: Vec<Arc<str>>,
        keep: T,
    ) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let fanout = self.clone();
                handle.spawn(async move {
                    let outcome = fanout.release_all(&keys, &values, true).await;
                    if !outcome.failures.is_empty() {
                        tracing::warn!(resource = %keys[0], failed = outcome.failures.len(), "background release could not reach every node; those keys expire with their TTL");
                    }
                    // The next local waiter starts only now that our keys are gone.
                    drop(keep);
                });
            }
            Err(_) => {
                tracing::warn!(resource = %keys[0], "no tokio runtime to release the lock; its keys expire with their TTL");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn validity_budget_caps_the_node_timeout() {
        let client = Fanout::new(Vec::new(), Duration::from_millis(50));
        let now = Instant::now();
        let soon = now + Duration::from_millis(10);
        assert_eq!(client.round_deadline(now, soon), soon);
        let later = now + Duration::from_secs(10);
        assert_eq!(
            client.round_deadline(now, later),
            now + Duration::from_millis(50)
        );
    }

    /// A call that answers after `polls_left` more polls, counting every poll.
    struct Counted {
        polls: Arc<std::sync::atomic::AtomicUsize>,
        polls_left: usize,
        answer: i64,
    }

    impl Future for Counted {
        type Output = i64;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.polls_left == 0 {
                return Poll::Ready(self.answer);
            }
            self.polls_left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn every_call_starts_with_its_round_and_every_answer_is_counted_once() {
        let polls: Vec<_> = (0..3)
            .map(|_| Arc::new(std::sync::atomic::AtomicUsize::new(0)))
            .collect();
        // Nodes 0 and 2 answer at once, node 1 on its fourth poll.
        let mut slots: Vec<Slot<Counted>> = [0, 3, 0]
            .into_iter()
            .zip(&polls)
            .enumerate()
            .map(|(i, (polls_left, polls))| {
                Slot::Out(Counted {
                    polls: polls.clone(),
                    polls_left,
                    answer: i as i64 * 10,
                })
            })
            .collect();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);

        // Node 0's answer comes first, but nodes 1 and 2 were started too.
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(Some((0, 0))));
        assert!(polls.iter().all(|p| p.load(Ordering::SeqCst) == 1));
        // Node 2 answered in that same pass: handed over without polling it again.
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(Some((2, 20))));
        assert_eq!(polls[2].load(Ordering::SeqCst), 1);
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Pending);
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(Some((1, 10))));
        assert_eq!(polls[1].load(Ordering::SeqCst), 4);
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(None));
        assert!(slots.iter().all(|s| matches!(s, Slot::Counted)));
    }
}
