//! The contract with the Lua scripts, typed: one operation per script, which writes its own
//! KEYS and ARGV and reads its integer reply into named outcomes. Real nodes and model
//! nodes both go through it; the header of each `.lua` file documents the same contract.
//! Public with the `sim` feature, for the differential test of the model nodes against the
//! scripts.

use std::sync::Arc;

use rand::Rng;
use redis::{ErrorKind, RedisError, Script};

use crate::scripts;

mod reply;

pub(crate) use reply::Vote;
pub use reply::{Acquired, Outcome};

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

/// Whether `value` has the shape [`new_value`] gives: 32 lowercase hex digits.
pub(crate) fn is_value(value: &[u8]) -> bool {
    value.len() == 32 && value.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
    /// With fencing: the tokens to reserve and the counters' window.
    pub fencing: Option<Fencing>,
}

/// What a fenced acquisition or hand-off asks of a node besides the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fencing {
    /// How many tokens after the one issued to reserve.
    pub reserved: u64,
    /// How long the resources' counters live after this write, in milliseconds.
    pub window_ms: u64,
    /// The last token this client was given for these resources (0 if none it remembers):
    /// the node answers more than it, so that a node that missed that acquisition agrees
    /// with the others.
    pub hint: u64,
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
    /// With fencing: the tokens to reserve and the counters' window.
    pub fencing: Option<Fencing>,
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
    /// How long the resources' counters live after this write, in milliseconds.
    pub window_ms: u64,
}

/// Seeds a node that came up empty: see `seed.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The quarantine, should the node not have started one, in milliseconds.
    pub quarantine_ms: u64,
    /// The nonce of the node state the seeding was decided from.
    pub nonce: String,
    /// The largest fencing number read from the seeded nodes (their high-water marks and
    /// counters alike): the node's high-water mark and floor are raised to it.
    pub high: u64,
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
    let mut out = Vec::with_capacity(2 * keys.len() + 3);
    out.extend_from_slice(keys);
    if fenced {
        out.extend(keys.iter().map(|k| scripts::fence_key(k)));
        out.push(scripts::HIGH_KEY.to_owned());
        out.push(scripts::FLOOR_KEY.to_owned());
    }
    out
}

/// The batch script: several operations in one script run (see `scripts::BATCH` for its
/// KEYS and ARGV), as a node's driver sends the calls queued while the node is busy.
#[cfg(feature = "sim")]
pub fn batch_script() -> &'static Script {
    &scripts::BATCH
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
    pub fn number(&self) -> usize {
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
            Op::Seed(_) => [scripts::NODE_KEY, scripts::HIGH_KEY, scripts::FLOOR_KEY]
                .map(str::to_owned)
                .to_vec(),
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
                number(op.fencing.map_or(0, |f| f.reserved)),
                number(op.fencing.map_or(0, |f| f.window_ms)),
                number(op.fencing.map_or(0, |f| f.hint)),
            ],
            Op::Release(op) => op.values.iter().map(|v| text(v)).collect(),
            Op::Extend(op) => std::iter::once(number(op.ttl_ms))
                .chain(op.values.iter().map(|v| text(v)))
                .collect(),
            Op::Handoff(op) => [
                text(&op.value),
                number(op.ttl_ms),
                number(u8::from(op.fencing.is_some())),
                number(op.fencing.map_or(0, |f| f.reserved)),
                number(op.fencing.map_or(0, |f| f.window_ms)),
                number(op.fencing.map_or(0, |f| f.hint)),
            ]
            .into_iter()
            .chain(op.chain.iter().map(|v| text(v)))
            .collect(),
            Op::Fence(op) => vec![text(&op.value), number(op.last_token), number(op.window_ms)],
            Op::Seed(op) => vec![number(op.quarantine_ms), text(&op.nonce), number(op.high)],
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

#[cfg(test)]
mod tests;
