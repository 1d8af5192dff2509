//! The contract with the Lua scripts, typed: one operation per script, which writes its own
//! KEYS and ARGV and reads its integer reply into named outcomes. Real nodes and model
//! nodes both go through it; the header of each `.lua` file documents the same contract.
//! Public with the `sim` feature, for the differential test of the model nodes against the
//! scripts.

use std::sync::Arc;

use rand::Rng;
use redis::{ErrorKind, RedisError, Script};

use crate::scripts;

/// What the driver of a node holds every connection to before using it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodePolicy {
    /// The quarantine a node found restarted with part of its data starts, in milliseconds.
    pub(crate) quarantine_ms: u64,
    /// Whether a node whose `maxmemory-policy` may evict keys is used anyway.
    pub(crate) allow_eviction: bool,
}

/// What a node's restart state says, as the seeding reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeState {
    /// Whether its fence counters were seeded in this life of its state.
    pub(crate) seeded: bool,
    /// The name of this life of its state; a seeding must carry it.
    pub(crate) nonce: Option<String>,
}

/// 128 bits from a CSPRNG (rand's thread-local ChaCha, seeded and reseeded from the
/// operating system), hex-encoded: unique per acquisition and opaque, like node-redlock's
/// and redsync's values. Two `getrandom` calls per acquisition cost more than the rest of
/// the client's work for it.
pub(crate) fn new_value() -> String {
    let bits: u128 = rand::rng().random();
    format!("{bits:032x}")
}

/// One call of one lock script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `acquire.lua`.
    Acquire(Acquire),
    /// `release.lua`.
    Release(Release),
    /// `extend.lua`.
    Extend(Extend),
    /// `handoff.lua`.
    Handoff(Handoff),
    /// `fence.lua`.
    Fence(Fence),
    /// `seed.lua`.
    Seed(Seed),
    /// `init.lua`.
    Init(Init),
    /// `verify.lua`.
    Verify(Verify),
    /// `genesis.lua`.
    Genesis(Genesis),
}

/// Sets free keys: see `acquire.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    /// The resource keys, sorted.
    pub keys: Arc<[String]>,
    /// This acquisition's value.
    pub value: Arc<str>,
    /// The TTL in milliseconds.
    pub ttl_ms: u64,
    /// The quarantine a node seen empty for the first time starts, in milliseconds.
    pub quarantine_ms: u64,
    /// With fencing: how many tokens after the one issued to reserve.
    pub fencing: Option<u64>,
}

/// Compare-and-delete: see `release.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The resource keys.
    pub keys: Arc<[String]>,
    /// The values that are ours: this acquisition's and its hand-off chain's.
    pub values: Vec<Arc<str>>,
}

/// Compare-and-`PEXPIRE`: see `extend.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extend {
    /// The resource keys.
    pub keys: Arc<[String]>,
    /// The new TTL in milliseconds.
    pub ttl_ms: u64,
    /// The values that are ours: this acquisition's and its hand-off chain's.
    pub values: Vec<Arc<str>>,
}

/// Swaps a hand-off chain's value for a fresh one: see `handoff.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The resource keys, sorted.
    pub keys: Arc<[String]>,
    /// The fresh value.
    pub value: Arc<str>,
    /// The TTL in milliseconds.
    pub ttl_ms: u64,
    /// With fencing: how many tokens after the one issued to reserve.
    pub fencing: Option<u64>,
    /// The values of the chain so far.
    pub chain: Vec<Arc<str>>,
}

/// The fencing write-back: see `fence.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The resource keys, sorted.
    pub keys: Arc<[String]>,
    /// This acquisition's value.
    pub value: Arc<str>,
    /// The token plus the tokens reserved after it.
    pub last_token: u64,
}

/// Seeds a node that came up empty: see `seed.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The quarantine, should the node not have started one, in milliseconds.
    pub quarantine_ms: u64,
    /// The nonce of the node state the seeding was decided from.
    pub nonce: String,
    /// Fence counter keys and the values to raise them to.
    pub counters: Vec<(String, i64)>,
}

/// Gives a node without a restart state one: see `init.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    /// A fresh nonce, naming the state a creation starts.
    pub nonce: String,
    /// The quarantine in milliseconds.
    pub quarantine_ms: u64,
}

/// Finds a restart that kept part of the data: see `verify.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verify {
    /// The server's `run_id`.
    pub run_id: String,
    /// Whether the node's persistence cannot lose an acknowledged write.
    pub durable: bool,
    /// The quarantine in milliseconds.
    pub quarantine_ms: u64,
    /// A fresh nonce, naming the state a reset starts.
    pub nonce: String,
}

/// One step of opening a new cluster: see `genesis.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Genesis {
    /// Claim or open.
    pub step: GenesisStep,
    /// The nonce of the node state the decision was made from.
    pub nonce: String,
    /// The decision's id.
    pub decision: String,
}

/// The two steps of [`Genesis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenesisStep {
    /// Claim the node for a decision.
    Claim,
    /// Open a node the decision claimed.
    Open,
}

/// A script's reply, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Of [`Acquire`].
    Acquired(Acquired),
    /// Of [`Release`]: how many keys were deleted.
    Released(u64),
    /// Of [`Extend`]: whether every key was ours and was extended.
    Extended(bool),
    /// Of [`Handoff`]: the token (1 without fencing), or `None` when a key was not the
    /// chain's.
    HandedOff(Option<u64>),
    /// Of [`Fence`]: whether every key held our value and the counters were raised.
    Fenced(bool),
    /// Of [`Seed`]: seeded, or refused (the node's state changed).
    Seeded(bool),
    /// Of [`Init`]: whether a state was created or given a nonce.
    Initialised(bool),
    /// Of [`Verify`]: whether the node restarted with data it may not fully have.
    Verified {
        /// It was put back into quarantine, unseeded.
        reset: bool,
    },
    /// Of [`Genesis`]: claimed or opened, or refused.
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

fn bad_reply(script: &str, reply: i64) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "a lock script returned an integer its contract does not have",
        format!("{script}: {reply}"),
    ))
}

fn flag(reply: i64, script: &str) -> Result<bool, RedisError> {
    match reply {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(bad_reply(script, other)),
    }
}

fn text(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn number(n: impl ToString) -> Vec<u8> {
    n.to_string().into_bytes()
}

fn with_fence_keys(keys: &[String], fenced: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(2 * keys.len() + 1);
    out.extend_from_slice(keys);
    if fenced {
        out.extend(keys.iter().map(|k| scripts::fence_key(k)));
    }
    out
}

impl Op {
    /// The script this operation runs.
    pub fn script(&self) -> &'static Script {
        match self {
            Op::Acquire(_) => &scripts::ACQUIRE,
            Op::Release(_) => &scripts::RELEASE,
            Op::Extend(_) => &scripts::EXTEND,
            Op::Handoff(_) => &scripts::HANDOFF,
            Op::Fence(_) => &scripts::FENCE,
            Op::Seed(_) => &scripts::SEED,
            Op::Init(_) => &scripts::INIT,
            Op::Verify(_) => &scripts::VERIFY,
            Op::Genesis(_) => &scripts::GENESIS,
        }
    }

    /// The script's number in the batch script.
    pub(crate) fn number(&self) -> usize {
        match self {
            Op::Acquire(_) => 1,
            Op::Release(_) => 2,
            Op::Extend(_) => 3,
            Op::Handoff(_) => 4,
            Op::Fence(_) => 5,
            Op::Seed(_) => 6,
            Op::Init(_) => 7,
            Op::Verify(_) => 8,
            Op::Genesis(_) => 9,
        }
    }

    /// KEYS, in the order of the script's header.
    pub fn keys(&self) -> Vec<String> {
        match self {
            Op::Acquire(op) => {
                let mut keys = with_fence_keys(&op.keys, op.fencing.is_some());
                keys.push(scripts::NODE_KEY.to_owned());
                keys
            }
            Op::Release(Release { keys, .. }) | Op::Extend(Extend { keys, .. }) => keys.to_vec(),
            Op::Handoff(op) => with_fence_keys(&op.keys, op.fencing.is_some()),
            Op::Fence(op) => with_fence_keys(&op.keys, true),
            Op::Seed(op) => {
                let mut keys = Vec::with_capacity(op.counters.len() + 1);
                keys.push(scripts::NODE_KEY.to_owned());
                keys.extend(op.counters.iter().map(|(k, _)| k.clone()));
                keys
            }
            Op::Init(_) | Op::Verify(_) | Op::Genesis(_) => vec![scripts::NODE_KEY.to_owned()],
        }
    }

    /// ARGV, in the order of the script's header.
    pub fn args(&self) -> Vec<Vec<u8>> {
        match self {
            Op::Acquire(op) => vec![
                text(&op.value),
                number(op.ttl_ms),
                number(op.quarantine_ms),
                number(u8::from(op.fencing.is_some())),
                number(op.fencing.unwrap_or(0)),
            ],
            Op::Release(op) => op.values.iter().map(|v| text(v)).collect(),
            Op::Extend(op) => std::iter::once(number(op.ttl_ms))
                .chain(op.values.iter().map(|v| text(v)))
                .collect(),
            Op::Handoff(op) => [
                text(&op.value),
                number(op.ttl_ms),
                number(u8::from(op.fencing.is_some())),
                number(op.fencing.unwrap_or(0)),
            ]
            .into_iter()
            .chain(op.chain.iter().map(|v| text(v)))
            .collect(),
            Op::Fence(op) => vec![text(&op.value), number(op.last_token)],
            Op::Seed(op) => [number(op.quarantine_ms), text(&op.nonce)]
                .into_iter()
                .chain(op.counters.iter().map(|(_, v)| number(v)))
                .collect(),
            Op::Init(op) => vec![text(&op.nonce), number(op.quarantine_ms)],
            Op::Verify(op) => vec![
                text(&op.run_id),
                number(u8::from(op.durable)),
                number(op.quarantine_ms),
                text(&op.nonce),
            ],
            Op::Genesis(op) => vec![
                text(match op.step {
                    GenesisStep::Claim => "claim",
                    GenesisStep::Open => "open",
                }),
                text(&op.nonce),
                text(&op.decision),
            ],
        }
    }

    /// Reads the script's integer reply.
    ///
    /// # Errors
    ///
    /// An integer the script's contract does not have.
    pub fn decode(&self, reply: i64) -> Result<Outcome, RedisError> {
        Ok(match self {
            Op::Acquire(_) => Outcome::Acquired(match reply {
                1.. => Acquired::Granted {
                    token: reply as u64,
                },
                0 => Acquired::Held,
                -1 => Acquired::Quarantined,
                -2 => Acquired::Unseeded,
                other => return Err(bad_reply("acquire", other)),
            }),
            Op::Release(_) if reply >= 0 => Outcome::Released(reply as u64),
            Op::Release(_) => return Err(bad_reply("release", reply)),
            Op::Extend(_) => Outcome::Extended(flag(reply, "extend")?),
            Op::Handoff(_) => Outcome::HandedOff(match reply {
                1.. => Some(reply as u64),
                0 => None,
                other => return Err(bad_reply("handoff", other)),
            }),
            Op::Fence(_) => Outcome::Fenced(flag(reply, "fence")?),
            Op::Seed(_) => Outcome::Seeded(flag(reply, "seed")?),
            Op::Init(_) => Outcome::Initialised(flag(reply, "init")?),
            Op::Verify(_) => Outcome::Verified {
                reset: match reply {
                    1 => false,
                    2 => true,
                    other => return Err(bad_reply("verify", other)),
                },
            },
            Op::Genesis(_) => Outcome::Genesis(flag(reply, "genesis")?),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_128_bit_and_unique() {
        let a = new_value();
        let b = new_value();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn batch_numbers_follow_the_scripts_order() {
        let keys: Arc<[String]> = Arc::from(["k".to_owned()]);
        let ops = [
            Op::Acquire(Acquire {
                keys: keys.clone(),
                value: "v".into(),
                ttl_ms: 1,
                quarantine_ms: 1,
                fencing: None,
            }),
            Op::Release(Release {
                keys: keys.clone(),
                values: vec![],
            }),
            Op::Extend(Extend {
                keys: keys.clone(),
                ttl_ms: 1,
                values: vec![],
            }),
            Op::Handoff(Handoff {
                keys: keys.clone(),
                value: "v".into(),
                ttl_ms: 1,
                fencing: None,
                chain: vec![],
            }),
            Op::Fence(Fence {
                keys,
                value: "v".into(),
                last_token: 1,
            }),
            Op::Seed(Seed {
                quarantine_ms: 1,
                nonce: "n".into(),
                counters: vec![],
            }),
            Op::Init(Init {
                nonce: "n".into(),
                quarantine_ms: 1,
            }),
            Op::Verify(Verify {
                run_id: "r".into(),
                durable: false,
                quarantine_ms: 1,
                nonce: "n".into(),
            }),
            Op::Genesis(Genesis {
                step: GenesisStep::Claim,
                nonce: "n".into(),
                decision: "d".into(),
            }),
        ];
        for op in &ops {
            assert_eq!(op.number(), scripts::number(op.script()), "{op:?}");
        }
    }

    #[test]
    fn every_outcome_reads_back_from_its_wire_form() {
        let acquire = Op::Acquire(Acquire {
            keys: Arc::from(["k".to_owned()]),
            value: "v".into(),
            ttl_ms: 1,
            quarantine_ms: 1,
            fencing: Some(3),
        });
        for reply in [-2, -1, 0, 1, 7] {
            assert_eq!(acquire.decode(reply).unwrap().wire(), reply);
        }
        assert!(acquire.decode(-3).is_err());
        assert_eq!(
            acquire.args(),
            [&b"v"[..], b"1", b"1", b"1", b"3"].map(<[u8]>::to_vec)
        );
        assert_eq!(
            acquire.keys(),
            ["k", "fencelock:fence:{k}", "fencelock:node"]
        );
    }
}
