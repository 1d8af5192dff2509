//! Deterministic simulation: the real client against in-process model nodes
//! (`fencelock::sim`) on a paused tokio clock, with seeded random delays, lost requests
//! and replies, pauses, wipes, restores of older snapshots (also while a node is paused,
//! so that calls queued before the restart land after it) and clock-rate skew within the
//! drift factor. Fence counters expire on the nodes' clocks after a window of 1 ms to 5 s,
//! so that resources are often known by the nodes' high-water marks alone. Workers drive every public operation: `lock`, `try_lock`, `lock_many`,
//! longer and shorter `extend`, `release`, drop, acquisitions cancelled mid-flight, TTLs
//! above the quarantine, pauses past the validity (the GC pause), and `auto_extend`
//! started late, with a sub-task that keeps watching its health handle after the watchdog
//! stops.
//!
//! The checker reads what the guards and health handles claim: a worker "writes" only
//! while its guard reports validity (or its health handle says `Held` or `AtRisk`), and a
//! holding lasts from acquisition to its last such write. Holdings of one resource must
//! not overlap, and with fencing their tokens must strictly increase in acquisition order.
//!
//! `cargo test --release --test simulation` runs 10 000 seeds (a debug build runs 300);
//! `SIM_SCHEDULES=n` sets how many, `SIM_SEED=s` runs one. A failing seed is printed and
//! replays exactly. Each planted bug ([`Bug`]) but one must be caught within the CI-sized
//! run (see [`PLANTED`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fencelock::sim::{Bug, SimCluster, SimOptions};
use fencelock::{LockGuard, LockState, Redlock, RetryPolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const NODES: usize = 5;
const TTL: Duration = Duration::from_millis(200);
/// At least the TTL, as the client requires.
const QUARANTINE: Duration = Duration::from_millis(300);
const SIMULATED: Duration = Duration::from_millis(1_500);
const RESOURCES: [&str; 2] = ["sim:a", "sim:b"];

#[derive(Debug, Clone, Copy, PartialEq)]
struct Holding {
    resource: usize,
    /// `None` without fencing.
    token: Option<u64>,
    acquired: Duration,
    /// The last moment the holder wrote, believing it held the lock.
    last_write: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    pauses: u32,
    wipes: u32,
    restores: u32,
    drops: u32,
    skews: u32,
}

/// How the clients of a schedule are set up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Fencing on: every acquisition gets a larger token, from a round or, handed on
    /// within a client, from the run its last round reserved.
    Fenced,
    /// Fencing off: a hand-off within a client may pass the lock on without any round.
    Unfenced,
    /// Fencing on, with a bug planted: the checker must catch it.
    Planted(Bug),
}

type History = Arc<Mutex<Vec<Holding>>>;

/// What one holder claims, as the checker records it.
struct Claim {
    history: History,
    origin: Instant,
    holdings: Vec<Holding>,
}

impl Claim {
    fn new(history: &History, origin: Instant, guard: &LockGuard) -> Self {
        let resources: Vec<&str> = guard.resources().iter().map(String::as_str).collect();
        Claim::of(history, origin, &resources, guard.fencing_token())
    }

    fn of(history: &History, origin: Instant, resources: &[&str], token: Option<u64>) -> Self {
        let now = origin.elapsed();
        let holdings = resources
            .iter()
            .map(|r| Holding {
                resource: RESOURCES.iter().position(|x| x == r).unwrap(),
                token,
                acquired: now,
                last_write: now,
            })
            .collect();
        Claim {
            history: history.clone(),
            origin,
            holdings,
        }
    }

    /// A write, made because the holder believes it holds the lock now.
    fn write(&mut self) {
        let now = self.origin.elapsed();
        for h in &mut self.holdings {
            h.last_write = now;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.history
            .lock()
            .unwrap()
            .extend(self.holdings.iter().copied());
    }
}

/// How long fence counters live in schedule `seed`: from well within one holding, so that
/// the resources are mostly known by the nodes' high-water marks, to the whole schedule.
/// Derived from the seed, not drawn, so that the schedules' other choices stay as they are.
fn fence_window(seed: u64) -> Duration {
    Duration::from_millis([1, 20, 150, 5_000][(seed / 2 % 4) as usize])
}

fn pick_resources(rng: &mut SmallRng) -> Vec<&'static str> {
    match rng.random_range(0..10) {
        0..=1 => RESOURCES.to_vec(),
        2..=7 => vec![RESOURCES[0]],
        _ => vec![RESOURCES[1]],
    }
}

fn pick_ttl(rng: &mut SmallRng) -> Duration {
    match rng.random_range(0..20) {
        // Above the quarantine: refused, unless that check is planted away.
        0..=1 => QUARANTINE + QUARANTINE / 2,
        2..=4 => TTL / 2,
        _ => TTL,
    }
}

/// One worker's holding with a plain guard: writes while the guard reports validity,
/// sometimes extends (longer or shorter), sometimes pauses past its validity, and ends
/// with a release or a drop.
async fn hold(guard: LockGuard, mut claim: Claim, rng: &mut SmallRng) {
    let mut guard = guard;
    let steps = rng.random_range(1..6);
    for _ in 0..steps {
        match rng.random_range(0..20) {
            // The GC pause: sleep well past the validity, then carry on with the old guard.
            0 => tokio::time::sleep(TTL.mul_f64(rng.random_range(1.0..2.5))).await,
            1..=3 => {
                let ttl = if rng.random_bool(0.5) { TTL / 4 } else { TTL };
                let _ = guard.extend(ttl).await;
            }
            // Work to the very end of the validity: where a missing drift allowance shows.
            4..=5 => {
                let left = guard.validity().saturating_sub(Duration::from_millis(1));
                tokio::time::sleep(left).await;
            }
            _ => {
                let work = Duration::from_micros(rng.random_range(0..12_000));
                tokio::time::sleep(work.min(guard.validity())).await;
            }
        }
        if !guard.is_valid() {
            break;
        }
        claim.write();
    }
    drop(claim);
    if rng.random_bool(0.7) {
        let _ = guard.release().await;
    } else {
        drop(guard);
    }
}

/// One worker's holding under the watchdog, started after a random part of the validity
/// has gone by; writes while the health handle says the lock is held. A sub-task keeps a
/// clone of the handle and goes on writing for a while after the watchdog stops.
async fn hold_watched(guard: LockGuard, mut claim: Claim, rng: &mut SmallRng) {
    let late = guard.validity().mul_f64(rng.random_range(0.0..0.95));
    tokio::time::sleep(late).await;
    if !guard.is_valid() {
        return;
    }
    claim.write();
    let watched = guard.auto_extend();
    let health = watched.health();
    let until = Instant::now() + TTL.mul_f64(rng.random_range(0.0..2.0));
    while Instant::now() < until && holds(&health) {
        claim.write();
        tokio::time::sleep(Duration::from_micros(rng.random_range(500..8_000))).await;
    }
    if holds(&health) {
        claim.write();
    }
    let mut straggler = Claim {
        history: claim.history.clone(),
        origin: claim.origin,
        holdings: claim.holdings.clone(),
    };
    // The sub-task: its writes count for the same holding.
    claim.holdings.clear();
    let sub = {
        let health = health.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if !holds(&health) {
                    break;
                }
                straggler.write();
            }
        })
    };
    let guard = watched.stop().await;
    let _ = guard.release().await;
    sub.await.unwrap();
}

fn holds(health: &fencelock::LockHealth) -> bool {
    matches!(health.state(), LockState::Held | LockState::AtRisk)
}

/// One worker's holding through the scoped API: writes while the health handle says the
/// lock is held; `using` drops the work when the lock is lost.
async fn hold_scoped(
    locks: &Redlock,
    resources: &[&str],
    ttl: Duration,
    history: &History,
    origin: Instant,
    rng: &mut SmallRng,
) {
    let work_for = TTL.mul_f64(rng.random_range(0.0..2.0));
    let step = Duration::from_micros(rng.random_range(500..8_000));
    let _ = locks
        .using(resources, ttl, |health| async move {
            let mut claim = Claim::of(history, origin, resources, health.fencing_token());
            let until = Instant::now() + work_for;
            while Instant::now() < until && holds(&health) {
                claim.write();
                tokio::time::sleep(step).await;
            }
            Ok::<(), ()>(())
        })
        .await;
}

/// Runs one schedule; returns its history and faults, or the violations found.
fn run(seed: u64, mode: Mode) -> Result<(Vec<Holding>, Faults), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let origin = Instant::now();
        let mut rng = SmallRng::seed_from_u64(seed);
        let cluster = SimCluster::new(NODES, seed);
        if let Mode::Planted(bug) = mode {
            cluster.plant(bug);
        }
        // A quarter of the schedules run on a fast network, where clock skew is what
        // decides how close to its expiry a key is seen.
        let max_delay = if rng.random_bool(0.25) { 200 } else { 2_000 };
        for i in 0..NODES {
            cluster
                .node(i)
                .set_max_delay(Duration::from_micros(rng.random_range(20..max_delay)));
        }
        // Sometimes one of the first calls to a node (the clients' state reads and seeding
        // as they start) arrives late, and the node restarts while it is on its way.
        let mut early_restart = None;
        if rng.random_bool(0.3) {
            let i = rng.random_range(0..NODES);
            let late = Duration::from_millis(rng.random_range(100..900));
            cluster.node(i).stall_call(rng.random_range(1..=4), late);
            early_restart = Some((i, late.mul_f64(rng.random_range(0.3..0.9))));
        }
        // The clients start at once, each building (and seeding) while the others work.
        let mut clients = Vec::new();
        for c in 0..3u64 {
            let mut builder = Redlock::builder()
                .node_timeout(Duration::from_millis(20))
                .fencing(mode != Mode::Unfenced)
                .fence_window(fence_window(seed))
                .restart_quarantine(QUARANTINE)
                .retry(RetryPolicy::new(
                    40,
                    Duration::from_millis(2),
                    Duration::from_millis(8),
                ));
            let options = SimOptions::default().jitter_seed(seed ^ (c << 32));
            if mode != Mode::Planted(Bug::NoFenceWriteBack) && c == 0 && seed % 2 == 1 {
                // In every other schedule one client passes the lock along for as long as
                // its workers want it, so that chains outlive the TTL and their reserved
                // tokens, and live on the validity and tokens they carry.
                builder = builder.max_local_handoffs(usize::MAX);
            }
            let cluster = cluster.clone();
            let build =
                tokio::spawn(async move { builder.build_simulated_with(&cluster, options).await });
            clients.push(futures_util::FutureExt::shared(
                futures_util::FutureExt::map(build, |b| b.unwrap().unwrap()),
            ));
        }
        let end = origin + SIMULATED;
        let history: History = Arc::new(Mutex::new(Vec::new()));

        let workers: Vec<_> = (0..6u64)
            .map(|w| {
                let locks = clients[w as usize % clients.len()].clone();
                let history = history.clone();
                let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(w + 1));
                tokio::spawn(async move {
                    let locks = locks.await;
                    while Instant::now() < end {
                        let resources = pick_resources(&mut rng);
                        let ttl = pick_ttl(&mut rng);
                        if rng.random_bool(0.1) {
                            hold_scoped(&locks, &resources, ttl, &history, origin, &mut rng).await;
                            continue;
                        }
                        let once = rng.random_bool(0.1);
                        let acquire = async {
                            if once {
                                locks.try_lock_many(&resources, ttl).await
                            } else {
                                locks.lock_many(&resources, ttl).await
                            }
                        };
                        // Some acquisitions are cancelled mid-flight.
                        let guard = if rng.random_bool(0.1) {
                            let patience = Duration::from_micros(rng.random_range(0..4_000));
                            match tokio::time::timeout(patience, acquire).await {
                                Ok(result) => result,
                                Err(_) => continue,
                            }
                        } else {
                            acquire.await
                        };
                        let Ok(guard) = guard else {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        };
                        assert_eq!(guard.fencing_token().is_some(), mode != Mode::Unfenced);
                        let claim = Claim::new(&history, origin, &guard);
                        if rng.random_bool(0.2) {
                            hold_watched(guard, claim, &mut rng).await;
                        } else {
                            hold(guard, claim, &mut rng).await;
                        }
                    }
                })
            })
            .collect();

        let mut faults = Faults::default();
        let mut last_loss = origin;
        if let Some((i, after)) = early_restart {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                cluster.node(i).wipe();
            });
            // The other faults go on meanwhile; the next loss waits for this one's turn.
            last_loss = origin + after;
            faults.wipes += 1;
        }
        let mut snapshots: Vec<Option<fencelock::sim::Snapshot>> = vec![None; NODES];
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_micros(rng.random_range(5_000..60_000))).await;
            let i = rng.random_range(0..NODES);
            let node = cluster.node(i);
            // One node at a time loses data: the failure model's minority.
            let may_lose = Instant::now() > last_loss + QUARANTINE + TTL;
            match rng.random_range(0..9) {
                0 => {
                    node.pause();
                    let wipe_while_paused = may_lose && rng.random_bool(0.3);
                    tokio::time::sleep(Duration::from_micros(rng.random_range(1_000..150_000)))
                        .await;
                    if wipe_while_paused {
                        // Calls queued before the restart land after it.
                        node.wipe();
                        last_loss = Instant::now();
                        faults.wipes += 1;
                    }
                    node.unpause();
                    faults.pauses += 1;
                }
                1 if may_lose => {
                    node.wipe();
                    last_loss = Instant::now();
                    faults.wipes += 1;
                }
                2 => match snapshots[i].take() {
                    Some(snapshot) if may_lose => {
                        node.restore(&snapshot);
                        last_loss = Instant::now();
                        faults.restores += 1;
                    }
                    _ => snapshots[i] = Some(node.snapshot()),
                },
                3 => {
                    node.set_drop_rate(0.3);
                    tokio::time::sleep(Duration::from_micros(rng.random_range(1_000..80_000)))
                        .await;
                    node.set_drop_rate(0.0);
                    faults.drops += 1;
                }
                5 => {
                    // A majority stalls briefly: no quorum, and what was sent lands late.
                    let first = rng.random_range(0..NODES);
                    let stalled: Vec<usize> =
                        (0..NODES / 2 + 1).map(|k| (first + k) % NODES).collect();
                    for &k in &stalled {
                        cluster.node(k).pause();
                    }
                    tokio::time::sleep(Duration::from_micros(rng.random_range(1_000..40_000)))
                        .await;
                    for &k in &stalled {
                        cluster.node(k).unpause();
                    }
                    faults.pauses += 1;
                }
                6 => {
                    // One or two nodes cut off: locks stand on bare quorums meanwhile.
                    let first = rng.random_range(0..NODES);
                    let cut: Vec<usize> = (0..rng.random_range(1..=2))
                        .map(|k| (first + k) % NODES)
                        .collect();
                    for &k in &cut {
                        cluster.node(k).set_drop_rate(1.0);
                    }
                    tokio::time::sleep(Duration::from_micros(rng.random_range(20_000..300_000)))
                        .await;
                    for &k in &cut {
                        cluster.node(k).set_drop_rate(0.0);
                    }
                    faults.drops += 1;
                }
                4 => {
                    // A small step, well within the 2 ms the drift allowance adds.
                    node.step_clock(rng.random_range(-0.5..0.5));
                    faults.skews += 1;
                }
                _ => {
                    // Within the drift factor of 0.01.
                    let skew = rng.random_range(0.004..0.0099);
                    node.set_clock_rate(if rng.random_bool(0.5) {
                        1.0 + skew
                    } else {
                        1.0 - skew
                    });
                    faults.skews += 1;
                }
            }
        }
        for w in workers {
            w.await.unwrap();
        }
        // Let dropped guards' background releases and watchdog tasks finish.
        tokio::time::sleep(TTL * 3).await;

        let history = history.lock().unwrap().clone();
        let violations = check(&history);
        if violations.is_empty() {
            Ok((history, faults))
        } else {
            Err(violations.join("; "))
        }
    })
}

/// Per resource, in acquisition order: no holding starts before an earlier one's last
/// write, and tokens strictly increase.
fn check(history: &[Holding]) -> Vec<String> {
    let mut violations = Vec::new();
    for (resource, name) in RESOURCES.iter().enumerate() {
        let mut held: Vec<Holding> = history
            .iter()
            .copied()
            .filter(|h| h.resource == resource)
            .collect();
        held.sort_by_key(|h| (h.acquired, h.last_write));
        let mut latest: Option<Holding> = None;
        for pair in held.windows(2) {
            if let (Some(a), Some(b)) = (pair[0].token, pair[1].token)
                && b <= a
            {
                violations.push(format!(
                    "{}: token {b} after token {a}",
                    RESOURCES[resource]
                ));
            }
        }
        for h in held {
            if let Some(l) = latest
                && h.acquired < l.last_write
            {
                violations.push(format!(
                    "{name}: two holders: token {:?} wrote {:?}..{:?}, token {:?} from {:?}",
                    l.token, l.acquired, l.last_write, h.token, h.acquired
                ));
            }
            if latest.is_none_or(|l| h.last_write > l.last_write) {
                latest = Some(h);
            }
        }
    }
    violations
}

fn schedules() -> u64 {
    std::env::var("SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        // The full run is for release builds (`.ci/run` does it); a debug build runs a
        // sample so that `cargo test` stays quick.
        .unwrap_or(if cfg!(debug_assertions) { 300 } else { 10_000 })
}

#[test]
fn random_schedules_keep_mutual_exclusion_and_monotonic_tokens() {
    check_schedules(Mode::Fenced, schedules());
}

/// Without fencing: mutual exclusion must hold just the same. A quarter of the schedules.
#[test]
fn random_schedules_keep_mutual_exclusion_without_fencing() {
    check_schedules(Mode::Unfenced, schedules() / 4);
}

fn check_schedules(mode: Mode, count: u64) {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => (0..count).collect(),
    };
    let started = std::time::Instant::now();
    let (mut holdings, mut faults) = (0usize, Faults::default());
    for &seed in &seeds {
        match run(seed, mode) {
            Ok((history, f)) => {
                holdings += history.len();
                faults.pauses += f.pauses;
                faults.wipes += f.wipes;
                faults.restores += f.restores;
                faults.drops += f.drops;
                faults.skews += f.skews;
            }
            Err(violations) => {
                panic!("{mode:?}: seed {seed} fails (rerun with SIM_SEED={seed}): {violations}")
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulation ({mode:?}): {} schedules in {secs:.1}s ({:.0} schedules/s), {holdings} holdings, faults {faults:?}",
        seeds.len(),
        seeds.len() as f64 / secs
    );
    assert!(
        holdings > seeds.len() * 10,
        "the schedules must actually lock"
    );
    assert!(faults.wipes > 0 && faults.pauses > 0 && faults.drops > 0 && faults.restores > 0);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 1_234_567] {
        let a = run(seed, Mode::Fenced).expect("no violation");
        let b = run(seed, Mode::Fenced).expect("no violation");
        assert_eq!(a.0, b.0, "seed {seed} did not replay");
    }
}

/// The bugs the random schedules must find, each planted alone. A missing drift
/// allowance is not among them: it shows only within about 1 % of a TTL of its expiry,
/// under the millisecond resolution of tokio's timer here; `tests/lock_safety.rs` shows it
/// with a schedule of its own. Nor is a missing floor: it needs a restored counter that
/// still lives, on the one node that decides with a node that missed the last
/// acquisitions, which 10 000 schedules did not produce; `tests/fence_safety.rs` shows it.
const PLANTED: [Bug; 9] = [
    Bug::NoFenceWriteBack,
    Bug::NoHighWater,
    Bug::ExtendKeepsLongerDeadline,
    Bug::StaleSeed,
    Bug::TtlAboveQuarantine,
    Bug::NoRestartDetection,
    Bug::HealthNeverEnds,
    Bug::WatchdogIgnoresValidity,
    Bug::NoQuarantine,
];

/// Every planted bug is caught within the CI-sized run; prints how many schedules each
/// took. Release only: a debug build would take minutes.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "release only: cargo test --release --test simulation"
)]
fn the_checker_catches_every_planted_bug() {
    let budget = schedules();
    let mut missed = Vec::new();
    for bug in PLANTED {
        let started = std::time::Instant::now();
        let found =
            (0..budget).find_map(|seed| run(seed, Mode::Planted(bug)).err().map(|v| (seed, v)));
        match found {
            Some((seed, violations)) => eprintln!(
                "planted {bug:?}: caught by schedule {} of {budget} ({:.1}s): {}",
                seed + 1,
                started.elapsed().as_secs_f64(),
                violations.chars().take(160).collect::<String>()
            ),
            None => missed.push(bug),
        }
    }
    assert!(
        missed.is_empty(),
        "never caught in {budget} schedules: {missed:?}"
    );
}
