//! A paused node (`docker pause`) costs at most the per-node timeout: acquisition decides as
//! soon as the healthy quorum answers.

mod support;

use std::time::{Duration, Instant};

use fencelock::Redlock;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_minority_does_not_stall_acquire() {
    let cluster = Cluster::start(5).await;
    let node_timeout = Duration::from_millis(200);
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(node_timeout)
        .build()
        .await
        .unwrap();
    cluster.pause(0).await;
    cluster.pause(3).await;

    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let guard = locks
            .lock(&format!("paused:{i}"), Duration::from_secs(10))
            .await
            .expect("3 healthy nodes of 5 are a quorum");
        worst = worst.max(started.elapsed());
        // Release waits for every node, so a paused one costs its timeout here.
        guard.release().await.expect("release");
    }
    let margin = Duration::from_millis(150);
    assert!(
        worst < node_timeout + margin,
        "worst acquire {worst:?} with two nodes paused"
    );

    cluster.unpause(0).await;
    cluster.unpause(3).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}
