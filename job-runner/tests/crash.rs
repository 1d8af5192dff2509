//! A runner killed mid-job (SIGKILL: no shutdown, no release, no ack) is recovered: its
//! locks expire by TTL, another runner reclaims its entries after the visibility timeout,
//! and every order is paid exactly once.

use fencelock_test_support as support;

use std::process::Stdio;
use std::time::Duration;

use job_runner::ledger::Ledger;
use job_runner::{NewJob, Queue};
use serde_json::json;
use support::{Cluster, temp_path, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");
const ORDERS: i64 = 24;

fn runner(
    urls: &[String],
    ledger: &std::path::Path,
    name: &str,
    extra: &[&str],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env("JOB_RUNNER_LOCK_NODES", urls[..3].join(","))
        .env("JOB_RUNNER_QUEUE", &urls[3])
        .env("RUST_LOG", "warn")
        .args([
            "run",
            "--metrics-addr",
            "off",
            "--lock-ttl-ms",
            "1000",
            "--visibility-timeout-ms",
            "2000",
            "-c",
            "8",
        ])
        .args(["--consumer", name, "--ledger"])
        .arg(ledger)
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runners_jobs_are_reclaimed_and_done_once() {
    let cluster = Cluster::start(4).await;
    let urls = cluster.urls();
    let path = temp_path("crash-ledger");
    let queue = Queue::connect(&urls[3], "jobs", "test").await.unwrap();
    let jobs: Vec<NewJob> = (0..ORDERS)
        .flat_map(|o| {
            let job = NewJob::new(
                "payment",
                format!("order:{o}"),
                json!({"order_id": o, "amount_cents": 10}),
            );
            [job.clone(), job]
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();

    // Runner A charges slowly: 8 jobs are mid-flight when it dies.
    let mut a = runner(&urls, &path, "runner-a", &["--gateway-latency-ms", "3000"])
        .spawn()
        .unwrap();
    let ledger = Ledger::open(&path).unwrap();
    wait_until(
        "runner A to be mid-job",
        Duration::from_secs(20),
        || async { ledger.orders().unwrap().len() >= 4 },
    )
    .await;
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    let pending = queue.stats().await.unwrap().pending;
    assert!(pending >= 1, "A died holding jobs: {pending} pending");

    // Runner B picks up everything, A's stalled entries included, and exits when drained.
    let b = runner(&urls, &path, "runner-b", &["--once"])
        .output()
        .await
        .unwrap();
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));

    let st = queue.stats().await.unwrap();
    assert_eq!(
        (st.depth, st.pending, st.delayed, st.dead),
        (0, 0, 0, 0),
        "{st:?}"
    );
    let audit = ledger.audit().unwrap();
    assert_eq!(audit.paid, ORDERS as usize, "{audit}");
    assert_eq!(audit.charged, ORDERS as usize, "{audit}");
    assert_eq!(audit.violations(), 0, "{audit:?}");
    cluster
        .assert_no_keys_on(&[0, 1, 2], Duration::from_secs(2))
        .await;
    let _ = std::fs::remove_file(&path);
    cluster.teardown().await;
}
