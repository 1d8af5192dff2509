//! The model nodes against the real scripts: seeded random sequences of every script
//! operation (acquire, release, extend, hand-off, fence write-back, seed, init, genesis),
//! alone or several in one batch script run, with expiries (of locks and of fence counters)
//! and node wipes in between, run
//! on one real Redis node and on one model node. Every reply and the key space after it must be identical, or the simulation proves
//! less than it seems to. `verify.lua` is left out: its input is the server's `run_id`,
//! which the model numbers its own way; the simulation drives it on every reconnect.
//!
//! A failing sequence prints its seed and step; `SCRIPT_MODEL_SEED=<seed>` replays it alone.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fencelock::ops::{
    Acquire, Extend, Fence, Fencing, Genesis, GenesisStep, Handoff, Init, Op, Release, Seed,
    batch_script,
};
use fencelock::sim::{Bug, KeySpace, SimCluster, SimNode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use support::Cluster;

/// Sequences per run, and operations per sequence (at least): 2 400 operations in all.
const SEQUENCES: u64 = 6;
const OPS: usize = 400;

/// A TTL that outlives any sequence, and one that expires before the next operation.
const LONG_TTL_MS: u64 = 60_000;
const SHORT_TTL_MS: u64 = 30;
/// How long a sequence waits after setting a short TTL: both nodes have expired the keys
/// by then, whatever the load, so neither clock decides alone.
const EXPIRY_WAIT: Duration = Duration::from_millis(80);

const RESOURCES: [&str; 3] = ["a", "b", "c"];

/// The key space of the real node, in one script run so that nothing changes in between.
const DUMP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local strings = {}
for _, k in ipairs(redis.call('KEYS', '*')) do
  if redis.call('TYPE', k).ok == 'string' then
    local v = redis.call('GET', k)
    if v then
      table.insert(strings, k)
      table.insert(strings, v)
    end
  end
end
return {now, strings, redis.call('HGETALL', 'fencelock:node')}
";

async fn real_key_space(conn: &mut MultiplexedConnection) -> KeySpace {
    let (now, strings, node): (i64, Vec<String>, Vec<String>) = redis::Script::new(DUMP)
        .invoke_async(conn)
        .await
        .expect("dump");
    let mut space = KeySpace::default();
    for pair in strings.chunks(2) {
        let (key, value) = (&pair[0], &pair[1]);
        if key == "fencelock:node:ready" {
            space.ready = true;
        } else if key.starts_with("fencelock:fence:") {
            space
                .counters
                .insert(key.clone(), value.parse().expect("a counter"));
        } else {
            space.locks.insert(key.clone(), value.clone());
        }
    }
    let mut fields: BTreeMap<String, String> = node
        .chunks(2)
        .map(|f| (f[0].clone(), f[1].clone()))
        .collect();
    space.quarantined = fields
        .remove("vote_after")
        .map(|at| at.parse::<f64>().expect("a time") - now as f64 > 1000.0);
    space.node = fields;
    space
}

/// `ops` in one run of the batch script, laid out as its header says.
async fn run_real_batch(conn: &mut MultiplexedConnection, ops: &[Op]) -> Vec<i64> {
    let mut call = batch_script().prepare_invoke();
    call.arg(ops.len());
    for op in ops {
        let (keys, args) = (op.keys(), op.args());
        for key in &keys {
            call.key(key);
        }
        call.arg(op.number())
            .arg(keys.len())
            .arg(args.len())
            .arg(args);
    }
    call.invoke_async(conn).await.expect("batch")
}

async fn run_real(conn: &mut MultiplexedConnection, op: &Op) -> i64 {
    let mut call = op.script().prepare_invoke();
    for key in op.keys() {
        call.key(key);
    }
    for arg in op.args() {
        call.arg(arg);
    }
    call.invoke_async(conn).await.expect("script")
}

/// Picks the operations of one sequence, from what the node holds now so that they often
/// hit: values and nonces it has, and now and then ones it does not.
struct Picker {
    rng: SmallRng,
    values: Vec<Arc<str>>,
    decisions: [&'static str; 2],
}

impl Picker {
    fn new(seed: u64) -> Self {
        Picker {
            rng: SmallRng::seed_from_u64(seed),
            values: Vec::new(),
            decisions: ["d1", "d2"],
        }
    }

    fn keys(&mut self) -> Arc<[String]> {
        let n = self.rng.random_range(1..=2);
        let mut keys: Vec<String> = (0..n)
            .map(|_| RESOURCES[self.rng.random_range(0..RESOURCES.len())].to_owned())
            .collect();
        keys.sort();
        keys.dedup();
        keys.into()
    }

    fn fresh_value(&mut self) -> Arc<str> {
        let value: Arc<str> = format!("v{:08x}", self.rng.random::<u32>()).into();
        self.values.push(value.clone());
        if self.values.len() > 8 {
            self.values.remove(0);
        }
        value
    }

    fn known_value(&mut self) -> Arc<str> {
        if self.values.is_empty() || self.rng.random_bool(0.1) {
            return format!("x{:08x}", self.rng.random::<u32>()).into();
        }
        self.values[self.rng.random_range(0..self.values.len())].clone()
    }

    fn known_values(&mut self) -> Vec<Arc<str>> {
        (0..self.rng.random_range(1..=3))
            .map(|_| self.known_value())
            .collect()
    }

    fn ttl_ms(&mut self) -> u64 {
        if self.rng.random_bool(0.05) {
            SHORT_TTL_MS
        } else {
            LONG_TTL_MS
        }
    }

    fn quarantine_ms(&mut self) -> u64 {
        if self.rng.random_bool(0.5) {
            0
        } else {
            600_000
        }
    }

    fn fencing(&mut self) -> Option<Fencing> {
        self.rng.random_bool(0.6).then(|| Fencing {
            reserved: self.rng.random_range(0..4),
            window_ms: self.window_ms(),
            hint: if self.rng.random_bool(0.7) {
                0
            } else {
                self.rng.random_range(0..30)
            },
        })
    }

    /// Fence counters expire often, so that resources are known by the high-water mark
    /// and restored counters by the floor.
    fn window_ms(&mut self) -> u64 {
        if self.rng.random_bool(0.2) {
            SHORT_TTL_MS
        } else {
            LONG_TTL_MS
        }
    }

    fn nonce(&mut self, space: &KeySpace) -> String {
        match space.node.get("nonce") {
            Some(nonce) if self.rng.random_bool(0.8) => nonce.clone(),
            _ => format!("n{:08x}", self.rng.random::<u32>()),
        }
    }

    /// The next step: one operation or a batch of them, or a wipe or a wait.
    fn next(&mut self, space: &KeySpace) -> Step {
        match self.rng.random_range(0..100) {
            0..=1 => Step::Wipe,
            2..=4 => Step::Wait,
            5..=14 => Step::Batch(
                (0..self.rng.random_range(2..=4))
                    .map(|_| self.op(space))
                    .collect(),
            ),
            _ => Step::Ops(vec![self.op(space)]),
        }
    }

    fn op(&mut self, space: &KeySpace) -> Op {
        match self.rng.random_range(5..100) {
            5..=29 => Op::Acquire(Acquire {
                keys: self.keys(),
                value: self.fresh_value(),
                ttl_ms: self.ttl_ms(),
                quarantine_ms: self.quarantine_ms(),
                fencing: self.fencing(),
            }),
            30..=44 => Op::Release(Release {
                keys: self.keys(),
                values: self.known_values(),
            }),
            45..=57 => Op::Extend(Extend {
                keys: self.keys(),
                ttl_ms: self.ttl_ms(),
                values: self.known_values(),
            }),
            58..=70 => Op::Handoff(Handoff {
                keys: self.keys(),
                chain: self.known_values(),
                value: self.fresh_value(),
                ttl_ms: self.ttl_ms(),
                fencing: self.fencing(),
            }),
            71..=79 => Op::Fence(Fence {
                keys: self.keys(),
                value: self.known_value(),
                last_token: self.rng.random_range(0..30),
                window_ms: self.window_ms(),
            }),
            80..=87 => Op::Seed(Seed {
                quarantine_ms: self.quarantine_ms(),
                nonce: self.nonce(space),
                high: self.rng.random_range(0..30),
            }),
            88..=92 => Op::Init(Init {
                nonce: format!("n{:08x}", self.rng.random::<u32>()),
                quarantine_ms: self.quarantine_ms(),
            }),
            _ => Op::Genesis(Genesis {
                step: if self.rng.random_bool(0.5) {
                    GenesisStep::Claim
                } else {
                    GenesisStep::Open
                },
                nonce: self.nonce(space),
                decision: self.decisions[self.rng.random_range(0..2)].to_owned(),
            }),
        }
    }
}

enum Step {
    /// One operation on its own (one of them), or several in one batch.
    Ops(Vec<Op>),
    Batch(Vec<Op>),
    Wipe,
    Wait,
}

/// Whether `op` may leave keys that expire before the next step.
fn sets_short_ttl(op: &Op) -> bool {
    let short_window = |f: &Option<Fencing>| f.is_some_and(|f| f.window_ms == SHORT_TTL_MS);
    match op {
        Op::Acquire(op) => op.ttl_ms == SHORT_TTL_MS || short_window(&op.fencing),
        Op::Extend(op) => op.ttl_ms == SHORT_TTL_MS,
        Op::Handoff(op) => op.ttl_ms == SHORT_TTL_MS || short_window(&op.fencing),
        Op::Fence(op) => op.window_ms == SHORT_TTL_MS,
        _ => false,
    }
}

/// Runs one sequence on both nodes, both starting empty; the first difference is the error.
async fn sequence(
    seed: u64,
    count: usize,
    conn: &mut MultiplexedConnection,
    model: &SimNode,
) -> Result<(usize, usize), String> {
    let _: () = redis::cmd("FLUSHALL").query_async(conn).await.unwrap();
    model.wipe();
    let mut picker = Picker::new(seed);
    let mut space = KeySpace::default();
    let (mut done, mut in_batches) = (0, 0);
    let mut step = 0;
    while done < count {
        step += 1;
        let (ops, batched) = match picker.next(&space) {
            Step::Wipe => {
                let _: () = redis::cmd("FLUSHALL").query_async(conn).await.unwrap();
                model.wipe();
                continue;
            }
            Step::Wait => {
                tokio::time::sleep(EXPIRY_WAIT).await;
                continue;
            }
            Step::Ops(ops) => (ops, false),
            Step::Batch(ops) => (ops, true),
        };
        let real = if batched {
            run_real_batch(conn, &ops).await
        } else {
            vec![run_real(conn, &ops[0]).await]
        };
        for (op, real) in ops.iter().zip(real) {
            let modelled = model.execute(op);
            let outcome = op.decode(real).map_err(|e| format!("{e}"));
            if real != modelled {
                return Err(format!(
                    "seed {seed}, step {step} (batched: {batched}): {op:?}\n  script: {real} ({outcome:?})\n  model:  {modelled} ({:?})",
                    op.decode(modelled)
                ));
            }
        }
        done += ops.len();
        if batched {
            in_batches += ops.len();
        }
        if ops.iter().any(sets_short_ttl) {
            tokio::time::sleep(EXPIRY_WAIT).await;
        }
        let real_space = real_key_space(conn).await;
        let model_space = model.key_space();
        if real_space != model_space {
            return Err(format!(
                "seed {seed}, step {step}: after {ops:?}\n  script: {real_space:?}\n  model:  {model_space:?}"
            ));
        }
        space = real_space;
    }
    Ok((done, in_batches))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_answers_as_the_scripts_do_and_a_planted_difference_is_found() {
    let cluster = Cluster::start(1).await;
    let mut conn = cluster.conn(0).await;
    let started = std::time::Instant::now();

    let seeds: Vec<u64> = match std::env::var("SCRIPT_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("SCRIPT_MODEL_SEED is a number")],
        Err(_) => {
            let base: u64 = rand::random();
            (0..SEQUENCES).map(|i| base.wrapping_add(i)).collect()
        }
    };
    let model = SimCluster::new(1, 0);
    let (mut done, mut in_batches) = (0, 0);
    for &seed in &seeds {
        match sequence(seed, OPS, &mut conn, model.node(0)).await {
            Ok((ops, batched)) => {
                done += ops;
                in_batches += batched;
            }
            Err(difference) => {
                cluster.teardown().await;
                panic!(
                    "the model differs from the scripts (replay with SCRIPT_MODEL_SEED={seed}):\n{difference}"
                );
            }
        }
    }
    eprintln!(
        "{done} operations ({in_batches} of them in batches), model and scripts identical, in {:?}",
        started.elapsed()
    );

    // A model whose release ignores the value must be caught, within one sequence; one
    // that forgets the high-water mark when a counter expired, within the run's sequences.
    for (bug, ops) in [
        (Bug::ModelReleaseIgnoresValue, &["Release"][..]),
        (Bug::NoHighWater, &["fencing: Some", "Fence("][..]),
    ] {
        let planted = SimCluster::new(1, 0);
        planted.plant(bug);
        let mut found = None;
        for &seed in &seeds {
            if let Err(difference) = sequence(seed, OPS, &mut conn, planted.node(0)).await {
                found = Some(difference);
                break;
            }
        }
        let Some(difference) = found else {
            cluster.teardown().await;
            panic!("the planted {bug:?} went unnoticed");
        };
        eprintln!("planted {bug:?} found: {difference}");
        assert!(
            ops.iter().any(|op| difference.contains(op)),
            "{bug:?}: {difference}"
        );
    }
    cluster.teardown().await;
}

/// The fencing scripts keep the node's high-water mark and floor for the rest of a batch
/// once read; a seeding in the same batch raises both, and the acquisitions after it must
/// see that. Run as fixed steps on the real node and the model, every reply compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeding_in_a_batch_is_seen_by_the_acquisitions_after_it() {
    let cluster = Cluster::start(1).await;
    let mut conn = cluster.conn(0).await;
    let model = SimCluster::new(1, 0);
    let model = model.node(0);
    let acquire = |resource: &str, value: &str| {
        Op::Acquire(Acquire {
            keys: [resource.to_owned()].into(),
            value: value.into(),
            ttl_ms: LONG_TTL_MS,
            quarantine_ms: 0,
            fencing: Some(Fencing {
                reserved: 2,
                window_ms: LONG_TTL_MS,
                hint: 0,
            }),
        })
    };
    let seed = |nonce: &str, high: u64| {
        Op::Seed(Seed {
            quarantine_ms: 0,
            nonce: nonce.to_owned(),
            high,
        })
    };
    // Each step on both nodes: its replies, the same on both, or the test fails.
    let mut step = async |ops: Vec<Op>, batched: bool| -> Vec<i64> {
        let real = if batched {
            run_real_batch(&mut conn, &ops).await
        } else {
            vec![run_real(&mut conn, &ops[0]).await]
        };
        let modelled: Vec<i64> = ops.iter().map(|op| model.execute(op)).collect();
        assert_eq!(real, modelled, "{ops:?}");
        real
    };

    // The node comes up empty: the first acquisition names its state, the seeding opens it.
    assert_eq!(step(vec![acquire("a", "v1")], false).await, [-2]);
    assert_eq!(step(vec![seed("v1", 0)], false).await, [1]);
    // `b` is locked once (token 1, counter 3), and released.
    assert_eq!(step(vec![acquire("b", "v2")], false).await, [1]);
    let release = Op::Release(Release {
        keys: ["b".to_owned()].into(),
        values: vec!["v2".into()],
    });
    assert_eq!(step(vec![release], false).await, [1]);
    // One batch: an acquisition reads the mark and floor, a seeding raises both to 1000, and
    // `b`'s next token must be above the floor (1001), not above its old counter (4).
    let replies = step(
        vec![acquire("a", "v3"), seed("v1", 1000), acquire("b", "v4")],
        true,
    )
    .await;
    assert_eq!(replies[1], 1, "the seeding applies: {replies:?}");
    assert_eq!(replies[2], 1001, "{replies:?}");
    cluster.teardown().await;
}
