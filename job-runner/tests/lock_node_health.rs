//! The binary shows its lock nodes' health: `/metrics` carries an `up` gauge and the
//! transition counters of every lock node, and `info` names the node that does not answer.

use fencelock_test_support as support;

use std::process::Command;
use std::time::Duration;

use support::binary::{http_get, out};
use support::{Cluster, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_lock_node_shows_down_in_metrics_and_info() {
    let cluster = Cluster::start(3).await;
    let nodes = cluster.urls();
    let closed = free_port();
    // Lock nodes: two live ones and a closed port; the queue on the third live node.
    let urls = [
        nodes[0].clone(),
        nodes[1].clone(),
        format!("redis://127.0.0.1:{closed}"),
        nodes[2].clone(),
    ];
    let job_runner = || support::binary::job_runner(BIN, &urls);
    let o = job_runner()
        .args(["enqueue", "noop", "--resource", "health:1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));

    let port = free_port();
    let mut child = tokio::process::Command::from({
        let mut c: Command = job_runner();
        c.args(["run", "--metrics-addr"])
            .arg(format!("127.0.0.1:{port}"));
        c
    })
    .spawn()
    .unwrap();
    let down = format!(r#"job_runner_lock_node_up{{node="127.0.0.1:{closed}"}} 0"#);
    let flipped =
        format!(r#"job_runner_lock_node_marked_down_total{{node="127.0.0.1:{closed}"}} 1"#);
    let live = nodes[0].trim_start_matches("redis://");
    let up = format!(r#"job_runner_lock_node_up{{node="{live}"}} 1"#);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let body = http_get(port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        if [&down, &flipped, &up]
            .iter()
            .all(|s| body.contains(s.as_str()))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lock-node health in /metrics (want `{down}`, `{flipped}`, `{up}`):\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.start_kill().unwrap();
    let _ = child.wait().await;

    let o = job_runner().arg("info").output().unwrap();
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    let line = info
        .lines()
        .find(|l| l.contains(&format!(":{closed}")))
        .unwrap_or_else(|| panic!("the closed node is missing from info:\n{}", out(&o)));
    assert!(line.contains("down"), "{line}");
    cluster.teardown().await;
}
