//! Runner throughput on real nodes, against the raw Redis Streams baseline measured on the
//! same queue node in the same run.
//!
//! Run with `cargo bench -p job-runner --features payment-demo --bench runner` (needs Docker and the `redis:7.0`
//! image from `scripts/redis-image.sh`). It starts 5 lock nodes and a queue node, makes one
//! untimed warm-up pass, and then for every scenario makes `RUNS` runs, each right after a
//! baseline run of its own, and prints the medians as a table:
//!
//! - **baseline**: `XADD` the jobs (pipelined), then one consumer drains them with `XREADGROUP`
//!   (`COUNT 64`) and one `XACK` per entry, 64 at once, with no lock: the floor any Streams
//!   job queue pays.
//! - **noop** and **payment** jobs through the whole path (lock on 5 nodes with a fencing
//!   token, auto-extension, handler, release, ack), with 1 and 3 `job-runner run`
//!   processes at `-c 64` (and one at `-c 128`), started and idle before the jobs are enqueued; timed from the
//!   first `XADD` to an empty queue with nothing pending. Payment jobs pay 2 000 orders in a SQLite ledger, two jobs per
//!   order.
//! - **one lock node down**: the noop row at `-c 64` with the fifth lock node a closed
//!   port, set against the all-up row run by run (`BENCH_ONLY=noop:1:64,noop:1:64:down`).
//! - **peak RSS** of one runner process with 64 payment jobs in flight.
//! - **queue memory**: the queue node's `used_memory` before and after one runner (`-c 64`)
//!   drains 100 000 no-op jobs (`BENCH_MEMORY_JOBS`): retired entries are deleted, so it
//!   should end where it began.
//! - **lock-node memory** (`BENCH_ONLY=fence`): the lock nodes' keys and `used_memory`
//!   before one runner pays `BENCH_JOBS / 2` orders with a 2 s fence window, right after,
//!   and once the window has passed: what fencing keeps must not grow with the orders
//!   paid.

use fencelock_test_support as support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use job_runner::{NewJob, Queue};
use serde_json::json;
use support::{Cluster, temp_path};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");
const RUNS: usize = 3;
/// Jobs per run: 10 000, or `BENCH_JOBS`.
fn jobs_per_run() -> usize {
    std::env::var("BENCH_JOBS").map_or(10_000, |v| v.parse().expect("BENCH_JOBS"))
}

/// One scenario of the table, and what its runs measured.
struct Row {
    kind: &'static str,
    processes: usize,
    concurrency: usize,
    /// Lock nodes replaced by a closed port (of 5).
    down: usize,
    rates: Vec<f64>,
    /// Each run's rate over the baseline measured just before it.
    ratios: Vec<f64>,
}

/// A port at which nothing listens: bound and let go at once.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    listener.local_addr().expect("its address").port()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn jobs(kind: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| match kind {
            "payment" => {
                let order = (i / 2) as i64;
                NewJob::new(
                    "payment",
                    format!("order:{order}"),
                    json!({"order_id": order, "amount_cents": 100}),
                )
            }
            _ => NewJob::new("noop", format!("r:{i}"), json!({})),
        })
        .collect()
}

async fn fill(queue: &Queue, kind: &str, n: usize) {
    for chunk in jobs(kind, n).chunks(1000) {
        queue.enqueue_many(chunk).await.unwrap();
    }
}

async fn flush(url: &str) {
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
}

/// XREADGROUP + XACK with no lock: jobs per second.
async fn baseline(queue_url: &str) -> f64 {
    flush(queue_url).await;
    let queue = Queue::connect(queue_url, "base", "c").await.unwrap();
    let started = Instant::now();
    fill(&queue, "noop", jobs_per_run()).await;
    let mut conn = redis::Client::open(queue_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut done = 0;
    while done < jobs_per_run() {
        let got = queue.fetch(64, Duration::from_millis(100)).await.unwrap();
        done += got.len();
        join_all(got.iter().map(|d| {
            let mut c = conn.clone();
            let id = d.entry_id.clone();
            async move {
                let _: u64 = redis::cmd("XACK")
                    .arg("base:jobs")
                    .arg("base-workers")
                    .arg(id)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        }))
        .await;
        let _ = &mut conn;
    }
    let rate = jobs_per_run() as f64 / started.elapsed().as_secs_f64();
    eprintln!("baseline: {rate:.0} jobs/s");
    rate
}

fn runner(
    urls: &[String],
    down: usize,
    ledger: &Path,
    name: &str,
    concurrency: usize,
    extra: &[&str],
) -> tokio::process::Command {
    let mut nodes = urls[..5].to_vec();
    for node in nodes.iter_mut().rev().take(down) {
        *node = format!("redis://127.0.0.1:{}", closed_port());
    }
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env("JOB_RUNNER_LOCK_NODES", nodes.join(","))
        .env("JOB_RUNNER_QUEUE", &urls[5])
        .env("RUST_LOG", "error")
        .args([
            "run",
            "-c",
            &concurrency.to_string(),
            "--metrics-addr",
            "off",
            "--consumer",
            name,
            "--ledger",
        ])
        .arg(ledger)
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Waits until `queue` is empty with nothing pending or delayed, polling every `poll`;
/// panics, naming `what`, after `within`.
async fn drained(queue: &Queue, within: Duration, poll: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let st = queue.stats().await.unwrap();
        if st.depth == 0 && st.pending == 0 && st.delayed == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not drained: {st:?}");
        tokio::time::sleep(poll).await;
    }
}

/// Stops a runner as an operator would, with SIGTERM, and waits for it.
async fn stop(mut child: tokio::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().await.unwrap();
}

/// `processes` runners, started and idle, drain `jobs_per_run()` jobs of `kind` enqueued at once:
/// jobs per second from the first `XADD` to the queue being empty with nothing pending.
async fn full_path(
    urls: &[String],
    kind: &str,
    processes: usize,
    concurrency: usize,
    down: usize,
) -> f64 {
    flush(&urls[5]).await;
    let ledger = temp_path("bench-ledger");
    let queue = Queue::connect(&urls[5], "jobs", "bench").await.unwrap();
    let mut children: Vec<_> = (0..processes)
        .map(|i| {
            runner(urls, down, &ledger, &format!("bench-{i}"), concurrency, &[])
                .spawn()
                .unwrap()
        })
        .collect();
    // Let every runner connect and block on its first fetch. (An empty read does not
    // register a consumer with the group, so there is nothing to poll for.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    fill(&queue, kind, jobs_per_run()).await;
    drained(
        &queue,
        Duration::from_secs(120),
        Duration::from_millis(2),
        &format!("{kind} x{processes} -c {concurrency}"),
    )
    .await;
    let rate = jobs_per_run() as f64 / started.elapsed().as_secs_f64();
    eprintln!("{kind} x{processes} -c {concurrency}, {down} lock nodes down: {rate:.0} jobs/s");
    for child in &children {
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }
    for child in &mut children {
        let status = child.wait().await.unwrap();
        assert!(status.success(), "runner exited with {status}");
    }
    let st = queue.stats().await.unwrap();
    assert_eq!((st.depth, st.pending, st.dead), (0, 0, 0), "{st:?}");
    if kind == "payment" {
        let audit = job_runner::ledger::Ledger::open(&ledger)
            .unwrap()
            .audit()
            .unwrap();
        assert_eq!(audit.violations(), 0, "{audit:?}");
        assert_eq!(audit.charged, jobs_per_run() / 2, "{audit}");
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ledger.display()));
    }
    rate
}

/// The queue node's `used_memory` in bytes.
async fn used_memory(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO")
}

/// The queue node's `used_memory` (KiB) with an idle runner connected, and after it
/// drained `n` no-op jobs.
async fn queue_memory(urls: &[String], n: usize) -> (f64, f64) {
    flush(&urls[5]).await;
    let ledger = temp_path("bench-ledger");
    let queue = Queue::connect(&urls[5], "jobs", "bench").await.unwrap();
    let child = runner(urls, 0, &ledger, "bench-mem", 64, &[])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = used_memory(&urls[5]).await;
    fill(&queue, "noop", n).await;
    drained(
        &queue,
        Duration::from_secs(600),
        Duration::from_millis(20),
        "queue memory",
    )
    .await;
    let after = used_memory(&urls[5]).await;
    stop(child).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ledger.display()));
    }
    (before as f64 / 1024.0, after as f64 / 1024.0)
}

/// The fence window of the lock-node memory run: short, so that the bench waits it out.
const FENCE_WINDOW: Duration = Duration::from_secs(2);

/// What the lock nodes hold (medians over the five: keys, `used_memory` in KiB) with an
/// idle runner connected, right after it paid `jobs_per_run() / 2` orders with a fence
/// window of [`FENCE_WINDOW`], and once that window has passed: fencing must leave the
/// nodes as they were.
async fn lock_memory(cluster: &Cluster, urls: &[String]) -> [(f64, f64); 3] {
    let snapshot = || async {
        let mut keys = Vec::new();
        let mut kib = Vec::new();
        for i in 0..5 {
            keys.push(cluster.dbsize(i).await as f64);
            kib.push(cluster.used_memory(i).await as f64 / 1024.0);
        }
        (median(keys), median(kib))
    };
    flush(&urls[5]).await;
    let ledger = temp_path("bench-ledger");
    let queue = Queue::connect(&urls[5], "jobs", "bench").await.unwrap();
    let window = FENCE_WINDOW.as_millis().to_string();
    let child = runner(
        urls,
        0,
        &ledger,
        "bench-fence",
        64,
        &["--lock-fence-window-ms", &window],
    )
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = snapshot().await;
    fill(&queue, "payment", jobs_per_run()).await;
    drained(
        &queue,
        Duration::from_secs(120),
        Duration::from_millis(20),
        "lock memory",
    )
    .await;
    let after = snapshot().await;
    stop(child).await;
    // The window runs from each counter's last write; the release that ended the last job
    // wrote none.
    tokio::time::sleep(FENCE_WINDOW + Duration::from_secs(1)).await;
    let later = snapshot().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ledger.display()));
    }
    [before, after, later]
}

/// Peak RSS (VmHWM) in MiB of one runner with 64 slow payment jobs in flight.
async fn peak_rss(urls: &[String]) -> f64 {
    flush(&urls[5]).await;
    let ledger = temp_path("bench-rss");
    let queue = Queue::connect(&urls[5], "jobs", "bench").await.unwrap();
    fill(&queue, "payment", 640).await;
    let mut child = runner(
        urls,
        0,
        &ledger,
        "rss",
        64,
        &["--once", "--gateway-latency-ms", "400"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let status = format!("/proc/{}/status", child.id().unwrap());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    let kib: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                    peak_kib = peak_kib.max(kib);
                }
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&ledger);
    peak_kib as f64 / 1024.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cluster = Cluster::start(6).await;
    let urls = cluster.urls();
    // (kind, processes, jobs each runs at once): the baseline runs 64 at once too; a
    // locked job takes longer, so more of them in flight keep the nodes as busy.
    // The last row is the first with one lock node a closed port: what a dead minority
    // costs (target: at least 0.8x of the first row, run by run).
    let mut rows: Vec<Row> = [
        ("noop", 1, 64, 0),
        ("noop", 1, 128, 0),
        ("noop", 3, 64, 0),
        ("payment", 1, 64, 0),
        ("payment", 3, 64, 0),
        ("noop", 1, 64, 1),
    ]
    .into_iter()
    .map(|(kind, processes, concurrency, down)| Row {
        kind,
        processes,
        concurrency,
        down,
        rates: Vec::new(),
        ratios: Vec::new(),
    })
    .collect();
    // `BENCH_ONLY=noop:1:64,rss` limits the scenarios, e.g. for profiling one of them.
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        rows.retain(|r| {
            only.split(',').any(|o| {
                o.trim() == format!("{}:{}:{}", r.kind, r.processes, r.concurrency)
                    || o.trim() == format!("{}:{}:{}:down", r.kind, r.processes, r.concurrency)
                        && r.down > 0
            })
        });
    }
    // First, while no counter of the other rows (5-minute window) is on the lock nodes.
    let fence_memory = match std::env::var("BENCH_ONLY") {
        Ok(only) if !only.split(',').any(|o| o.trim() == "fence") => None,
        _ => Some(lock_memory(&cluster, &urls).await),
    };
    // One untimed pass first: the first runs after the containers start are slower for
    // the baseline and the runner alike, and would only widen the spread.
    eprintln!("warm-up");
    baseline(&urls[5]).await;
    full_path(&urls, "noop", 1, 64, 0).await;
    // The machine's speed drifts from minute to minute (the baseline alone moves by a
    // third), so each measurement is paired with a baseline taken just before it, and a
    // row's ratio is the median of its runs' ratios.
    let mut base = Vec::new();
    for run in 1..=RUNS {
        eprintln!("run {run}/{RUNS}");
        for row in rows.iter_mut() {
            let b = baseline(&urls[5]).await;
            let rate = full_path(&urls, row.kind, row.processes, row.concurrency, row.down).await;
            base.push(b);
            row.rates.push(rate);
            row.ratios.push(rate / b);
        }
    }
    // With `BENCH_ONLY`, peak RSS is measured only when it lists `rss`.
    let rss = match std::env::var("BENCH_ONLY") {
        Ok(only) if !only.split(',').any(|o| o.trim() == "rss") => None,
        _ => Some(peak_rss(&urls).await),
    };
    let memory_jobs = std::env::var("BENCH_MEMORY_JOBS")
        .map_or(100_000, |v| v.parse().expect("BENCH_MEMORY_JOBS"));
    let memory = match std::env::var("BENCH_ONLY") {
        Ok(only) if !only.split(',').any(|o| o.trim() == "memory") => None,
        _ => Some(queue_memory(&urls, memory_jobs).await),
    };
    println!(
        "\n{} jobs per run, medians of {RUNS} runs; 5 lock nodes, fencing on; each run of a row \
         is paired with a baseline run just before it\n",
        jobs_per_run()
    );
    println!(
        "| path | processes | jobs at once per process | lock nodes down | jobs/s | × raw Streams baseline (median of paired runs) | × all up (same runs) |"
    );
    println!("|---|---|---|---|---|---|---|");
    if !base.is_empty() {
        let base = median(base);
        println!("| raw XREADGROUP + XACK, no lock | 1 | 64 | - | {base:.0} | 1.00 | |");
    }
    for row in &rows {
        // The same path with every lock node up, run by run.
        let versus = rows
            .iter()
            .find(|r| {
                r.down == 0
                    && (r.kind, r.processes, r.concurrency)
                        == (row.kind, row.processes, row.concurrency)
            })
            .filter(|_| row.down > 0)
            .map(|up| {
                let ratios = row.rates.iter().zip(&up.rates).map(|(d, u)| d / u);
                format!("{:.2} (>= 0.8)", median(ratios.collect()))
            })
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {versus} |",
            row.kind,
            row.processes,
            row.concurrency,
            row.down,
            median(row.rates.clone()),
            median(row.ratios.clone())
        );
    }
    if let Some(rss) = rss {
        println!("\npeak RSS of one runner with 64 payment jobs in flight: {rss:.1} MiB");
    }
    if let Some((before, after)) = memory {
        println!(
            "\nqueue node used_memory: {before:.0} KiB with a runner connected, {after:.0} KiB \
             after it drained {memory_jobs} no-op jobs ({:+.0} KiB)",
            after - before
        );
    }
    if let Some([(k0, m0), (k1, m1), (k2, m2)]) = fence_memory {
        println!(
            "\nlock nodes (medians over 5) around {} payment jobs on {} orders, fence window \
             {} ms: keys {k0:.0} before, {k1:.0} after the run, {k2:.0} after the window; \
             used_memory {m0:.0} KiB, {m1:.0} KiB, {m2:.0} KiB ({:+.0} KiB)",
            jobs_per_run(),
            jobs_per_run() / 2,
            FENCE_WINDOW.as_millis(),
            m2 - m0
        );
    }
    cluster.teardown().await;
}
