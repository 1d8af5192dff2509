//! The chaos driver: brings up the failover lab (`deploy/docker-compose.yml`), enqueues
//! payment jobs with duplicates, injects faults on a seeded random schedule while the
//! runners work, lets the system drain, and then checks, from the ledger's attempt log and
//! the queue, that every order was charged exactly once and no job was lost.
//!
//! ```sh
//! cargo run --release -p job-runner --features payment-demo --example chaos                      # 5 000 jobs, 500 orders
//! cargo run --release -p job-runner --features payment-demo --example chaos -- --seed 42         # replay a schedule
//! cargo run --release -p job-runner --features payment-demo --example chaos -- --no-fencing      # what the fence prevents
//! ```
//!
//! Faults, each at least once: stop and start a lock node, pause and unpause one, restart
//! one empty, SIGKILL a runner and start it again, pause a runner longer than the lock TTL
//! (the GC-pause case), restart the queue Redis (AOF on), write a hostile entry (any bytes,
//! not a job) into the stream, and wipe the queue Redis (killed, its files deleted,
//! started empty). At most two of the five lock nodes are impaired at any time (down,
//! paused, or in their post-restart quarantine), the failure model the lock is built for.
//! A wipe loses the jobs the queue held; the runners must report it
//! (`job_runner_queue_data_lost_total`) and go on, and the driver, as a producer told of
//! the loss, enqueues again every job it sent before (duplicates are harmless): each job
//! then counts as done when its copy is. Exits 1 on any violation.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use job_runner::ledger::{Ledger, Outcome};
use job_runner::{NewJob, Queue};
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Chaos run over the failover lab.
#[derive(Debug, Parser)]
struct Args {
    /// Payment jobs to enqueue.
    #[arg(long, default_value_t = 5_000)]
    jobs: usize,
    /// Orders they pay (jobs beyond one per order are duplicates).
    #[arg(long, default_value_t = 500)]
    orders: usize,
    /// Seconds of fault injection (at least until every fault kind ran once).
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// Milliseconds between faults.
    #[arg(long, default_value_t = 2_000)]
    fault_interval_ms: u64,
    /// Seed of the fault schedule [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated gateway latency in the runners, ms (the window a pause can hit).
    #[arg(long, default_value_t = 40)]
    gateway_latency_ms: u64,
    /// Turn the ledger's fencing check off: the checker should then find violations.
    #[arg(long)]
    no_fencing: bool,
    /// Leave the lab running afterwards.
    #[arg(long)]
    keep: bool,
}

const LOCKS: [&str; 5] = [
    "lab-lock1",
    "lab-lock2",
    "lab-lock3",
    "lab-lock4",
    "lab-lock5",
];
const LOCK_PORTS: [u16; 5] = [16381, 16382, 16383, 16384, 16385];
const RUNNERS: [&str; 3] = ["lab-runner1", "lab-runner2", "lab-runner3"];
const METRICS_PORTS: [u16; 3] = [19461, 19462, 19463];
const QUEUE_URL: &str = "redis://127.0.0.1:16379";
/// The lab's lock TTL (deploy/docker-compose.yml) and the runners' restart quarantine.
const LOCK_TTL: Duration = Duration::from_millis(3000);
const QUARANTINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    StopStartLock,
    PauseLock,
    RestartLockEmpty,
    KillRunner,
    PauseRunner,
    RestartQueue,
    HostileEntry,
    WipeQueue,
}

const ALL_FAULTS: [Fault; 8] = [
    Fault::StopStartLock,
    Fault::PauseLock,
    Fault::RestartLockEmpty,
    Fault::KillRunner,
    Fault::PauseRunner,
    Fault::RestartQueue,
    Fault::HostileEntry,
    Fault::WipeQueue,
];

/// An entry that is not a job: field names and values of any bytes, some empty, one
/// large; the runners must dead-letter it alone.
fn hostile_fields(rng: &mut SmallRng) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut bytes = |len: usize| {
        let mut b = vec![0u8; len];
        rng.fill(&mut b[..]);
        b
    };
    vec![
        (b"\xff\xfe".to_vec(), bytes(16)),
        (bytes(8), Vec::new()),
        (b"job".to_vec(), bytes(64 * 1024)),
    ]
}

fn docker(args: &[&str]) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    if !out.status.success() {
        eprintln!(
            "chaos: docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

fn lab(root: &Path, args: &[&str], no_fencing: bool, latency: u64) {
    let status = Command::new("bash")
        .arg(root.join("deploy/lab.sh"))
        .args(args)
        .env(
            "LAB_UNSAFE_NO_FENCING",
            if no_fencing { "true" } else { "false" },
        )
        .env("LAB_GATEWAY_LATENCY_MS", latency.to_string())
        .env("LAB_RUST_LOG", "warn")
        .status()
        .expect("run deploy/lab.sh");
    assert!(status.success(), "deploy/lab.sh {args:?} failed");
}

/// What is impaired until when; faults pick only healthy targets.
#[derive(Default)]
struct Impaired {
    locks: [Option<Instant>; 5],
    runners: [Option<Instant>; 3],
}

impl Impaired {
    fn free_lock(&mut self, rng: &mut SmallRng) -> Option<usize> {
        let now = Instant::now();
        let busy = self
            .locks
            .iter()
            .filter(|u| u.is_some_and(|u| u > now))
            .count();
        if busy >= 2 {
            return None;
        }
        let free: Vec<usize> = (0..5)
            .filter(|&i| self.locks[i].is_none_or(|u| u <= now))
            .collect();
        free.choose(rng).copied()
    }

    fn free_runner(&mut self, rng: &mut SmallRng) -> Option<usize> {
        let now = Instant::now();
        let free: Vec<usize> = (0..3)
            .filter(|&i| self.runners[i].is_none_or(|u| u <= now))
            .collect();
        // Keep at least one runner working.
        if free.len() < 2 {
            return None;
        }
        free.choose(rng).copied()
    }
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// Sums of the runners' counters of interest, from their `/metrics`.
async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    let Some(text) = http_get(port, "/metrics").await else {
        return sums;
    };
    for line in text.lines().filter(|l| l.starts_with("job_runner_")) {
        let (series, value) = match line.rsplit_once(' ') {
            Some((s, v)) => (s, v.parse::<f64>().unwrap_or(0.0)),
            None => continue,
        };
        let key = if series.starts_with("job_runner_jobs_total") {
            match series
                .split("outcome=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                Some(outcome) => format!("jobs {outcome}"),
                None => continue,
            }
        } else if series.starts_with("job_runner_reclaimed_total") {
            "reclaimed".into()
        } else if series.starts_with("job_runner_locks_lost_total") {
            "locks lost".into()
        } else if series.starts_with("job_runner_queue_data_lost_total") {
            match series
                .split("what=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                Some(what) => format!("queue data lost ({what})"),
                None => continue,
            }
        } else {
            continue;
        };
        *sums.entry(key).or_insert(0.0) += value;
    }
    sums
}

fn add(into: &mut BTreeMap<String, f64>, from: BTreeMap<String, f64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0.0) += v;
    }
}

async fn lock_keys_left() -> Vec<String> {
    let mut left = Vec::new();
    for (i, port) in LOCK_PORTS.iter().enumerate() {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            left.push(format!("lock{}: unreachable", i + 1));
            continue;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        left.extend(
            keys.into_iter()
                .filter(|k| !k.starts_with("fencelock:"))
                .map(|k| format!("lock{}: {k}", i + 1)),
        );
    }
    left
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = SmallRng::seed_from_u64(seed);
    println!(
        "chaos: seed {seed}, {} jobs over {} orders, {} s of faults, fencing {}",
        args.jobs,
        args.orders,
        args.duration_secs,
        if args.no_fencing { "OFF" } else { "on" }
    );

    lab(&root, &["down"], args.no_fencing, args.gateway_latency_ms);
    let lab_services = [
        "up", "lock1", "lock2", "lock3", "lock4", "lock5", "queue", "runner1", "runner2", "runner3",
    ];
    lab(
        &root,
        &lab_services,
        args.no_fencing,
        args.gateway_latency_ms,
    );

    let queue = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Queue::connect(QUEUE_URL, "jobs", "chaos-driver").await {
                Ok(q) => break q,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the lab's queue did not come up: {e}"),
            }
        }
    };

    // Jobs trickle in over the first half of the fault phase, so faults hit work in flight.
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|i| {
            let order = (i % args.orders) as i64 + 1;
            NewJob::new(
                "payment",
                format!("order:{order}"),
                json!({"order_id": order, "amount_cents": order * 100}),
            )
        })
        .collect();
    let started = Instant::now();
    // Every job sent, with the id of its newest copy (a wipe makes new copies).
    let ids: Arc<Mutex<Vec<(String, NewJob)>>> = Arc::default();
    let producer = {
        let (queue, ids) = (queue.clone(), ids.clone());
        let spread = Duration::from_secs(args.duration_secs) / 2;
        tokio::spawn(async move {
            let batches: Vec<&[NewJob]> = jobs.chunks(50).collect();
            let pause = spread / batches.len().max(1) as u32;
            for batch in batches {
                loop {
                    match queue.enqueue_many(batch).await {
                        Ok(new) => {
                            ids.lock()
                                .unwrap()
                                .extend(new.into_iter().zip(batch.iter().cloned()));
                            break;
                        }
                        // The queue Redis may be restarting: try again (a batch is one
                        // pipeline, so a failure may have enqueued part of it; the
                        // duplicates are harmless and their ids are not needed).
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                tokio::time::sleep(pause).await;
            }
        })
    };

    // Faults: the first round covers every kind in a seeded order, then random kinds.
    let mut schedule: Vec<Fault> = ALL_FAULTS.to_vec();
    schedule.shuffle(&mut rng);
    let mut impaired = Impaired::default();
    let mut injected: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut tasks = Vec::new();
    let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
    let fault_end = started + Duration::from_secs(args.duration_secs);
    let mut next = 0usize;
    let mut raw_queue = redis::Client::open(QUEUE_URL)
        .expect("queue URL")
        .get_connection_manager()
        .await
        .expect("connect to the queue");
    let mut hostile_since_wipe = 0usize;
    while Instant::now() < fault_end || injected.len() < ALL_FAULTS.len() {
        let fault = if next < schedule.len() {
            schedule[next]
        } else {
            ALL_FAULTS[rng.random_range(0..ALL_FAULTS.len())]
        };
        let applied = match fault {
            Fault::StopStartLock | Fault::PauseLock | Fault::RestartLockEmpty => {
                match impaired.free_lock(&mut rng) {
                    None => false,
                    Some(i) => {
                        let name = LOCKS[i];
                        let down = Duration::from_millis(rng.random_range(1000..4000));
                        let (until, steps): (Instant, Vec<(Duration, Vec<&str>)>) = match fault {
                            Fault::StopStartLock => (
                                // Comes back empty: quarantined after it starts again.
                                Instant::now() + down + QUARANTINE + Duration::from_secs(2),
                                vec![
                                    (Duration::ZERO, vec!["stop", "-t", "0", name]),
                                    (down, vec!["start", name]),
                                ],
                            ),
                            Fault::PauseLock => (
                                Instant::now() + down + Duration::from_millis(500),
                                vec![
                                    (Duration::ZERO, vec!["pause", name]),
                                    (down, vec!["unpause", name]),
                                ],
                            ),
                            _ => (
                                Instant::now() + QUARANTINE + Duration::from_secs(3),
                                vec![(Duration::ZERO, vec!["restart", "-t", "0", name])],
                            ),
                        };
                        impaired.locks[i] = Some(until);
                        tasks.push(tokio::spawn(run_steps(steps)));
                        println!(
                            "chaos: {:>6.1}s {fault:?} {name}",
                            started.elapsed().as_secs_f64()
                        );
                        true
                    }
                }
            }
            Fault::KillRunner | Fault::PauseRunner => match impaired.free_runner(&mut rng) {
                None => false,
                Some(i) => {
                    let name = RUNNERS[i];
                    if fault == Fault::KillRunner {
                        // Its counters die with it: keep what it had counted.
                        add(&mut metrics, scrape(METRICS_PORTS[i]).await);
                    }
                    let (until, steps) = if fault == Fault::KillRunner {
                        let down = Duration::from_millis(rng.random_range(500..3000));
                        (
                            Instant::now() + down + Duration::from_secs(2),
                            vec![
                                (Duration::ZERO, vec!["kill", "-s", "KILL", name]),
                                (down, vec!["start", name]),
                            ],
                        )
                    } else {
                        // Longer than the TTL, the visibility timeout and a reclaim
                        // period: its jobs are taken over before it wakes.
                        let pause =
                            LOCK_TTL * 3 + Duration::from_millis(rng.random_range(1000..3000));
                        (
                            Instant::now() + pause + Duration::from_secs(1),
                            vec![
                                (Duration::ZERO, vec!["pause", name]),
                                (pause, vec!["unpause", name]),
                            ],
                        )
                    };
                    impaired.runners[i] = Some(until);
                    tasks.push(tokio::spawn(run_steps(steps)));
                    println!(
                        "chaos: {:>6.1}s {fault:?} {name}",
                        started.elapsed().as_secs_f64()
                    );
                    true
                }
            },
            Fault::HostileEntry => {
                let mut xadd = redis::cmd("XADD");
                xadd.arg("jobs:jobs").arg("*");
                for (k, v) in hostile_fields(&mut rng) {
                    xadd.arg(k).arg(v);
                }
                let added: Result<String, _> = xadd.query_async(&mut raw_queue).await;
                if added.is_ok() {
                    hostile_since_wipe += 1;
                    println!(
                        "chaos: {:>6.1}s {fault:?} jobs:jobs",
                        started.elapsed().as_secs_f64()
                    );
                }
                added.is_ok()
            }
            Fault::WipeQueue => {
                hostile_since_wipe = 0;
                // Killed, its files deleted, started again: empty, as after a disk loss.
                run_steps(vec![
                    (Duration::ZERO, vec!["kill", "-s", "KILL", "lab-queue"]),
                    (
                        Duration::ZERO,
                        vec![
                            "run",
                            "--rm",
                            "--volumes-from",
                            "lab-queue",
                            "--entrypoint",
                            "sh",
                            "redis:7.0",
                            "-c",
                            "rm -rf /data/* /data/.[!.]*",
                        ],
                    ),
                    (Duration::ZERO, vec!["start", "lab-queue"]),
                ])
                .await;
                println!(
                    "chaos: {:>6.1}s {fault:?} lab-queue",
                    started.elapsed().as_secs_f64()
                );
                tasks.push(tokio::spawn(send_again(queue.clone(), ids.clone())));
                true
            }
            Fault::RestartQueue => {
                tasks.push(tokio::spawn(run_steps(vec![(
                    Duration::ZERO,
                    vec!["restart", "-t", "2", "lab-queue"],
                )])));
                println!(
                    "chaos: {:>6.1}s {fault:?} lab-queue",
                    started.elapsed().as_secs_f64()
                );
                true
            }
        };
        if applied {
            *injected.entry(fault).or_insert(0) += 1;
            next += 1;
        } else if next < schedule.len() {
            // Its targets are busy: move it later in the first round.
            schedule.push(schedule[next]);
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(args.fault_interval_ms)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    producer.await.expect("producer");
    // Every runner is back: make sure the stopped ones run (a kill may have raced a start).
    for name in RUNNERS {
        docker(&["start", name]);
    }
    println!(
        "chaos: faults over after {:.1}s; draining",
        started.elapsed().as_secs_f64()
    );

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(st) = queue.stats().await
            && st.depth == 0
            && st.pending == 0
            && st.delayed == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    for port in METRICS_PORTS {
        add(&mut metrics, scrape(port).await);
    }
    tokio::time::sleep(LOCK_TTL + Duration::from_secs(1)).await;
    let keys_left = lock_keys_left().await;

    // The checker: the ledger's attempt log, the dead letters, the lock nodes.
    for name in RUNNERS {
        docker(&["stop", "-t", "30", name]);
    }
    let copy = std::env::temp_dir().join(format!("chaos-ledger-{seed}"));
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    docker(&["cp", "lab-runner1:/data/.", copy.to_str().unwrap()]);
    let ledger =
        Ledger::open_with(copy.join("ledger.db"), !args.no_fencing).expect("open the ledger copy");
    let audit = ledger.audit().expect("audit");
    let attempts = ledger.attempts().expect("attempts");
    let dead = queue.dead_list(100_000).await.expect("dead letters");
    let st = queue.stats().await.expect("stats");

    let hostile_dead = dead
        .iter()
        .filter(|d| d.reason.starts_with("malformed job"))
        .count();
    let done: HashSet<&str> = attempts
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Charged | Outcome::AlreadyPaid))
        .map(|a| a.job_id.as_str())
        .collect();
    let dead_ids: HashSet<String> = dead
        .iter()
        .filter_map(|d| job_runner::job::parse(Some(&d.raw)).ok().map(|j| j.id))
        .collect();
    let ids: Vec<String> = ids
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !done.contains(id.as_str()) && !dead_ids.contains(*id))
        .collect();
    let unpaid = args.orders.saturating_sub(audit.paid);

    let mut violations = Vec::new();
    if unpaid > 0 {
        violations.push(format!("{unpaid} orders not paid"));
    }
    for (order, n) in &audit.double_charged {
        violations.push(format!("order {order} charged {n} times"));
    }
    for order in &audit.inconsistent {
        violations.push(format!("order {order}: paid flag and charges disagree"));
    }
    for (order, a, b) in &audit.overlapping {
        violations.push(format!(
            "order {order}: holders with tokens {a} and {b} overlapped"
        ));
    }
    for (order, token, fence) in &audit.stale_accepted {
        violations.push(format!(
            "order {order}: stale token {token} accepted after {fence}"
        ));
    }
    for id in &lost {
        violations.push(format!("job {id} lost: neither done nor dead-lettered"));
    }
    if st.pending + st.depth + st.delayed > 0 {
        violations.push(format!("queue not empty: {st:?}"));
    }
    for key in &keys_left {
        violations.push(format!("lock key left: {key}"));
    }
    if hostile_dead < hostile_since_wipe {
        violations.push(format!(
            "{hostile_since_wipe} hostile entries written since the last wipe, only \
             {hostile_dead} dead-lettered"
        ));
    }
    let wipes = injected.get(&Fault::WipeQueue).copied().unwrap_or(0);
    let reported = metrics
        .get("queue data lost (wiped)")
        .copied()
        .unwrap_or(0.0);
    println!("queue wipes: {wipes}, reported by the runners {reported:.0} times");

    println!(
        "\n== chaos report (seed {seed}, fencing {})",
        if args.no_fencing { "OFF" } else { "on" }
    );
    println!("faults injected:");
    for (fault, n) in &injected {
        println!("  {fault:?}: {n}");
    }
    println!(
        "jobs: {} enqueued, {} done, {} dead-lettered; {:.0} jobs/s over {:.1}s",
        ids.len(),
        done.len(),
        dead.len(),
        ids.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    for (name, v) in &metrics {
        println!("  runner counter {name}: {v:.0}");
    }
    println!(
        "ledger: {} orders, {} paid, {} charged, {} stale writes rejected, {} gateway failures",
        audit.orders,
        audit.paid,
        audit.charged,
        audit.stale_rejected,
        attempts
            .iter()
            .filter(|a| a.outcome == Outcome::GatewayFailed)
            .count()
    );
    for d in dead.iter().take(5) {
        println!("  dead letter: {}", d.reason);
    }
    println!(
        "violations: {} ({} unpaid, {} double-charged, {} overlapping holders, {} stale writes accepted, {} jobs lost, {} lock keys left)",
        violations.len(),
        unpaid,
        audit.double_charged.len(),
        audit.overlapping.len(),
        audit.stale_accepted.len(),
        lost.len(),
        keys_left.len()
    );
    for v in violations.iter().take(20) {
        println!("  {v}");
    }
    if violations.len() > 20 {
        println!("  ... and {} more", violations.len() - 20);
    }
    if violations.is_empty() {
        let _ = std::fs::remove_dir_all(&copy);
    } else {
        // What a failed run leaves to read: the ledger's attempt log and each runner's log.
        for name in RUNNERS {
            if let Ok(out) = Command::new("docker").args(["logs", name]).output() {
                let mut log = out.stdout;
                log.extend_from_slice(&out.stderr);
                let _ = std::fs::write(copy.join(format!("{name}.log")), log);
            }
        }
        println!(
            "the ledger copy and the runners' logs are kept in {}",
            copy.display()
        );
    }
    if !args.keep {
        lab(&root, &["down"], args.no_fencing, args.gateway_latency_ms);
    }
    std::process::exit(if violations.is_empty() { 0 } else { 1 });
}

/// After a wipe: every job sent so far is enqueued again (once the queue answers), and
/// the copy's id replaces the original's, so the checker follows the copy.
async fn send_again(queue: Queue, ids: Arc<Mutex<Vec<(String, NewJob)>>>) {
    let sent: Vec<NewJob> = ids.lock().unwrap().iter().map(|(_, j)| j.clone()).collect();
    for (start, batch) in (0..sent.len())
        .step_by(50)
        .map(|i| (i, &sent[i..(i + 50).min(sent.len())]))
    {
        let new = loop {
            match queue.enqueue_many(batch).await {
                Ok(new) => break new,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut ids = ids.lock().unwrap();
        for (i, id) in new.into_iter().enumerate() {
            ids[start + i].0 = id;
        }
    }
}

async fn run_steps(steps: Vec<(Duration, Vec<&'static str>)>) {
    for (wait, args) in steps {
        tokio::time::sleep(wait).await;
        tokio::task::spawn_blocking(move || docker(&args))
            .await
            .expect("docker step");
    }
}
