//! A deterministic, in-process model of lock nodes, for simulation testing (feature `sim`).
//!
//! Each [`SimNode`] executes the same operations as the Lua scripts in `scripts/`, written
//! again in Rust, on a key space with TTLs measured by the node's own clock. The clock is
//! tokio's, so a test on a paused runtime (`start_paused`) runs seconds of simulated time
//! in microseconds; the node's clock rate can be skewed and its clock stepped. Faults are
//! injected per node: random delays, dropped requests or replies, pauses, wipes (a restart
//! without data) and restores (a restart with an older copy of the data, as from an RDB
//! snapshot). Every call a client makes, the seeding's reads included, crosses the same
//! delayed, lossy network. Every random choice comes from one seeded generator, so a seed
//! replays a schedule.
//!
//! Each client has its own connection to each node, which notices a restart (the node's
//! run id changed) and runs the model of `verify.lua` before anything else, as a real
//! client's driver does on every new connection.
//!
//! Build a client on the nodes with [`RedlockBuilder::build_simulated`]; everything above
//! the node (rounds, quorum, validity, fencing, write-back, seeding, hand-off, extension,
//! the watchdog) is the real client code. [`SimCluster::plant`] plants a known bug in the
//! clients built on the cluster, or in its nodes, to show that a checker catches it.
//!
//! [`RedlockBuilder::build_simulated`]: crate::RedlockBuilder::build_simulated

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::Script;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::ops::{NodePolicy, NodeState, new_value};
use crate::retry::RetryPolicy;
use crate::scripts;

/// A bug to plant, to show that a simulation's checker catches it. Each one undoes a fix
/// (or a safeguard) of the client or of the scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Bug {
    /// The fencing write-back round is skipped: tokens may repeat or go down.
    NoFenceWriteBack,
    /// A failed extension keeps the previous deadline even when it was a shortening whose
    /// shorter TTL may have landed on the nodes.
    ExtendKeepsLongerDeadline,
    /// The nodes apply a seeding decided from a state they no longer have (no nonce check):
    /// a late seeding lifts a newer quarantine.
    StaleSeed,
    /// The client takes locks with a TTL longer than its restart quarantine.
    TtlAboveQuarantine,
    /// A restart that kept part of the data goes unnoticed: no check on reconnect.
    NoRestartDetection,
    /// A [`LockHealth`](crate::LockHealth) keeps its last state after its watchdog stopped.
    HealthNeverEnds,
    /// The watchdog's first extension is at ttl/3 from its start, whatever the validity
    /// left, and it reports at risk only after a failed extension.
    WatchdogIgnoresValidity,
    /// Validity leaves no allowance for clock drift.
    NoDrift,
    /// A node that restarted without its data votes again as soon as it is seeded.
    NoQuarantine,
}

/// The bugs planted in a client or a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Planted(u32);

impl Planted {
    pub(crate) fn contains(self, bug: Bug) -> bool {
        self.0 & (1 << bug as u32) != 0
    }
}

/// What a simulated client does that a real one never does, for tests that need it:
/// handed to [`RedlockBuilder::build_simulated_with`](crate::RedlockBuilder::build_simulated_with)
/// (or, for real nodes, [`RedlockBuilder::build_with`](crate::RedlockBuilder::build_with)).
#[derive(Debug, Clone, Copy, Default)]
pub struct SimOptions {
    jitter_seed: Option<u64>,
    swap_every_hand_off: bool,
}

impl SimOptions {
    /// Draws retry jitter from a generator seeded with `seed`, so that a simulation
    /// replays exactly.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }

    /// Makes every in-process hand-off a swap round, as if validity were always short:
    /// for tests of what happens around those rounds.
    pub fn swap_every_hand_off(mut self) -> Self {
        self.swap_every_hand_off = true;
        self
    }
}

/// A client's simulation switches and planted bugs, as its rounds read them.
#[derive(Debug, Default)]
pub(crate) struct ClientSim {
    pub(crate) planted: Planted,
    jitter: Option<Mutex<SmallRng>>,
    pub(crate) swap_every_hand_off: bool,
}

impl ClientSim {
    pub(crate) fn new(planted: Planted, options: SimOptions) -> Self {
        ClientSim {
            planted,
            jitter: options
                .jitter_seed
                .map(|seed| Mutex::new(SmallRng::seed_from_u64(seed))),
            swap_every_hand_off: options.swap_every_hand_off,
        }
    }

    /// The wait before the next retry, from the seeded generator; `None` without one.
    pub(crate) fn retry_delay(&self, policy: RetryPolicy) -> Option<Duration> {
        let rng = self.jitter.as_ref()?;
        Some(policy.next_delay(&mut *rng.lock().unwrap_or_else(|p| p.into_inner())))
    }
}

/// A set of simulated nodes sharing one seeded source of randomness.
#[derive(Debug, Clone)]
pub struct SimCluster {
    nodes: Vec<Arc<SimNode>>,
    planted: Arc<AtomicU32>,
}

impl SimCluster {
    /// `n` healthy nodes: no delay, no drops, clocks at rate 1. Random choices derive from
    /// `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        let planted = Arc::new(AtomicU32::new(0));
        let nodes = (0..n)
            .map(|i| {
                Arc::new(SimNode::new(
                    format!("sim-{i}"),
                    seed.wrapping_mul(31).wrapping_add(i as u64),
                    planted.clone(),
                ))
            })
            .collect();
        SimCluster { nodes, planted }
    }

    /// Plants `bug` in the nodes and in every client built on the cluster from now on.
    pub fn plant(&self, bug: Bug) {
        self.planted.fetch_or(1 << bug as u32, Ordering::SeqCst);
    }

    pub(crate) fn planted(&self) -> Planted {
        Planted(self.planted.load(Ordering::SeqCst))
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
    planted: Arc<AtomicU32>,
}

impl fmt::Debug for SimNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

struct State {
    data: Data,
    /// The server's run id: a new one at every restart.
    run_id: u64,
    /// Calls that arrived so far, and extra delays for given ones (by arrival number).
    arrivals: u64,
    stalls: Vec<(u64, Duration)>,
    paused: bool,
    drop_rate: f64,
    max_delay: Duration,
    rng: SmallRng,
    clock: Clock,
}

/// Everything a restart without persistence loses.
#[derive(Default, Clone)]
struct Data {
    /// key -> (value, expiry on the node's clock in ms)
    locks: HashMap<String, (String, f64)>,
    counters: HashMap<String, i64>,
    /// The node state `fencelock:node`, field by field.
    vote_after: Option<f64>,
    seeded: Option<bool>,
    nonce: Option<String>,
    boot: Option<u64>,
    /// The genesis decision that claimed this state, if any.
    genesis: Option<String>,
    ready: bool,
}

impl Data {
    fn has_state(&self) -> bool {
        self.vote_after.is_some()
            || self.seeded.is_some()
            || self.nonce.is_some()
            || self.boot.is_some()
    }
}

/// A copy of a node's data, to restore later: what an RDB snapshot is.
#[derive(Clone)]
pub struct Snapshot(Data);

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("locks", &self.0.locks.len())
            .field("counters", &self.0.counters.len())
            .finish()
    }
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
    fn new(name: String, seed: u64, planted: Arc<AtomicU32>) -> Self {
        SimNode {
            name,
            planted,
            state: Mutex::new(State {
                data: Data::default(),
                run_id: 1,
                arrivals: 0,
                stalls: Vec::new(),
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

    fn planted(&self, bug: Bug) -> bool {
        Planted(self.planted.load(Ordering::SeqCst)).contains(bug)
    }

    /// A restart without persistence: every key, counter and the restart state are gone.
    pub fn wipe(&self) {
        let mut state = self.state();
        state.data = Data::default();
        state.run_id += 1;
    }

    /// A copy of the node's data as it is now, for [`restore`](Self::restore).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.state().data.clone())
    }

    /// A restart that comes back with `snapshot` (an older copy of the data, as from an RDB
    /// file or an AOF that lost its tail): what was written since is gone, and what was
    /// deleted since is back. Keys keep their absolute expiry, as Redis's do.
    pub fn restore(&self, snapshot: &Snapshot) {
        let mut state = self.state();
        state.data = snapshot.0.clone();
        state.run_id += 1;
    }

    /// Holds the `k`-th call to arrive from now on (1 for the next one) in the network for
    /// `delay` before the node gets it: one message that overtakes nothing but arrives
    /// late, such as a seeding call queued behind a stall.
    pub fn stall_call(&self, k: u64, delay: Duration) {
        let mut state = self.state();
        let at = state.arrivals + k;
        state.stalls.push((at, delay));
    }

    /// Steps the node's clock by `ms` milliseconds (negative: backwards), as an NTP step
    /// or an operator's `date` would: keys expire earlier or later than their TTL said.
    pub fn step_clock(&self, ms: f64) {
        self.state().clock.base_ms += ms;
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

    /// One call from `conn`: delay, maybe lose the request, wait while paused, then (after
    /// the reconnect check, if the node restarted since `conn` last saw it) run `op`
    /// atomically, maybe lose the reply, delay. A lost request or reply never answers; the
    /// caller's deadline deals with it.
    async fn call<T>(&self, conn: &SimConn, op: impl FnOnce(&mut Data, f64) -> T) -> T {
        let (before, lose_request, lose_reply, after) = {
            let mut s = self.state();
            let max = s.max_delay.as_micros() as u64;
            let p = s.drop_rate;
            s.arrivals += 1;
            let arrival = s.arrivals;
            let stall: Duration = s
                .stalls
                .iter()
                .filter(|(at, _)| *at == arrival)
                .map(|(_, d)| *d)
                .sum();
            (
                Duration::from_micros(s.rng.random_range(0..=max)) + stall,
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
            let run_id = s.run_id;
            let mut seen = conn.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen != Some(run_id) {
                // A new connection: `verify.lua` runs before anything else on it.
                *seen = Some(run_id);
                if !self.planted(Bug::NoRestartDetection) {
                    verify(&mut s.data, now, run_id, conn.quarantine_ms);
                }
            }
            drop(seen);
            op(&mut s.data, now)
        };
        if lose_reply {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(after).await;
        reply
    }
}

/// One client's connection to a simulated node.
pub(crate) struct SimConn {
    node: Arc<SimNode>,
    /// The run id of the node when this connection last reached it.
    seen: Mutex<Option<u64>>,
    quarantine_ms: u64,
}

impl SimConn {
    pub(crate) fn new(node: Arc<SimNode>, policy: NodePolicy) -> Self {
        let quarantine_ms = if node.planted(Bug::NoQuarantine) {
            0
        } else {
            policy.quarantine_ms
        };
        SimConn {
            node,
            seen: Mutex::new(None),
            quarantine_ms,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.node.name
    }

    /// The model of `init.lua` followed by a read of the node state.
    pub(crate) async fn restart_state(&self) -> NodeState {
        let quarantine_ms = self.quarantine_ms as f64;
        self.node
            .call(self, |data, now| {
                if data.vote_after.is_none() {
                    data.vote_after = Some(now + quarantine_ms);
                    data.seeded = Some(false);
                    data.nonce = Some(new_value());
                } else if data.nonce.is_none() {
                    data.nonce = Some(new_value());
                }
                NodeState {
                    seeded: data.seeded == Some(true),
                    nonce: data.nonce.clone(),
                }
            })
            .await
    }

    pub(crate) async fn fence_counters(&self) -> Vec<(String, i64)> {
        self.node
            .call(self, |data, _| {
                data.counters.iter().map(|(k, v)| (k.clone(), *v)).collect()
            })
            .await
    }

    /// One script call.
    pub(crate) async fn eval(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<i64, redis::RedisError> {
        let stale_seed = self.node.planted(Bug::StaleSeed);
        self.node
            .call(self, |data, now| {
                run(data, now, script, keys, args, stale_seed)
            })
            .await
    }
}

/// The model of `verify.lua`, run when a connection finds the node restarted.
fn verify(data: &mut Data, now: f64, run_id: u64, quarantine_ms: u64) {
    if data.boot == Some(run_id) {
        return;
    }
    if !data.has_state() {
        data.boot = Some(run_id);
        return;
    }
    data.ready = false;
    data.genesis = None;
    data.vote_after = Some(now + quarantine_ms as f64);
    data.seeded = Some(false);
    data.nonce = Some(new_value());
    data.boot = Some(run_id);
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
    stale_seed: bool,
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
                data.nonce = Some(args[0].clone());
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
        if !stale_seed && data.nonce.as_deref() != Some(args[1].as_str()) {
            return Ok(0);
        }
        for (k, v) in keys[1..].iter().zip(&args[2..]) {
            let c = data.counters.entry(k.clone()).or_insert(0);
            *c = (*c).max(int(v));
        }
        if data.vote_after.is_none() {
            data.vote_after = Some(now + int(&args[0]) as f64);
        }
        data.seeded = Some(true);
        Ok(1)
    } else if hash == scripts::GENESIS.get_hash() {
        if !stale_seed && data.nonce.as_deref() != Some(args[1].as_str()) {
            return Ok(0);
        }
        if args[0] == "claim" {
            if !stale_seed && (data.seeded == Some(true) || data.genesis.is_some()) {
                return Ok(0);
            }
            data.genesis = Some(args[2].clone());
            return Ok(1);
        }
        if !stale_seed && data.genesis.as_deref() != Some(args[2].as_str()) {
            return Ok(0);
        }
        data.vote_after = Some(0.0);
        data.seeded = Some(true);
        data.ready = true;
        Ok(1)
    } else {
        Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "the simulated node does not know this script",
        )))
    }
}
