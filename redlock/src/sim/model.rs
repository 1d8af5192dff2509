//! The model of the Lua scripts: a node's data, and what each script does to it, written
//! again in Rust. `tests/script_model.rs` checks it against the real scripts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::switches::{Bug, Planted};
use crate::ops::{Acquire, Acquired, Fencing, Genesis, GenesisStep, Init, Op, Outcome, Verify};
use crate::scripts;

/// Everything a restart without persistence loses.
#[derive(Default, Clone)]
pub(super) struct Data {
    /// key -> (value, expiry on the node's clock in ms)
    pub(super) locks: HashMap<String, (String, f64)>,
    /// Fence counters, the high-water mark and the floor (under their key names): key ->
    /// (value, expiry on the node's clock in ms, or `None` for none).
    pub(super) counters: HashMap<String, (i64, Option<f64>)>,
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
    /// Every fence counter (and the high-water mark and floor) that has not expired.
    pub(super) fn live_counters(&self, now: f64) -> impl Iterator<Item = (String, i64)> + '_ {
        self.counters
            .iter()
            .filter(move |(_, (_, expiry))| expiry.is_none_or(|at| at > now))
            .map(|(k, (v, _))| (k.clone(), *v))
    }

    fn counter(&self, key: &str, now: f64) -> Option<i64> {
        self.counters
            .get(key)
            .filter(|(_, expiry)| expiry.is_none_or(|at| at > now))
            .map(|(v, _)| *v)
    }

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
            counters: self.live_counters(now).collect(),
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

/// The largest number the node knows of `keys` (a live counter raised to the floor, else
/// the high-water mark), and the high-water mark: `fence_known` in `prelude.lua`.
fn fence_known(data: &Data, keys: &[String], now: f64, planted: Planted) -> (i64, i64) {
    let high = data.counter(scripts::HIGH_KEY, now).unwrap_or(0);
    let floor = if planted.contains(Bug::NoFloor) {
        0
    } else {
        data.counter(scripts::FLOOR_KEY, now).unwrap_or(0)
    };
    let missing = if planted.contains(Bug::NoHighWater) {
        0
    } else {
        high
    };
    let known = keys
        .iter()
        .map(|k| match data.counter(&scripts::fence_key(k), now) {
            Some(c) => c.max(floor),
            None => missing,
        })
        .max()
        .unwrap_or(0);
    (known, high)
}

/// Sets the counters of `keys` to `value` for the window and raises the high-water mark to
/// it: `fence_store` in `prelude.lua`.
fn fence_store(data: &mut Data, keys: &[String], now: f64, value: i64, high: i64, window: u64) {
    let expiry = now + window as f64;
    for k in keys {
        data.counters
            .insert(scripts::fence_key(k), (value, Some(expiry)));
    }
    if value > high {
        data.counters
            .insert(scripts::HIGH_KEY.to_owned(), (value, None));
    }
}

/// The next token: one more than the largest number the node knows of `keys`. Every
/// counter is set to it plus the reserved tokens after it.
fn next_token(
    data: &mut Data,
    keys: &[String],
    now: f64,
    fencing: Fencing,
    planted: Planted,
) -> u64 {
    let (known, high) = fence_known(data, keys, now, planted);
    let token = known.max(fencing.hint as i64) + 1;
    fence_store(
        data,
        keys,
        now,
        token + fencing.reserved as i64,
        high,
        fencing.window_ms,
    );
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
    fencing: Option<Fencing>,
    planted: Planted,
) -> u64 {
    let expiry = now + ttl_ms as f64;
    for k in keys {
        data.locks.insert(k.clone(), (value.to_owned(), expiry));
    }
    match fencing {
        Some(fencing) => next_token(data, keys, now, fencing, planted),
        None => 1,
    }
}

/// The model of `seed.lua` once its nonce matched: raises the high-water mark (setting it
/// even when it stays 0) and the floor to `high`.
fn seed_high(data: &mut Data, now: f64, high: u64) {
    let high = data
        .counter(scripts::HIGH_KEY, now)
        .unwrap_or(0)
        .max(high as i64);
    data.counters
        .insert(scripts::HIGH_KEY.to_owned(), (high, None));
    if data.counter(scripts::FLOOR_KEY, now).unwrap_or(0) < high {
        data.counters
            .insert(scripts::FLOOR_KEY.to_owned(), (high, None));
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
        Op::Acquire(op) => Outcome::Acquired(acquire(data, now, op, planted)),
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
            Outcome::HandedOff(ours.then(|| {
                grant(
                    data, now, &op.keys, &op.value, op.ttl_ms, op.fencing, planted,
                )
            }))
        }
        Op::Fence(op) => {
            let ours = op
                .keys
                .iter()
                .all(|k| live(data, k, now) == Some(&*op.value));
            if ours {
                let (known, high) = fence_known(data, &op.keys, now, planted);
                let value = known.max(op.last_token as i64);
                fence_store(data, &op.keys, now, value, high, op.window_ms);
            }
            Outcome::Fenced(ours)
        }
        Op::Seed(op) => {
            let current = stale_seed || data.nonce.as_deref() == Some(op.nonce.as_str());
            if current {
                seed_high(data, now, op.high);
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

fn acquire(data: &mut Data, now: f64, op: &Acquire, planted: Planted) -> Acquired {
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
        token: grant(
            data, now, &op.keys, &op.value, op.ttl_ms, op.fencing, planted,
        ),
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
