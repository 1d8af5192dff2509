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

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::Instant;

mod model;
mod switches;

use crate::ops::{Init, NodePolicy, NodeState, Op, Verify, new_value};
use model::Data;
pub use model::KeySpace;
pub use switches::{Bug, SimOptions};
pub(crate) use switches::{ClientSim, Planted};

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
        self.planted_set().contains(bug)
    }

    fn planted_set(&self) -> Planted {
        Planted(self.planted.load(Ordering::SeqCst))
    }

    /// Runs `op` on the node at once, as one script run: no network, no delay, no
    /// reconnect check. Returns the integer the script would; for comparing the model with
    /// the real scripts.
    pub fn execute(&self, op: &Op) -> i64 {
        let planted = self.planted_set();
        let mut state = self.state();
        let now = state.clock.now_ms();
        model::run(&mut state.data, now, op, planted)
    }

    /// The node's keys as the scripts see them now.
    pub fn key_space(&self) -> KeySpace {
        let state = self.state();
        state.data.key_space(state.clock.now_ms())
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
        model::live(&state.data, key, state.clock.now_ms()).map(str::to_owned)
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
                    let op = Verify {
                        run_id: run_id.to_string(),
                        durable: false,
                        quarantine_ms: conn.quarantine_ms,
                        nonce: new_value(),
                    };
                    model::verify(&mut s.data, now, &op);
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

    pub(crate) fn planted(&self, bug: Bug) -> bool {
        self.node.planted(bug)
    }

    /// The model of `init.lua` followed by a read of the node state.
    pub(crate) async fn restart_state(&self, op: &Init) -> NodeState {
        self.node
            .call(self, |data, now| {
                model::init(data, now, op);
                NodeState {
                    seeded: data.seeded == Some(true),
                    nonce: data.nonce.clone(),
                }
            })
            .await
    }

    pub(crate) async fn fence_counters(&self) -> Vec<(String, i64)> {
        self.node
            .call(self, |data, now| data.live_counters(now).collect())
            .await
    }

    /// A probe's `PING`: answered once the node is not paused. It takes no part in the
    /// node's seeded faults (delays, losses, stalls), so that probing a node does not shift
    /// the schedule of the calls that a test arranges.
    pub(crate) async fn ping(&self) {
        loop {
            let resumed = self.node.resumed.notified();
            if !self.node.state().paused {
                return;
            }
            resumed.await;
        }
    }

    /// One script call.
    pub(crate) async fn eval(&self, op: &Op) -> Result<i64, redis::RedisError> {
        let planted = self.node.planted_set();
        self.node
            .call(self, |data, now| Ok(model::run(data, now, op, planted)))
            .await
    }
}
