//! A script's reply, read: the named outcomes of every script, how each counts in a round,
//! and (for the model nodes) the integer each is on the wire.

/// A script's reply, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Of [`Acquire`](crate::ops::Acquire).
    Acquired(Acquired),
    /// Of [`Release`](crate::ops::Release): how many keys were deleted.
    Released(u64),
    /// Of [`Extend`](crate::ops::Extend): whether every key was ours and was extended.
    Extended(bool),
    /// Of [`Handoff`](crate::ops::Handoff): the token (1 without fencing), or `None` when a key was not the
    /// chain's.
    HandedOff(Option<u64>),
    /// Of [`Fence`](crate::ops::Fence): whether every key held our value and the counters were raised.
    Fenced(bool),
    /// Of [`Seed`](crate::ops::Seed): seeded, or refused (the node's state changed).
    Seeded(bool),
    /// Of [`Init`](crate::ops::Init): whether a state was created or given a nonce.
    Initialised(bool),
    /// Of [`Verify`](crate::ops::Verify): whether the node restarted with data it may not fully have.
    Verified {
        /// It was put back into quarantine, unseeded.
        reset: bool,
    },
    /// Of [`Genesis`](crate::ops::Genesis): claimed or opened, or refused.
    Genesis(bool),
}

/// How acquire answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// Every key set; the fencing token (1 without fencing).
    Granted {
        /// The token.
        token: u64,
    },
    /// Some key exists: nothing set.
    Held,
    /// The node is in quarantine after a restart: nothing set.
    Quarantined,
    /// The node has not been seeded since it came up empty: nothing set.
    Unseeded,
}

/// How one node's reply counts in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vote {
    /// Done; with a grant, its token.
    Yes(u64),
    /// Refused: held by someone else, or not ours.
    No,
    /// The node may not vote after a restart.
    Restarted {
        /// It has not been seeded yet.
        unseeded: bool,
    },
}

impl Outcome {
    /// The integer the script returns for this outcome.
    #[cfg(any(test, feature = "sim"))]
    pub fn wire(self) -> i64 {
        match self {
            Outcome::Acquired(Acquired::Granted { token }) => token as i64,
            Outcome::Acquired(Acquired::Held) => 0,
            Outcome::Acquired(Acquired::Quarantined) => -1,
            Outcome::Acquired(Acquired::Unseeded) => -2,
            Outcome::Released(n) => n as i64,
            Outcome::HandedOff(token) => token.map_or(0, |t| t as i64),
            Outcome::Verified { reset } => 1 + i64::from(reset),
            Outcome::Extended(done)
            | Outcome::Fenced(done)
            | Outcome::Seeded(done)
            | Outcome::Initialised(done)
            | Outcome::Genesis(done) => i64::from(done),
        }
    }

    /// How this reply counts in a round.
    pub(crate) fn vote(self) -> Vote {
        match self {
            Outcome::Acquired(Acquired::Granted { token }) | Outcome::HandedOff(Some(token)) => {
                Vote::Yes(token)
            }
            Outcome::Acquired(Acquired::Held) | Outcome::HandedOff(None) => Vote::No,
            Outcome::Acquired(Acquired::Quarantined) => Vote::Restarted { unseeded: false },
            Outcome::Acquired(Acquired::Unseeded) => Vote::Restarted { unseeded: true },
            Outcome::Released(0) => Vote::No,
            Outcome::Released(n) => Vote::Yes(n),
            Outcome::Verified { .. } => Vote::Yes(1),
            Outcome::Extended(done)
            | Outcome::Fenced(done)
            | Outcome::Seeded(done)
            | Outcome::Initialised(done)
            | Outcome::Genesis(done) => {
                if done {
                    Vote::Yes(1)
                } else {
                    Vote::No
                }
            }
        }
    }
}
