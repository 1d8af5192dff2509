//! One acquisition round: a set of free keys, or a swap of the local hand-off chain's value
//! for a fresh one, then the fencing write-back; and the hand-off that needs no round.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::clock;
use crate::error::Error;
use crate::fanout::Until;
use crate::local::LocalTurn;
use crate::node::LateGrants;
use crate::ops::{Acquire, Fence, Fencing, Handoff, Op, new_value};
use crate::quorum::Decision;
use crate::shared::{Granted, Shared};

/// The most fencing tokens one acquisition reserves for hand-offs without a round (it
/// reserves `max_local_handoffs`, up to this): a large `max_local_handoffs` does not use
/// up the counters, and a longer chain takes a fresh run in a swap round.
const MAX_RESERVED_TOKENS: usize = 64;

/// Releases a failed or abandoned acquisition if its future is dropped before it decides.
struct PendingCleanup<'a> {
    shared: &'a Arc<Shared>,
    keys: &'a Arc<[String]>,
    /// This round's value, then those of the hand-off chain it started from.
    values: &'a [Arc<str>],
    over: &'a Arc<AtomicBool>,
    /// The acquisition's local turn. The spawned release takes it along, so the next task
    /// of this process that waits for these keys starts once they are gone from the nodes,
    /// not while our keys are still there to refuse its first round.
    turn: &'a mut Option<LocalTurn>,
    armed: bool,
}

impl Drop for PendingCleanup<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.over.store(true, Ordering::SeqCst);
            self.shared.fanout.spawn_release(
                self.keys.clone(),
                self.values.to_vec(),
                self.turn.take(),
            );
        }
    }
}

impl Shared {
    /// Takes over a lock that the previous holder in this process handed on, as it is: no
    /// round, the same value and the validity the chain already has, and with fencing the
    /// next of the tokens reserved in the chain's last round. Only while that validity is at
    /// least what a fresh round could leave after using its whole node timeout (and at least
    /// half of what `ttl` gives), so that a waiter never gets noticeably less than it asked
    /// for, and with fencing only while reserved tokens are left.
    pub(crate) fn pass_on(&self, baton: &Granted, ttl: Duration) -> Option<Granted> {
        #[cfg(feature = "sim")]
        if self.sim.swap_every_hand_off {
            return None;
        }
        let token = match baton.token {
            // The next of the tokens reserved with the chain's last round.
            Some(t) if t < baton.last_token => Some(t + 1),
            Some(_) => return None,
            None => None,
        };
        let full = ttl - self.drift(ttl);
        let floor = full
            .saturating_sub(self.fanout.node_timeout())
            .max(full / 2);
        (baton.valid_until >= clock::after(Instant::now(), floor)).then(|| Granted {
            token,
            handoffs: baton.handoffs + 1,
            ..baton.clone()
        })
    }

    /// One acquire round on all nodes in parallel, decided as soon as it is certain. With
    /// `from`, the round swaps a baton's value for a fresh one instead of setting free keys.
    /// With fencing, a second round writes the token back to a quorum unless the first
    /// already left it there. Errors come with whether a node reported itself unseeded.
    pub(crate) async fn round(
        self: &Arc<Self>,
        keys: &Arc<[String]>,
        ttl: Duration,
        attempt: u32,
        from: Option<&Granted>,
        turn: &mut Option<LocalTurn>,
    ) -> Result<Granted, (Error, bool)> {
        let fenced = self.fencing;
        let previous: &[Arc<str>] = from.map_or(&[], |b| &b.values);
        let mut values: Vec<Arc<str>> = Vec::with_capacity(previous.len() + 1);
        values.push(new_value().into());
        values.extend_from_slice(previous);
        let start = Instant::now();
        let valid_until = clock::after(start, ttl - self.drift(ttl));
        let reserved = if fenced {
            self.max_local_handoffs.min(MAX_RESERVED_TOKENS) as u64
        } else {
            0
        };
        // A hand-off continues its chain, so its late grants are the chain's to take back.
        let over = from.map_or_else(|| Arc::new(AtomicBool::new(false)), |b| b.over.clone());
        let mut cleanup = PendingCleanup {
            shared: self,
            keys,
            values: &values,
            over: &over,
            turn,
            armed: true,
        };
        let value = values[0].clone();
        let ttl_ms = clock::millis_ceil(ttl);
        let window_ms = clock::millis_ceil(self.fence_window);
        let fencing = fenced.then(|| Fencing {
            reserved,
            window_ms,
            hint: self.token_hint(keys),
        });
        let op = if previous.is_empty() {
            Op::Acquire(Acquire {
                keys: keys.clone(),
                value: value.clone(),
                ttl_ms,
                quarantine_ms: self.quarantine_ms(),
                fencing,
            })
        } else {
            Op::Handoff(Handoff {
                keys: keys.clone(),
                value: value.clone(),
                ttl_ms,
                fencing,
                chain: previous.to_vec(),
            })
        };

        let deadline = self.fanout.round_deadline(start, valid_until);
        // Replies still in flight when the round is decided are dropped; a SET that lands
        // late is removed by the release below or by the guard's release, which go to every
        // node and wait for all of them.
        let replies = self
            .fanout
            .broadcast(
                "acquire",
                op,
                deadline,
                Until::Decided(Some(LateGrants {
                    over: over.clone(),
                    keys: keys.clone(),
                    values: values.as_slice().into(),
                })),
            )
            .await;
        let tally = replies.tally;
        let unseeded = replies.unseeded > 0;
        let mut failures = replies.failures;

        // With fencing the token is the largest counter the quorum issued. If the quorum
        // did not all issue that one, raise their counters to it and the tokens reserved
        // after it before handing it out.
        let mut fence_failed = false;
        if fenced
            && !planted!(self, NoFenceWriteBack)
            && tally.decision() == Decision::Reached
            && replies.highest != replies.lowest
        {
            let fence = Op::Fence(Fence {
                keys: keys.clone(),
                value,
                last_token: replies.highest + reserved,
                window_ms,
            });
            let write_back = self
                .fanout
                .broadcast(
                    "fence",
                    fence,
                    self.fanout.round_deadline(Instant::now(), valid_until),
                    Until::Decided(None),
                )
                .await;
            if write_back.tally.decision() != Decision::Reached {
                fence_failed = true;
                failures = write_back.failures;
            }
        }

        let elapsed = start.elapsed();
        tracing::debug!(
            attempt,
            granted = tally.ok,
            held = tally.refused,
            failed = tally.failed,
            quorum_margin = tally.margin(),
            token = replies.highest,
            elapsed_us = elapsed.as_micros() as u64,
            "acquire round"
        );
        let error = match tally.decision() {
            Decision::Reached if fence_failed => Error::NoQuorum {
                resource: keys[0].clone(),
                operation: "fence write-back",
                quorum: tally.quorum(),
                succeeded: 0,
                failures,
            },
            Decision::Reached if Instant::now() < valid_until => {
                cleanup.armed = false;
                if unseeded {
                    self.spawn_seed();
                }
                if fenced {
                    self.remember_token(keys, replies.highest + reserved);
                }
                return Ok(Granted {
                    values: values.clone(),
                    valid_until,
                    token: fenced.then_some(replies.highest),
                    last_token: replies.highest + reserved,
                    over: over.clone(),
                    handoffs: from.map_or(0, |b| b.handoffs + 1),
                });
            }
            Decision::Reached => Error::ExpiredDuringAcquire {
                resource: keys[0].clone(),
                elapsed,
                ttl,
            },
            _ if tally.failures_alone_prevent_quorum() || tally.refused == 0 => Error::NoQuorum {
                resource: keys[0].clone(),
                operation: "acquire",
                quorum: tally.quorum(),
                succeeded: tally.ok,
                failures,
            },
            _ => Error::Contended {
                resource: keys[0].clone(),
                held_elsewhere: tally.refused,
                granted: tally.ok,
                quorum: tally.quorum(),
                attempts: attempt,
            },
        };
        // Release everywhere now, not after the last retry (node-redlock PR #369): our
        // partial keys would otherwise block our own next round.
        over.store(true, Ordering::SeqCst);
        self.fanout.release_all(keys, &values, false).await;
        cleanup.armed = false;
        Err((error, unseeded))
    }
}
