//! `job-runner run --once` exits as soon as the queue is drained, having done every job.

use fencelock_test_support as support;

use std::time::{SystemTime, UNIX_EPOCH};

use support::Cluster;
use support::binary::out;

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp (`...T03:46:18.195Z`).
fn time_of_day(timestamp: &str) -> f64 {
    let time = timestamp
        .split_once('T')
        .and_then(|(_, t)| t.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("not an RFC 3339 UTC timestamp: {timestamp}"));
    let mut parts = time.split(':').map(|p| p.parse::<f64>().unwrap());
    let (h, m, s) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    h * 3600.0 + m * 60.0 + s
}

/// The time of day of the last "job finished" line with `outcome` in JSON logs, and how
/// many such lines there are.
fn last_finished(stderr: &str, outcome: &str) -> (f64, usize) {
    let finished: Vec<f64> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "job finished" && l["outcome"] == outcome)
        .map(|l| time_of_day(l["timestamp"].as_str().unwrap()))
        .collect();
    (
        finished.iter().copied().fold(f64::MIN, f64::max),
        finished.len(),
    )
}

/// A job that asks to be retried (exit 75) goes to the delayed set: `--once` waits for it
/// to come back and run rather than leaving it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_waits_for_a_delayed_retry() {
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls();
    let marker = support::temp_path("flaky");
    let job_runner = || {
        let mut c = support::binary::job_runner(BIN, &urls);
        c.args(["--metrics-addr", "off"]);
        c
    };
    let o = job_runner()
        .args(["enqueue", "flaky", "--resource", "r:flaky"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let flaky = format!(
        "flaky=sh -c 'test -f {0} || {{ touch {0}; exit 75; }}'",
        marker.display()
    );
    let o = job_runner()
        .args(["run", "--once", "--log-format", "json", "--exec", &flaky])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(last_finished(&stderr, "retried").1, 1, "{}", out(&o));
    assert_eq!(last_finished(&stderr, "done").1, 1, "{}", out(&o));
    let o = job_runner().arg("info").output().unwrap();
    let info = String::from_utf8_lossy(&o.stdout);
    for line in ["depth     0", "pending   0", "delayed   0", "dead      0"] {
        assert!(info.contains(line), "{}", out(&o));
    }
    let _ = std::fs::remove_file(&marker);
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_exits_promptly_after_the_last_job() {
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls();
    let job_runner = || {
        let mut c = support::binary::job_runner(BIN, &urls);
        c.args(["--metrics-addr", "off"]);
        c
    };
    let o = job_runner()
        .args(["enqueue", "noop", "--resource", "r:once", "--count", "20"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));

    let o = job_runner()
        .args(["run", "--once", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let exited = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let (last, done) = last_finished(&stderr, "done");
    assert_eq!(done, 20, "every job done:\n{}", out(&o));
    let exited = (exited.as_secs() % 86_400) as f64 + f64::from(exited.subsec_nanos()) * 1e-9;
    // Midnight may fall between the last job and the exit.
    let after_last = (exited - last).rem_euclid(86_400.0);
    eprintln!("run --once exited {after_last:.3} s after its last job");
    // Noticing the drained queue takes one empty fetch and one count of the queue, a few
    // milliseconds; the process then exits. Polling for an empty queue instead costs a
    // fixed wait of at least 300 ms (three empty 100 ms fetches), so a bound of 250 ms
    // catches that while leaving a busy machine ample time for the exit.
    assert!(
        after_last < 0.25,
        "run --once exited {after_last:.3} s after its last job\n{}",
        out(&o)
    );

    let o = job_runner().arg("info").output().unwrap();
    let info = String::from_utf8_lossy(&o.stdout);
    for line in ["depth     0", "pending   0", "delayed   0", "dead      0"] {
        assert!(info.contains(line), "{}", out(&o));
    }
    cluster.teardown().await;
}
