//! The model of the Lua scripts: a node's data, and what each script does to it, written
//! again in Rust. `tests/script_model.rs` checks it against the real scripts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::switches::{Bug, Planted};
use crate::ops::{Acquire, Acquired, Genesis, GenesisStep, Init, Op, Outcome, Verify};
use crate::scripts;

/// Everything a restart without persistence loses.
#[derive(Default, Clone)]
pub(super) struct Data {
    /// key -> (value, expiry on the node's clock in ms)
    pub(super) locks: HashMap<String, (String, f64)>,
    pub(super) counters: HashMap<String, i64>,
    /// The node state `fencelock:node`, field by field.
    pub(super) vote_after: Option<f64>,
    pub(super) seeded: Option<bool>,
    pub(super) nonce: Option<String>,
    pub(super) boot: Option<String>,
    /// The genesis decision that claimed this state, if any.
    pub(super) genesis: Option<String>,
    pub(super) ready: bool,
}

impl Data {
    pub(super) fn has_state(&self) -> bool {
        self.vote_after.is_some()
            || self.seeded.is_some()
            || self.nonce.is_some()
            || self.boot.is_some()
    }
}

/// A node's keys as the scripts see them, for comparing a model node with a real one: lock
/// keys, fence counters and the node state (`fencelock:node`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpace {
    /// Every lock key that has not expired, with its value.
    pub locks: BTreeMap<String, String>,
    /// Every fence counter.
    pub counters: BTreeMap<String, i64>,
    /// The node state's fields but `vote_after`, as Redis stores them.
    pub node: BTreeMap<String, String>,
    /// Without a `vote_after`, `None`; else whether it is more than a second away.
    pub quarantined: Option<bool>,
    /// Whether the `ready` marker is set.
    pub ready: bool,
}

impl Data {
    pub(super) fn key_space(&self, now: f64) -> KeySpace {
        let mut node = BTreeMap::new();
        let fields = [
            (
                "seeded",
                self.seeded.map(|s| if s { "1" } else { "0" }.to_owned()),
            ),
            ("nonce", self.nonce.clone()),
            ("boot", self.boot.clone()),
            ("genesis", self.genesis.clone()),
        ];
        for (field, value) in fields {
            if let Some(value) = value {
                node.insert(field.to_owned(), value);
            }
        }
        KeySpace {
            locks: self
                .locks
                .iter()
                .filter(|(_, (_, expiry))| *expiry > now)
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect(),
            counters: self.counters.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            node,
            quarantined: self.vote_after.map(|at| at - now > 1000.0),
            ready: self.ready,
        }
    }
}

/// The model of `verify.lua`, run when a connection finds the node restarted.
pub(super) fn verify(data: &mut Data, now: f64, op: &Verify) -> Outcome {
    if data.boot.as_deref() == Some(op.run_id.as_str()) {
        return Outcome::Verified { reset: false };
    }
    if !data.has_state() || op.durable {
        data.boot = Some(op.run_id.clone());
        return Outcome::Verified { reset: false };
    }
    data.ready = false;
    data.genesis = None;
    data.vote_after = Some(now + op.quarantine_ms as f64);
    data.seeded = Some(false);
    data.nonce = Some(op.nonce.clone());
    data.boot = Some(op.run_id.clone());
    Outcome::Verified { reset: true }
}

/// The model of `init.lua`.
pub(super) fn init(data: &mut Data, now: f64, op: &Init) -> Outcome {
    if data.vote_after.is_none() {
        data.vote_after = Some(now + op.quarantine_ms as f64);
        data.seeded = Some(false);
        data.nonce = Some(op.nonce.clone());
    } else if data.nonce.is_none() {
        data.nonce = Some(op.nonce.clone());
    } else {
        return Outcome::Initialised(false);
    }
    Outcome::Initialised(true)
}

pub(super) fn live<'a>(data: &'a Data, key: &str, now: f64) -> Option<&'a str> {
    data.locks
        .get(key)
        .filter(|(_, expiry)| *expiry > now)
        .map(|(v, _)| v.as_str())
}

/// The next token: one more than the largest fence counter of `keys`. Every counter is
/// set to it plus the `reserved` tokens after it.
fn next_token(data: &mut Data, keys: &[String], reserved: u64) -> u64 {
    let counters: Vec<String> = keys.iter().map(|k| scripts::fence_key(k)).collect();
    let token = counters
        .iter()
        .map(|k| data.counters.get(k).copied().unwrap_or(0))
        .max()
        .unwrap_or(0)
        + 1;
    for k in counters {
        data.counters.insert(k, token + reserved as i64);
    }
    token as u64
}

/// Sets `keys` to `value` for `ttl_ms`, and with fencing issues the next token: what
/// acquire and hand-off do once they have decided to grant. Returns the token (1 without
/// fencing).
fn grant(
    data: &mut Data,
    now: f64,
    keys: &[String],
    value: &str,
    ttl_ms: u64,
    fencing: Option<u64>,
) -> u64 {
    let expiry = now + ttl_ms as f64;
    for k in keys {
        data.locks.insert(k.clone(), (value.to_owned(), expiry));
    }
    match fencing {
        Some(reserved) => next_token(data, keys, reserved),
        None => 1,
    }
}

/// Raises a counter to `to`, as the scripts do: a missing counter reads as 0 and is only
/// written when `to` is above that.
fn raise(data: &mut Data, counter: String, to: i64) {
    if data.counters.get(&counter).copied().unwrap_or(0) < to {
        data.counters.insert(counter, to);
    }
}

/// Whether `key` holds one of `values`.
fn holds_one_of(data: &Data, key: &str, now: f64, values: &[Arc<str>]) -> bool {
    live(data, key, now).is_some_and(|v| values.iter().any(|a| &**a == v))
}

/// The scripts' semantics, one operation at a time, as their `.lua` files' headers say.
pub(super) fn run(data: &mut Data, now: f64, op: &Op, planted: Planted) -> i64 {
    let stale_seed = planted.contains(Bug::StaleSeed);
    let outcome = match op {
        Op::Acquire(op) => Outcome::Acquired(acquire(data, now, op)),
        Op::Release(op) => {
            let mut deleted = 0;
            for k in op.keys.iter() {
                if holds_one_of(data, k, now, &op.values)
                    || (planted.contains(Bug::ModelReleaseIgnoresValue)
                        && live(data, k, now).is_some())
                {
                    data.locks.remove(k);
                    deleted += 1;
                }
            }
            Outcome::Released(deleted)
        }
        Op::Extend(op) => {
            let ours = op
                .keys
                .iter()
                .all(|k| holds_one_of(data, k, now, &op.values));
            if ours {
                let expiry = now + op.ttl_ms as f64;
                for k in op.keys.iter() {
                    if let Some(entry) = data.locks.get_mut(k) {
                        entry.1 = expiry;
                    }
                }
            }
            Outcome::Extended(ours)
        }
        Op::Handoff(op) => {
            let ours = op
                .keys
                .iter()
                .all(|k| holds_one_of(data, k, now, &op.chain));
            Outcome::HandedOff(
                ours.then(|| grant(data, now, &op.keys, &op.value, op.ttl_ms, op.fencing)),
            )
        }
        Op::Fence(op) => {
            let ours = op
                .keys
                .iter()
                .all(|k| live(data, k, now) == Some(&*op.value));
            if ours {
                for k in op.keys.iter() {
                    raise(data, scripts::fence_key(k), op.last_token as i64);
                }
            }
            Outcome::Fenced(ours)
        }
        Op::Seed(op) => {
            let current = stale_seed || data.nonce.as_deref() == Some(op.nonce.as_str());
            if current {
                for (k, v) in &op.counters {
                    raise(data, k.clone(), *v);
                }
                if data.vote_after.is_none() {
                    data.vote_after = Some(now + op.quarantine_ms as f64);
                }
                data.seeded = Some(true);
            }
            Outcome::Seeded(current)
        }
        Op::Init(op) => init(data, now, op),
        Op::Verify(op) => verify(data, now, op),
        Op::Genesis(op) => Outcome::Genesis(genesis(data, op, stale_seed)),
    };
    outcome.wire()
}

fn acquire(data: &mut Data, now: f64, op: &Acquire) -> Acquired {
    if !data.ready {
        let Some(vote_after) = data.vote_after else {
            data.vote_after = Some(now + op.quarantine_ms as f64);
            data.seeded = Some(false);
            data.nonce = Some(op.value.to_string());
            return Acquired::Unseeded;
        };
        if data.seeded != Some(true) {
            return Acquired::Unseeded;
        }
        if now < vote_after {
            return Acquired::Quarantined;
        }
        data.ready = true;
    }
    if op.keys.iter().any(|k| live(data, k, now).is_some()) {
        return Acquired::Held;
    }
    Acquired::Granted {
        token: grant(data, now, &op.keys, &op.value, op.ttl_ms, op.fencing),
    }
}

fn genesis(data: &mut Data, op: &Genesis, stale_seed: bool) -> bool {
    if !stale_seed && data.nonce.as_deref() != Some(op.nonce.as_str()) {
        return false;
    }
    match op.step {
        GenesisStep::Claim => {
            if !stale_seed && (data.seeded == Some(true) || data.genesis.is_some()) {
                return false;
            }
            data.genesis = Some(op.decision.clone());
        }
        GenesisStep::Open => {
            if !stale_seed && data.genesis.as_deref() != Some(op.decision.as_str()) {
                return false;
            }
            data.vote_after = Some(0.0);
            data.seeded = Some(true);
            data.ready = true;
        }
    }
    true
}
