//! A deterministic, in-process model of lock nodes, for simulation testing (feature `sim`).
//!
//! Each [`SimNode`] executes the same operations as the Lua scripts in `scripts/`, written
//! again in Rust, on a key space with TTLs measured by the node's own clock. The clock is
//! tokio's, so a test on a paused runtime (`start_paused`) runs seconds of simulated time
//! in microseconds; the node's clock rate can be skewed. Faults are injected per node:
//! random delays, dropped requests or replies, pauses, and wipes (a restart without data).
//! Every random choice comes from one seeded generator, so a seed replays a schedule.
//!
//! Build a client on the nodes with [`RedlockBuilder::build_simulated`]; everything above
//! the node (rounds, quorum, validity, fencing, write-back, seeding, hand-off) is the real
//! client code.
//!
//! [`RedlockBuilder::build_simulated`]: crate::RedlockBuilder::build_simulated

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::Script;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::scripts;

/// A set of simulated nodes sharing one seeded source of randomness.
#[derive(Debug, Clone)]
pub struct SimCluster {
    nodes: Vec<Arc<SimNode>>,
}

impl SimCluster {
    /// `n` healthy nodes: no delay, no drops, clocks at rate 1. Random choices derive from
    /// `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        let nodes = (0..n)
            .map(|i| {
                Arc::new(SimNode::new(
                    format!("sim-{i}"),
                    seed.wrapping_mul(31).wrapping_add(i as u64),
                ))
            })
            .collect();
        SimCluster { nodes }
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &SimNode {
        &self.nodes[i]
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub(crate) fn shared(&self) -> &[Arc<SimNode>] {
        &self.nodes
    }
}

/// One simulated node.
pub struct SimNode {
    name: String,
    state: Mutex<State>,
    resumed: Notify,
}

impl fmt::Debug for SimNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

struct State {
    data: Data,
    paused: bool,
    drop_rate: f64,
    max_delay: Duration,
    rng: SmallRng,
    clock: Clock,
}

/// Everything a restart without persistence loses.
#[derive(Default)]
struct Data {
    /// key -> (value, expiry on the node's clock in ms)
    locks: HashMap<String, (String, f64)>,
    counters: HashMap<String, i64>,
    vote_after: Option<f64>,
    seeded: Option<bool>,
    ready: bool,
}

/// The node's clock: real (tokio) time scaled by a rate, continuous across rate changes.
struct Clock {
    base_real: Instant,
    base_ms: f64,
    rate: f64,
}

impl Clock {
    fn now_ms(&self) -> f64 {
        self.base_ms + self.base_real.elapsed().as_secs_f64() * 1000.0 * self.rate
    }
}

impl SimNode {
    fn new(name: String, seed: u64) -> Self {
        SimNode {
            name,
            state: Mutex::new(State {
                data: Data::default(),
                paused: false,
                drop_rate: 0.0,
                max_delay: Duration::ZERO,
                rng: SmallRng::seed_from_u64(seed),
                clock: Clock {
                    base_real: Instant::now(),
                    base_ms: 1_000_000.0,
                    rate: 1.0,
                },
            }),
            resumed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's name, used as its address.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops processing requests (they queue) until [`unpause`](Self::unpause).
    pub fn pause(&self) {
        self.state().paused = true;
    }

    /// Processes queued and new requests again.
    pub fn unpause(&self) {
        self.state().paused = false;
        self.resumed.notify_waiters();
    }

    /// A restart without persistence: every key, counter and the restart state are gone.
    pub fn wipe(&self) {
        self.state().data = Data::default();
    }

    /// The probability that a request, or its reply, is lost.
    pub fn set_drop_rate(&self, p: f64) {
        self.state().drop_rate = p.clamp(0.0, 1.0);
    }

    /// Each request and each reply is delayed by a random time up to `max`.
    pub fn set_max_delay(&self, max: Duration) {
        self.state().max_delay = max;
    }

    /// Runs the node's clock at `rate` times real time from now on (TTLs on this node then
    /// expire early or late).
    pub fn set_clock_rate(&self, rate: f64) {
        let mut state = self.state();
        let now = state.clock.now_ms();
        state.clock = Clock {
            base_real: Instant::now(),
            base_ms: now,
            rate,
        };
    }

    /// The value `key` holds now on this node's clock, if it is set and not expired.
    pub fn holds(&self, key: &str) -> Option<String> {
        let state = self.state();
        live(&state.data, key, state.clock.now_ms()).map(str::to_owned)
    }

    pub(crate) fn restart_state(&self) -> (Option<String>, Option<String>) {
        let state = self.state();
        (
            state.data.vote_after.map(|v| (v as i64).to_string()),
            state
                .data
                .seeded
                .map(|s| if s { "1" } else { "0" }.to_owned()),
        )
    }

    pub(crate) fn fence_counters(&self) -> Vec<(String, i64)> {
        self.state()
            .data
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// One script call: delay, maybe lose the request, wait while paused, run the script
    /// atomically, maybe lose the reply, delay. A lost request or reply never answers; the
    /// client's round deadline deals with it.
    pub(crate) async fn eval(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<i64, redis::RedisError> {
        let (before, lose_request, lose_reply, after) = {
            let mut s = self.state();
            let max = s.max_delay.as_micros() as u64;
            let p = s.drop_rate;
            (
                Duration::from_micros(s.rng.random_range(0..=max)),
                s.rng.random_bool(p),
                s.rng.random_bool(p),
                Duration::from_micros(s.rng.random_range(0..=max)),
            )
        };
        tokio::time::sleep(before).await;
        if lose_request {
            std::future::pending::<()>().await;
        }
        loop {
            let resumed = self.resumed.notified();
            if !self.state().paused {
                break;
            }
            resumed.await;
        }
        let reply = {
            let mut s = self.state();
            let now = s.clock.now_ms();
            run(&mut s.data, now, script, keys, args)
        };
        if lose_reply {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(after).await;
        reply
    }
}

fn int(arg: &str) -> i64 {
    arg.parse().unwrap_or(0)
}

fn live<'a>(data: &'a Data, key: &str, now: f64) -> Option<&'a str> {
    data.locks
        .get(key)
        .filter(|(_, expiry)| *expiry > now)
        .map(|(v, _)| v.as_str())
}

/// The next token: one more than the largest counter of `fence_keys`. Every counter is
/// set to it plus the `reserved` tokens after it.
fn next_token(data: &mut Data, fence_keys: &[String], reserved: i64) -> i64 {
    let token = fence_keys
        .iter()
        .map(|k| data.counters.get(k).copied().unwrap_or(0))
        .max()
        .unwrap_or(0)
        + 1;
    for k in fence_keys {
        data.counters.insert(k.clone(), token + reserved);
    }
    token
}

/// Sets the first `n` keys to `value` for `ttl_ms`, and with fencing issues the next token:
/// what acquire and hand-off do once they have decided to grant.
fn grant(
    data: &mut Data,
    now: f64,
    keys: &[String],
    n: usize,
    value: &str,
    ttl_ms: &str,
    // With fencing: how many tokens to reserve after the one issued.
    fence: Option<i64>,
) -> i64 {
    let expiry = now + int(ttl_ms) as f64;
    for k in &keys[..n] {
        data.locks.insert(k.clone(), (value.to_owned(), expiry));
    }
    match fence {
        Some(reserved) => next_token(data, &keys[n..2 * n], reserved),
        None => 1,
    }
}

/// The scripts' semantics, in the order of their `.lua` files' headers.
fn run(
    data: &mut Data,
    now: f64,
    script: &Script,
    keys: &[String],
    args: &[String],
) -> Result<i64, redis::RedisError> {
    let hash = script.get_hash();
    if hash == scripts::ACQUIRE.get_hash() {
        let fenced = args[3] == "1";
        let n = if fenced {
            (keys.len() - 1) / 2
        } else {
            keys.len() - 1
        };
        if !data.ready {
            let Some(vote_after) = data.vote_after else {
                data.vote_after = Some(now + int(&args[2]) as f64);
                data.seeded = Some(false);
                return Ok(-2);
            };
            if data.seeded != Some(true) {
                return Ok(-2);
            }
            if now < vote_after {
                return Ok(-1);
            }
            data.ready = true;
        }
        if keys[..n].iter().any(|k| live(data, k, now).is_some()) {
            return Ok(0);
        }
        let fence = fenced.then(|| int(&args[4]));
        Ok(grant(data, now, keys, n, &args[0], &args[1], fence))
    } else if hash == scripts::RELEASE.get_hash() {
        let mut deleted = 0;
        for k in keys {
            if live(data, k, now).is_some_and(|v| args.iter().any(|a| a == v)) {
                data.locks.remove(k);
                deleted += 1;
            }
        }
        Ok(deleted)
    } else if hash == scripts::EXTEND.get_hash() {
        let values = &args[1..];
        if keys
            .iter()
            .any(|k| !live(data, k, now).is_some_and(|v| values.iter().any(|a| a == v)))
        {
            return Ok(0);
        }
        let expiry = now + int(&args[0]) as f64;
        for k in keys {
            if let Some(entry) = data.locks.get_mut(k) {
                entry.1 = expiry;
            }
        }
        Ok(1)
    } else if hash == scripts::HANDOFF.get_hash() {
        let fenced = args[2] == "1";
        let n = if fenced { keys.len() / 2 } else { keys.len() };
        let chain = &args[4..];
        let ours = |k: &String| live(data, k, now).is_some_and(|v| chain.iter().any(|c| c == v));
        if !keys[..n].iter().all(ours) {
            return Ok(0);
        }
        let fence = fenced.then(|| int(&args[3]));
        Ok(grant(data, now, keys, n, &args[0], &args[1], fence))
    } else if hash == scripts::FENCE.get_hash() {
        let n = keys.len() / 2;
        if keys[..n]
            .iter()
            .any(|k| live(data, k, now) != Some(args[0].as_str()))
        {
            return Ok(0);
        }
        let token = int(&args[1]);
        for k in &keys[n..] {
            let c = data.counters.entry(k.clone()).or_insert(0);
            *c = (*c).max(token);
        }
        Ok(1)
    } else if hash == scripts::SEED.get_hash() {
        for (k, v) in keys[1..].iter().zip(&args[2..]) {
            let c = data.counters.entry(k.clone()).or_insert(0);
            *c = (*c).max(int(v));
        }
        if args[0] == "1" {
            data.vote_after = Some(0.0);
            data.ready = true;
        } else if data.vote_after.is_none() {
            data.vote_after = Some(now + int(&args[1]) as f64);
        }
        data.seeded = Some(true);
        Ok(1)
    } else {
        Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "the simulated node does not know this script",
        )))
    }
}
