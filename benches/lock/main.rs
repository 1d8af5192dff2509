//! Lock throughput and latency on real nodes, against raw `redis-benchmark` on the same
//! nodes in the same run.
//!
//! Run with `cargo bench --bench lock` (needs Docker, the `redis:7.0` image from
//! `scripts/redis-image.sh`; `redis-benchmark` runs from the host, or else from that image). It starts
//! its own nodes, makes an untimed warm-up pass and then 3 runs of every scenario, each
//! node count's phases right after a raw baseline of their own, and prints medians as a table.
//! `BENCH_RUNS=n` makes n runs instead, for a steadier median on a noisy machine.
//!
//! Contention is measured three ways: 16 tasks on one unfenced client (the headline: local
//! hand-offs, most without a round), the same on a fenced client (each holder gets its own
//! token: hand-offs without a round use tokens reserved by the last round), and 16 clients
//! of one task each, which is what 16 processes would see.
//!
//! The fault rows (`faults.rs`) show what a failed minority of nodes costs, and are drawn
//! to `docs/lock-faults.svg`. Fencing is set against the same run's unfenced figures: the
//! sequential cycle and 64 tasks on distinct resources, each on a fenced client. A last row
//! (`memory.rs`) locks 100 000 distinct fenced resources and shows the nodes' keys and
//! `used_memory` before, right after, and once the fence window has passed.
//! `BENCH_PART=sizes` or `BENCH_PART=faults` runs one part only.

#[path = "../../tests/support/mod.rs"]
mod support;

mod chart;
mod faults;
mod memory;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fencelock::Redlock;
use support::Cluster;

/// Runs unless `BENCH_RUNS` says otherwise: the targets are medians of 3.
const RUNS: usize = 3;
const PHASE: Duration = Duration::from_secs(2);
const TTL: Duration = Duration::from_secs(30);

#[derive(Default, Clone, Copy)]
struct Row {
    seq_rate: f64,
    lat: Latency,
    par_rate: f64,
    cont_rate: f64,
    cont_gave_up: f64,
    /// The same 16 tasks on a fenced client: each holder needs its own token.
    cont_fenced_rate: f64,
    /// 16 tasks with a client each, as 16 processes would be: no local queue, every
    /// acquisition through Redis, retries after the default delay.
    cont_apart_rate: f64,
    cont_apart_gave_up: f64,
    fenced_seq_rate: f64,
    /// 64 tasks on distinct resources, on the fenced client.
    fenced_par_rate: f64,
    /// `redis-benchmark` at `-c 1` and `-c 50`, measured just before this row's phases.
    raw1: f64,
    raw50: f64,
}

/// Acquire and release latency of one sequential phase, in microseconds.
#[derive(Default, Clone, Copy)]
struct Latency {
    acq_p50: f64,
    acq_p99: f64,
    rel_p50: f64,
    rel_p99: f64,
}

impl Latency {
    /// From the phase's sorted acquire and release times.
    fn of(acq: &[Duration], rel: &[Duration]) -> Self {
        Latency {
            acq_p50: percentile(acq, 0.5),
            acq_p99: percentile(acq, 0.99),
            rel_p50: percentile(rel, 0.5),
            rel_p99: percentile(rel, 0.99),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn client(urls: &[String], fencing: bool) -> Redlock {
    Redlock::builder()
        .nodes(urls.iter().cloned())
        .node_timeout(Duration::from_millis(250))
        .fencing(fencing)
        // The warm-up's client on all five nodes initialises them as a new cluster, so the
        // 1- and 3-node clients find their nodes seeded, with nothing to wait out.
        .restart_quarantine(TTL)
        .build()
        .await
        .expect("client")
}

async fn sequential(locks: &Redlock) -> (f64, Vec<Duration>, Vec<Duration>) {
    let (mut acq, mut rel) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while start.elapsed() < PHASE {
        let t0 = Instant::now();
        let guard = locks.lock("bench:seq", TTL).await.expect("lock");
        let t1 = Instant::now();
        guard.release().await.expect("release");
        acq.push(t1 - t0);
        rel.push(t1.elapsed());
    }
    let rate = acq.len() as f64 / start.elapsed().as_secs_f64();
    acq.sort();
    rel.sort();
    (rate, acq, rel)
}

async fn parallel(locks: &Redlock, tasks: usize) -> f64 {
    let cycles = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (locks, cycles) = (locks.clone(), cycles.clone());
            tokio::spawn(async move {
                let resource = format!("bench:par:{t}");
                while start.elapsed() < PHASE {
                    let guard = locks.lock(&resource, TTL).await.expect("lock");
                    guard.release().await.expect("release");
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    cycles.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// 16 tasks on one resource, with the default retry policy: critical sections per second
/// and lock calls that gave up. Task `t` uses `clients[t % clients.len()]`.
async fn contention(clients: &[Redlock], tasks: usize) -> (f64, f64) {
    let sections = Arc::new(AtomicU64::new(0));
    let gave_up = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (locks, sections, gave_up, inside) = (
                clients[t % clients.len()].clone(),
                sections.clone(),
                gave_up.clone(),
                inside.clone(),
            );
            tokio::spawn(async move {
                while start.elapsed() < PHASE {
                    match locks.lock("bench:contended", TTL).await {
                        Ok(guard) => {
                            assert!(!inside.swap(true, Ordering::SeqCst), "two holders");
                            inside.store(false, Ordering::SeqCst);
                            guard.release().await.expect("release");
                            sections.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            gave_up.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    (
        sections.load(Ordering::Relaxed) as f64 / secs,
        gave_up.load(Ordering::Relaxed) as f64,
    )
}

/// `redis-benchmark` `SET k v NX PX 30000` on one node: requests per second.
fn raw_set(port: u16, clients: u32) -> f64 {
    // The host's redis-benchmark if it has one, else the one in the nodes' image, on the
    // host network like the nodes.
    let mut cmd = if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_ok()
    {
        Command::new("redis-benchmark")
    } else {
        let mut docker = Command::new("docker");
        docker.args([
            "run",
            "--rm",
            "--network",
            "host",
            "redis:7.0",
            "redis-benchmark",
        ]);
        docker
    };
    let out = cmd
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-n", "50000", "--csv"])
        .args(["SET", "bench:raw", "v", "NX", "PX", "30000"])
        .output()
        .expect("run redis-benchmark");
    assert!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8_lossy(&out.stdout);
    // "test","rps",...  then  "SET bench:raw ...","12345.67",...
    let line = csv.lines().nth(1).expect("a result line");
    line.split(',')
        .nth(1)
        .expect("an rps column")
        .trim_matches('"')
        .parse()
        .expect("rps")
}

// One thread: on 2 cores shared with 5 redis-servers, cross-thread wake-ups cost more than
// they give (measured: 0.16x sequential on a 2-worker runtime, 0.20x on this one).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let cluster = Cluster::start(5).await;
    let urls = cluster.urls();
    let port: u16 = urls[0].rsplit(':').next().unwrap().parse().unwrap();
    // `BENCH_SIZES=5` limits the node counts, e.g. for profiling one configuration.
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("BENCH_SIZES"))
                .collect()
        })
        .unwrap_or_else(|_| vec![1, 3, 5]);
    let runs: usize = std::env::var("BENCH_RUNS")
        .map(|v| match v.trim().parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("BENCH_RUNS must be a positive number of runs, not {v:?}"),
        })
        .unwrap_or(RUNS);
    let part = std::env::var("BENCH_PART").unwrap_or_default();
    let (do_sizes, do_faults) = match part.as_str() {
        "" | "all" => (true, true),
        "sizes" => (true, false),
        "faults" => (false, true),
        other => panic!("BENCH_PART must be `sizes`, `faults` or `all`, not {other:?}"),
    };
    let sizes = if do_sizes { sizes } else { Vec::new() };
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); sizes.len()];
    let mut fault_rows: Vec<Vec<faults::FaultRow>> = vec![Vec::new(); faults::Fault::ALL.len()];
    // One untimed pass first: the first phases after the containers start run slower.
    eprintln!("warm-up");
    {
        let locks = client(&urls, false).await;
        sequential(&locks).await;
        parallel(&locks, 64).await;
    }
    for run in 0..runs {
        eprintln!("run {}/{runs}", run + 1);
        for (i, &n) in sizes.iter().enumerate() {
            // The machine's speed drifts from minute to minute: measure the baseline right
            // before the phases it is compared with.
            let raw1 = raw_set(port, 1);
            let raw50 = raw_set(port, 50);
            let locks = client(&urls[..n], false).await;
            let (seq_rate, acq, rel) = sequential(&locks).await;
            let fenced = client(&urls[..n], true).await;
            let (fenced_seq_rate, _, _) = sequential(&fenced).await;
            let par_rate = parallel(&locks, 64).await;
            let fenced_par_rate = parallel(&fenced, 64).await;
            let (cont_rate, cont_gave_up) = contention(std::slice::from_ref(&locks), 16).await;
            let (cont_fenced_rate, _) = contention(std::slice::from_ref(&fenced), 16).await;
            let mut apart = Vec::new();
            for _ in 0..16 {
                apart.push(client(&urls[..n], false).await);
            }
            let (cont_apart_rate, cont_apart_gave_up) = contention(&apart, 16).await;
            eprintln!(
                "  {n} nodes: sequential {:.3}x raw -c 1, 64 tasks {:.2}x raw -c 50, contention {:.3}x raw -c 50 (fenced {:.3}x, 16 clients {:.4}x)",
                seq_rate / raw1,
                par_rate / raw50,
                cont_rate / raw50,
                cont_fenced_rate / raw50,
                cont_apart_rate / raw50,
            );
            rows[i].push(Row {
                seq_rate,
                lat: Latency::of(&acq, &rel),
                par_rate,
                cont_rate,
                cont_gave_up,
                cont_fenced_rate,
                cont_apart_rate,
                cont_apart_gave_up,
                fenced_seq_rate,
                fenced_par_rate,
                raw1,
                raw50,
            });
        }
        if do_faults {
            for (i, fault) in faults::Fault::ALL.into_iter().enumerate() {
                let row = faults::measure(&cluster, fault).await;
                eprintln!(
                    "  {}: sequential {:.0}/s, 64 tasks {:.0}/s",
                    fault.label(),
                    row.seq_rate,
                    row.par_rate
                );
                fault_rows[i].push(row);
            }
        }
    }
    // The raw SET of the baseline leaves its key behind; nothing of the lock's should be.
    for i in 0..5 {
        let mut c = cluster.conn(i).await;
        let _: () = redis::cmd("DEL")
            .arg("bench:raw")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // A paused node's keys from before its pause are released when it answers again.
    cluster.assert_no_keys_within(Duration::from_secs(5)).await;
    if do_faults {
        faults::report(&fault_rows);
        let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/lock-faults.svg");
        match chart::draw(&chart, &fault_rows) {
            Ok(()) => println!("\nchart: {}", chart.display()),
            Err(e) => eprintln!("could not draw {}: {e}", chart.display()),
        }
    }
    if sizes.is_empty() {
        cluster.teardown().await;
        return;
    }

    let m = |i: usize, f: fn(&Row) -> f64| median(rows[i].iter().map(f).collect());
    println!(
        "\nfencelock lock benchmark: medians of {runs} runs, {}s per phase, TTL {}s",
        PHASE.as_secs(),
        TTL.as_secs()
    );
    println!(
        "baseline redis-benchmark SET NX PX on node 0: -c 1 {:.0}/s, -c 50 {:.0}/s\n",
        median(rows.iter().flatten().map(|r| r.raw1).collect()),
        median(rows.iter().flatten().map(|r| r.raw50).collect())
    );
    println!(
        "| nodes | seq cycles/s | acquire p50 | acquire p99 | release p50 | release p99 | 64 tasks cycles/s | 16 contending CS/s | gave up | same, fenced | 16 clients CS/s | gave up | fenced seq cycles/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, n) in sizes.iter().enumerate() {
        println!(
            "| {n} | {:.0} | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            m(i, |r| r.seq_rate),
            m(i, |r| r.lat.acq_p50),
            m(i, |r| r.lat.acq_p99),
            m(i, |r| r.lat.rel_p50),
            m(i, |r| r.lat.rel_p99),
            m(i, |r| r.par_rate),
            m(i, |r| r.cont_rate),
            m(i, |r| r.cont_gave_up),
            m(i, |r| r.cont_fenced_rate),
            m(i, |r| r.cont_apart_rate),
            m(i, |r| r.cont_apart_gave_up),
            m(i, |r| r.fenced_seq_rate),
        );
    }
    // Each run's figures are set against the raw figures measured just before them, and
    // the ratios shown are the medians of those per-run ratios.
    let five = sizes.len() - 1;
    let ratio = |f: fn(&Row) -> f64, raw: fn(&Row) -> f64| {
        median(rows[five].iter().map(|r| f(r) / raw(r)).collect())
    };
    println!(
        "\nratios on {} nodes, medians of the per-run ratios against the raw figures measured just before (targets in parentheses):",
        sizes[five]
    );
    println!(
        "  sequential / raw -c 1:      {:.3}x (>= 0.30)",
        ratio(|r| r.seq_rate, |r| r.raw1)
    );
    println!(
        "  release p50 / acquire p50:  {:.2}x (<= 1.1)",
        median(
            rows[five]
                .iter()
                .map(|r| r.lat.rel_p50 / r.lat.acq_p50)
                .collect()
        )
    );
    println!(
        "  64 tasks / raw -c 50:       {:.2}x (>= 0.40)",
        ratio(|r| r.par_rate, |r| r.raw50)
    );
    println!(
        "  contention / raw -c 50:     {:.3}x (>= 0.08), gave up {:.0}",
        ratio(|r| r.cont_rate, |r| r.raw50),
        m(five, |r| r.cont_gave_up)
    );
    println!(
        "    the same on a fenced client: {:.3}x; 16 clients of one task each: {:.4}x, gave up {:.0}",
        ratio(|r| r.cont_fenced_rate, |r| r.raw50),
        ratio(|r| r.cont_apart_rate, |r| r.raw50),
        m(five, |r| r.cont_apart_gave_up)
    );
    println!(
        "  fenced cycle cost / unfenced: {:.2}x (<= 1.3)",
        median(
            rows[five]
                .iter()
                .map(|r| r.seq_rate / r.fenced_seq_rate)
                .collect()
        )
    );
    fenced_rows(&sizes, &rows);
    memory::memory_row(&cluster).await;
    cluster.teardown().await;
}

/// The fenced figures next to the unfenced ones of the same runs: sequential cycles and 64
/// tasks on distinct resources, medians of the per-run ratios.
fn fenced_rows(sizes: &[usize], rows: &[Vec<Row>]) {
    println!("\nfenced / unfenced, medians of the per-run ratios:");
    println!(
        "| nodes | seq cycles/s | fenced | cost (<= 1.3x) | 64 tasks cycles/s | fenced | ratio (>= 0.8x) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, n) in sizes.iter().enumerate() {
        let m = |f: fn(&Row) -> f64| median(rows[i].iter().map(f).collect());
        println!(
            "| {n} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.2}x |",
            m(|r| r.seq_rate),
            m(|r| r.fenced_seq_rate),
            m(|r| r.seq_rate / r.fenced_seq_rate),
            m(|r| r.par_rate),
            m(|r| r.fenced_par_rate),
            m(|r| r.fenced_par_rate / r.par_rate),
        );
    }
}
