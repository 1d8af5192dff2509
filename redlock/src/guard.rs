//! The RAII guard of a held lock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tracing::Instrument;

use crate::error::{Error, LostReason};
use crate::local::LocalTurn;
use crate::quorum::Decision;
use crate::shared::{Granted, Shared};

/// A held lock on one or more resources.
///
/// The guard is `'static + Send`, so it can move into spawned tasks. Release it with
/// [`release`](Self::release), which reports whether the lock was still held. If it is
/// dropped instead, a best-effort release is spawned on the current tokio runtime; `Drop`
/// never blocks and never panics, and without a runtime it logs and lets the TTL expire.
///
/// The lock is only safe while [`validity`](Self::validity) is non-zero: check it before
/// side effects, or better, hand a fencing token to the resource you protect.
#[must_use = "dropping the guard releases the lock at once; bind it with `let guard = ...`"]
pub struct LockGuard {
    shared: Arc<Shared>,
    keys: Arc<[String]>,
    ttl: Duration,
    /// Values, validity, token and hand-off state. Its `over` flag is set once this
    /// acquisition is over (released, dropped), so that a grant from a slow node arriving
    /// later is taken back; a hand-off passes it on instead, since the next holder owns
    /// our values too.
    held: Granted,
    /// `None` once released or abandoned: Drop then does nothing.
    turn: Option<LocalTurn>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("resources", &self.keys)
            .field("ttl", &self.ttl)
            .field("validity", &self.validity())
            .finish_non_exhaustive()
    }
}

impl LockGuard {
    pub(crate) fn new(
        shared: Arc<Shared>,
        keys: Arc<[String]>,
        ttl: Duration,
        granted: Granted,
        turn: Option<LocalTurn>,
    ) -> Self {
        LockGuard {
            shared,
            keys,
            ttl,
            held: granted,
            turn,
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The resource locked (the first, in sorted order, of a multi-resource lock).
    pub fn resource(&self) -> &str {
        &self.keys[0]
    }

    /// Every resource this guard holds, sorted.
    pub fn resources(&self) -> &[String] {
        &self.keys
    }

    /// The random value stored under each key: lets a service in another language check
    /// ownership the way node-redlock and redsync do. A lock handed on within this process
    /// without a round keeps its value (see
    /// [`max_local_handoffs`](crate::RedlockBuilder::max_local_handoffs)).
    pub fn value(&self) -> &str {
        &self.held.values[0]
    }

    /// The fencing token of this acquisition, when the client has
    /// [`fencing`](crate::RedlockBuilder::fencing) on: strictly greater than the token of
    /// every earlier holder of the same resources. Pass it to the resource you protect and
    /// have it reject anything older than the newest token it has seen.
    pub fn fencing_token(&self) -> Option<u64> {
        self.held.token
    }

    /// The TTL of the latest acquisition or extension.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The instant, on this process's monotonic clock, when the lock stops being safe:
    /// acquisition start + TTL − drift.
    pub fn valid_until(&self) -> std::time::Instant {
        self.held.valid_until.into_std()
    }

    /// [`valid_until`](Self::valid_until) on tokio's clock, which a paused test runtime
    /// controls.
    pub(crate) fn deadline(&self) -> Instant {
        self.held.valid_until
    }

    /// How long the lock is still safe; zero once it is not.
    pub fn validity(&self) -> Duration {
        self.held
            .valid_until
            .saturating_duration_since(Instant::now())
    }

    /// Whether validity is left.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.held.valid_until
    }

    /// Extends the lock to `ttl` from now on a quorum of nodes. `ttl` may be shorter than
    /// the validity left: the lock then ends sooner.
    ///
    /// Refused locally, without asking Redis, once validity has run out. A failed extension
    /// never deletes anything, and you may try again. What it leaves is the earlier of the
    /// previous deadline and the one this extension would have set: a node whose reply was
    /// lost may still have applied the new TTL, so a failed *shortening* shortens the lock
    /// just the same, while a failed lengthening leaves the previous deadline.
    ///
    /// # Errors
    ///
    /// [`Lost`](crate::ErrorKind::Lost) when validity is gone or a quorum no longer holds our
    /// value; [`NoQuorum`](crate::ErrorKind::NoQuorum) when too many nodes failed or did not
    /// answer in time; [`Config`](crate::ErrorKind::Config) for a TTL that leaves no
    /// validity, exceeds [`MAX_TTL`](crate::MAX_TTL) or the restart quarantine.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. If the future is dropped mid-flight some nodes may have applied the new
    /// TTL; the guard keeps the earlier of the two deadlines (the safe side) and still
    /// releases every node.
    pub async fn extend(&mut self, ttl: Duration) -> Result<(), Error> {
        if !self.is_valid() {
            return Err(self.shared.lost(&self.keys, LostReason::Expired));
        }
        self.shared.check_ttl(ttl)?;
        let span = tracing::info_span!(
            "fencelock.extend",
            resource = %self.keys[0],
            ttl_ms = crate::clock::millis_ceil(ttl),
            quorum_margin = tracing::field::Empty,
        );
        let start = Instant::now();
        let new_valid_until = crate::clock::after(start, ttl - self.shared.drift(ttl));
        let previous = self.held.valid_until;
        // From the moment it is sent, the new TTL may land on any node, whatever we hear
        // back: a shorter one shortens the lock now, and a failure cannot undo that.
        self.held.valid_until = previous.min(new_valid_until);
        let replies = self
            .shared
            .fanout
            .extend_all(&self.keys, &self.held.values, ttl, self.held.valid_until)
            .instrument(span.clone())
            .await;
        let (tally, failures) = (replies.tally, replies.failures);
        span.record("quorum_margin", tally.margin());
        match tally.decision() {
            Decision::Reached if Instant::now() < self.held.valid_until => {
                self.held.valid_until = new_valid_until;
                self.ttl = ttl;
                Ok(())
            }
            // Granted, but only after our previous validity ran out: someone else may have
            // held it in between by our clock's reckoning.
            Decision::Reached => Err(self.shared.lost(&self.keys, LostReason::Expired)),
            // Only when the refusals alone rule out a quorum is the lock certainly gone;
            // with failed nodes in the mix it may still be ours until its old deadline.
            _ if tally.refusals_alone_prevent_quorum() => {
                self.held.valid_until = Instant::now().min(self.held.valid_until);
                Err(self.shared.lost(&self.keys, LostReason::NotOwned))
            }
            _ if planted!(self.shared, ExtendKeepsLongerDeadline) => {
                self.held.valid_until = previous;
                Err(Error::NoQuorum {
                    resource: self.keys[0].clone(),
                    operation: "extend",
                    quorum: tally.quorum(),
                    succeeded: tally.ok,
                    failures,
                })
            }
            _ => Err(Error::NoQuorum {
                resource: self.keys[0].clone(),
                operation: "extend",
                quorum: tally.quorum(),
                succeeded: tally.ok,
                failures,
            }),
        }
    }

    /// Releases the lock on every node and reports whether it was still ours.
    ///
    /// # Errors
    ///
    /// [`Lost`](crate::ErrorKind::Lost) when validity had run out or a quorum no longer held
    /// our value: the critical section may not have been exclusive, which you should know.
    /// [`NoQuorum`](crate::ErrorKind::NoQuorum) when too many nodes could not be reached:
    /// their keys expire with the TTL. Either way nothing of ours is left that could be
    /// deleted.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. The guard is consumed when the call starts; if the future is dropped
    /// mid-flight, the release that was sent still happens on the nodes that got it, and
    /// the rest expire with the TTL.
    pub async fn release(mut self) -> Result<(), Error> {
        let mut turn = self.turn.take();
        let expired = !self.is_valid();
        if !expired && self.hand_off(&mut turn) {
            return Ok(());
        }
        self.held.end();
        let span = tracing::info_span!("fencelock.release", resource = %self.keys[0], deleted = tracing::field::Empty);
        let outcome = self
            .shared
            .fanout
            .release_all(&self.keys, &self.held.values, true)
            .instrument(span.clone())
            .await;
        span.record("deleted", outcome.deleted);
        drop(turn);
        let quorum = self.shared.quorum();
        if expired {
            Err(self.shared.lost(&self.keys, LostReason::Expired))
        } else if outcome.deleted >= quorum {
            Ok(())
        } else if outcome.failures.len() > self.shared.fanout.nodes().len() - quorum {
            Err(Error::NoQuorum {
                resource: self.keys[0].clone(),
                operation: "release",
                quorum,
                succeeded: outcome.deleted,
                failures: outcome.failures,
            })
        } else {
            Err(self.shared.lost(&self.keys, LostReason::NotOwned))
        }
    }

    /// Gives the guard up without releasing: the keys stay on the nodes until their TTL
    /// expires. Other tasks of this process may start contending at once.
    pub fn abandon(mut self) {
        self.turn = None;
    }
}

impl LockGuard {
    /// Passes the lock to a task of this process that waits for it, if there is one.
    fn hand_off(&self, turn: &mut Option<LocalTurn>) -> bool {
        let handed = turn.as_mut().is_some_and(|t| t.hand_off(&self.held));
        if handed {
            tracing::debug!(resource = %self.keys[0], chain = self.held.handoffs + 1, "lock handed to a waiting task of this process");
        }
        handed
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut turn = self.turn.take();
        if self.is_valid() && self.hand_off(&mut turn) {
            return;
        }
        if let Some(turn) = turn {
            self.held.end();
            self.shared
                .fanout
                .spawn_release(self.keys.clone(), self.held.values.clone(), turn);
        }
    }
}
