//! The `job-runner` binary: each subcommand against real Redis, `/metrics` and
//! `/healthz`, JSON logs, and a clean exit on SIGTERM. Without Redis: `cli_config`.

use fencelock_test_support as support;

use std::process::{Command, Output};
use std::time::Duration;

use job_runner::ledger::Ledger;
use support::binary::{http_get, out};
use support::{Cluster, free_port, temp_path, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

/// The binary with a clean environment of `JOB_RUNNER_*` settings.
fn job_runner(cluster_urls: &[String]) -> Command {
    support::binary::job_runner(BIN, cluster_urls)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run job-runner")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcommands_against_real_redis() {
    let cluster = Cluster::start(4).await;
    let urls = cluster.urls();
    let ledger = temp_path("cli-ledger");

    // enqueue: three payments for one order, one malformed payload, one unknown kind.
    let o = run(job_runner(&urls).args([
        "enqueue",
        "payment",
        "--resource",
        "order:42",
        "--count",
        "3",
        "--payload",
        r#"{"order_id":42,"amount_cents":1999}"#,
    ]));
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        3,
        "one id per job"
    );
    let o = run(job_runner(&urls).args([
        "enqueue",
        "payment",
        "--resource",
        "order:1",
        "--payload",
        "{",
    ]));
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--payload is not JSON"));
    let o = run(job_runner(&urls).args(["enqueue", "mystery", "--resource", "x"]));
    assert!(o.status.success(), "{}", out(&o));

    let o = run(job_runner(&urls).arg("info"));
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(info.contains("depth     4"), "{}", out(&o));
    assert_eq!(info.matches(": up, ").count(), 3, "{info}");

    // run --once drains the queue; /metrics and /healthz answer meanwhile.
    let port = free_port();
    let mut child = tokio::process::Command::from({
        let mut c = job_runner(&urls);
        c.args([
            "run",
            "--once",
            "-c",
            "4",
            "--gateway-latency-ms",
            "300",
            "--metrics-addr",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ledger")
        .arg(&ledger);
        c
    })
    .spawn()
    .unwrap();
    wait_until("/healthz", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let (status, body) = http_get(port, "/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let audit = Ledger::open(&ledger).unwrap().audit().unwrap();
    assert_eq!(
        (audit.paid, audit.charged, audit.violations()),
        (1, 1, 0),
        "{audit}"
    );

    let o = run(job_runner(&urls).arg("info"));
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        info.contains("depth     0")
            && info.contains("pending   0")
            && info.contains("dead      1"),
        "{info}"
    );

    // dead list shows the reason; dead retry --all puts it back.
    let o = run(job_runner(&urls).args(["dead", "list"]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("unknown kind `mystery`"),
        "{}",
        out(&o)
    );
    let o = run(job_runner(&urls).args(["dead", "retry", "--all"]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("retried 1 dead letters"),
        "{}",
        out(&o)
    );
    let o = run(job_runner(&urls).args(["dead", "retry", "0-1"]));
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let o = run(job_runner(&urls).arg("info"));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("depth     1"),
        "{}",
        out(&o)
    );

    // SIGTERM: a runner with jobs in flight finishes them and exits 0.
    let o = run(job_runner(&urls).args([
        "enqueue",
        "payment",
        "--resource",
        "order:43",
        "--payload",
        r#"{"order_id":43,"amount_cents":5}"#,
    ]));
    assert!(o.status.success());
    let port = free_port();
    let mut child = tokio::process::Command::from({
        let mut c = job_runner(&urls);
        c.args([
            "run",
            "--gateway-latency-ms",
            "1500",
            "--exec",
            "mystery=true",
            "--metrics-addr",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ledger")
        .arg(&ledger);
        c
    })
    .spawn()
    .unwrap();
    let db = Ledger::open(&ledger).unwrap();
    wait_until("order 43 to begin", Duration::from_secs(10), || async {
        db.order(43).unwrap().is_some()
    })
    .await;
    // The job `dead retry --all` put back has run by now: every family has a series.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = http_get(port, "/metrics").await.unwrap().1;
        if metrics.contains(r#"job_runner_jobs_total{kind="mystery",outcome="done"} 1"#) {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retried job never showed in /metrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for series in [
        r#"job_runner_lock_acquire_total{outcome="acquired"}"#,
        "job_runner_lock_acquire_seconds_bucket",
        r#"job_runner_job_duration_seconds_bucket{kind="mystery""#,
        "job_runner_lock_extensions_failed_total 0",
        "job_runner_locks_lost_total 0",
        "job_runner_reclaimed_total 0",
        "job_runner_jobs_in_flight",
        "job_runner_queue_depth",
        "job_runner_queue_pending",
        "job_runner_queue_delayed",
        "job_runner_queue_dead",
    ] {
        assert!(
            metrics.contains(series),
            "no `{series}` in /metrics:\n{metrics}"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        db.order(43).unwrap().unwrap().paid,
        "the in-flight job finished"
    );
    let o = run(job_runner(&urls).arg("info"));
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        info.contains("pending   0") && info.contains("dead      0"),
        "{info}"
    );

    cluster
        .assert_no_keys_on(&[0, 1, 2], Duration::from_secs(2))
        .await;
    let _ = std::fs::remove_file(&ledger);
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_all_pages_past_entries_that_are_not_jobs() {
    use redis::AsyncCommands;
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    // More entries that are not jobs than one page holds, then two real jobs.
    for i in 0..130 {
        let _: String = conn
            .xadd(
                "jobs:dead",
                "*",
                &[("job", format!("junk {i}")), ("reason", "x".into())],
            )
            .await
            .unwrap();
    }
    for order in [1, 2] {
        let job = serde_json::json!({
            "id": format!("job-{order}"), "kind": "payment", "resource": format!("order:{order}"),
            "payload": {"order_id": order, "amount_cents": 5}, "attempt": 4, "enqueued_at_ms": 1
        });
        let _: String = conn
            .xadd(
                "jobs:dead",
                "*",
                &[("job", job.to_string()), ("reason", "gave up".into())],
            )
            .await
            .unwrap();
    }
    let o = run(job_runner(&urls).args(["dead", "retry", "--all"]));
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("retried 2 dead letters; 130 left in place (not jobs)"),
        "{}",
        out(&o)
    );
    let o = run(job_runner(&urls).arg("info"));
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        info.contains("depth     2") && info.contains("dead      130"),
        "{info}"
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_job_fields_on_every_job_line() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let o =
        run(job_runner(&urls).args(["enqueue", "noop", "--resource", "r:json", "--count", "2"]));
    assert!(o.status.success(), "{}", out(&o));
    let o = run(job_runner(&urls)
        .args([
            "run",
            "--once",
            "--metrics-addr",
            "off",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info"));
    assert!(o.status.success(), "{}", out(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let finished: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "job finished")
        .collect();
    assert_eq!(finished.len(), 2, "{lines:#?}");
    for line in finished {
        let span = &line["span"];
        assert_eq!(span["kind"], "noop", "{line}");
        assert_eq!(span["resource"], "r:json", "{line}");
        assert_eq!(span["attempt"], 0, "{line}");
        assert!(
            span["id"]
                .as_str()
                .is_some_and(|id| id.len() == 36 && id.as_bytes()[14] == b'7'),
            "{line}"
        );
        assert!(span["token"].as_u64().is_some_and(|t| t >= 1), "{line}");
        assert_eq!(line["outcome"], "done", "{line}");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    }
    cluster.teardown().await;
}

/// A runner of other kinds opens no ledger; a payment job opens it in the state
/// directory, never in the working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_is_opened_by_the_first_payment_job_in_the_state_directory() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let home = temp_path("home").with_extension("d");
    let cwd = home.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let ledger = home.join("state/job-runner/ledger.db");
    let runner = || {
        let mut c = job_runner(&urls);
        c.current_dir(&cwd)
            .env("HOME", &home)
            .env("XDG_STATE_HOME", home.join("state"))
            .env("JOB_RUNNER_QUEUE_NAME", "lazy")
            .args(["--metrics-addr", "off"]);
        c
    };
    let enqueue = |kind: &str, resource: &str, payload: &str| {
        let o = run(runner().args([
            "enqueue",
            kind,
            "--resource",
            resource,
            "--payload",
            payload,
        ]));
        assert!(o.status.success(), "{}", out(&o));
    };
    enqueue("noop", "n:1", "{}");
    let o = run(runner().args(["run", "--once"]));
    assert!(o.status.success(), "{}", out(&o));
    let files = |dir: &std::path::Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    assert_eq!(files(&cwd), 0, "nothing in the working directory");
    assert!(!ledger.exists(), "no payment job, no ledger");

    enqueue("payment", "order:1", r#"{"order_id":1,"amount_cents":100}"#);
    let o = run(runner().args(["run", "--once"]));
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(files(&cwd), 0, "still nothing in the working directory");
    let orders = Ledger::open(&ledger).unwrap().orders().unwrap();
    assert_eq!(orders.len(), 1, "the payment job's ledger: {orders:?}");
    let _ = std::fs::remove_dir_all(&home);
    cluster.teardown().await;
}
