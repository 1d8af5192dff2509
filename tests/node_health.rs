//! A failed minority of nodes costs nothing once it is marked down: a stopped node (a closed
//! port) and a paused one (`docker pause`, as SIGSTOP) are marked down within a bounded
//! number of calls, cost no node timeout after that, and are marked up again, once each,
//! when they answer. On model nodes first (virtual time, with the mechanism planted away to
//! show the check fires), then on real ones.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fencelock::sim::{Bug, SimCluster, SimOptions};
use fencelock::{NodeHealth, Redlock};
use support::{Cluster, TEST_NODE_TIMEOUT, wait_until};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(5);

/// (up, marked down, marked up) of every node.
fn flips(health: &[NodeHealth]) -> Vec<(bool, u64, u64)> {
    health
        .iter()
        .map(|h| (h.up, h.marked_down, h.marked_up))
        .collect()
}

/// On model nodes: node 4 paused, 50 cycles. Returns how many releases waited a whole node
/// timeout (the paused node's share), or why the run is wrong.
async fn paused_model_node(bug: Option<Bug>) -> Result<usize, String> {
    let cluster = SimCluster::new(5, 7);
    if let Some(bug) = bug {
        cluster.plant(bug);
    }
    let node_timeout = Duration::from_millis(20);
    let locks = Redlock::builder()
        .node_timeout(node_timeout)
        .build_simulated_with(&cluster, SimOptions::default())
        .await
        .unwrap();
    cluster.node(4).pause();
    let mut slow = 0;
    for _ in 0..50 {
        let guard = locks.lock("r", TTL).await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        guard.release().await.map_err(|e| e.to_string())?;
        slow += usize::from(started.elapsed() >= node_timeout);
    }
    if slow > 2 {
        return Err(format!(
            "{slow} of 50 releases waited a node timeout for the paused node"
        ));
    }
    cluster.node(4).unpause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = locks.node_health();
    let never = (true, 0, 0);
    if flips(&health) != [never, never, never, never, (true, 1, 1)] {
        return Err(format!("health after the pause: {health:?}"));
    }
    Ok(slow)
}

#[tokio::test(start_paused = true)]
async fn a_paused_model_node_costs_two_timeouts_then_nothing() {
    let slow = paused_model_node(None).await.unwrap();
    assert!(slow >= 1, "the paused node was never waited for: no test");
    let caught = paused_model_node(Some(Bug::NodeNeverDown)).await;
    eprintln!(
        "with NodeNeverDown planted: {}",
        caught.expect_err("the planted bug went unnoticed")
    );
}

/// Log lines, kept for the transitions' count.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn count(&self, what: &str, node: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains(what) && l.contains(node))
            .count()
    }
}

async fn client(urls: &[String], quarantine: Duration) -> Redlock {
    Redlock::builder()
        .nodes(urls.iter().cloned())
        .node_timeout(TEST_NODE_TIMEOUT)
        .restart_quarantine(quarantine)
        .build()
        .await
        .unwrap()
}

async fn cycles(locks: &Redlock, resource: &str, n: usize) -> Duration {
    let started = Instant::now();
    for _ in 0..n {
        let guard = locks.lock(resource, TTL).await.expect("lock");
        guard.release().await.expect("release");
    }
    started.elapsed()
}

/// Real nodes, one test so that they share their containers: a stopped node, then a
/// paused one. The client's task runs on this test's thread, and so do the log lines.
#[tokio::test]
async fn a_stopped_or_paused_node_is_marked_down_then_up_and_costs_little_meanwhile() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_env_filter("fencelock=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let cluster = Cluster::start(5).await;
    let quarantine = Duration::from_secs(TTL.as_secs() + 1);
    let locks = client(&cluster.urls(), quarantine).await;
    let all_up = cycles(&locks, "health:all-up", 500).await;

    // Stopped: the port is closed. The connection breaks, the reconnect is refused.
    cluster.stop(4).await;
    let addr = locks.nodes()[4].to_owned();
    cycles(&locks, "health:stopping", 3).await;
    let health = locks.node_health();
    assert!(!health[4].up, "a refused node is marked down: {health:?}");
    let one_down = cycles(&locks, "health:one-down", 500).await;
    assert!(
        one_down < all_up * 5,
        "500 cycles took {one_down:?} with one node stopped, {all_up:?} with all up"
    );
    cluster
        .assert_no_keys_on(&[0, 1, 2, 3], Duration::from_secs(1))
        .await;

    // Started again (empty): marked up by the probe, and voting after its quarantine.
    cluster.start_again(4).await;
    wait_until("node 4 marked up", Duration::from_secs(5), || {
        let up = locks.node_health()[4].up;
        async move { up }
    })
    .await;
    // Its first round starts its quarantine (it came back empty); the first round after
    // that finds it unseeded and seeds it; it votes from the next one.
    wait_until("node 4 votes again", quarantine * 2, || {
        let (locks, cluster) = (&locks, &cluster);
        async move {
            let guard = locks.lock("health:back", TTL).await.unwrap();
            let all = cluster.holders("health:back").await == 5;
            guard.release().await.unwrap();
            all
        }
    })
    .await;
    assert_eq!(
        logs.count("marked down", &addr),
        1,
        "one line per transition"
    );
    assert_eq!(logs.count("marked up", &addr), 1, "one line per transition");

    // Paused: the port stays open and nothing answers. At most two calls wait for it.
    cluster.pause(3).await;
    let mut waited = 0;
    for _ in 0..20 {
        let guard = locks.lock("health:paused", TTL).await.unwrap();
        let started = Instant::now();
        guard.release().await.unwrap();
        waited += usize::from(started.elapsed() >= TEST_NODE_TIMEOUT);
    }
    assert!(
        waited <= 2,
        "{waited} of 20 releases waited for the paused node"
    );
    assert!(!locks.node_health()[3].up);
    cluster.unpause(3).await;
    wait_until("node 3 marked up", Duration::from_secs(5), || {
        let up = locks.node_health()[3].up;
        async move { up }
    })
    .await;
    // Not restarted: it votes at once.
    let guard = locks.lock("health:unpaused", TTL).await.unwrap();
    cluster
        .wait_all_hold("health:unpaused", guard.value())
        .await;
    guard.release().await.unwrap();
    let health = locks.node_health();
    assert_eq!(
        flips(&health),
        [
            (true, 0, 0),
            (true, 0, 0),
            (true, 0, 0),
            (true, 1, 1),
            (true, 1, 1)
        ],
        "{health:?}"
    );
    // The paused node's keys from before its pause were released when it came back.
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}
