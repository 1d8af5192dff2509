//! Quorum behaviour on real nodes: a minority down still locks; a majority down fails fast
//! with a no-quorum error and leaves nothing behind.

mod support;

use std::time::{Duration, Instant};

use fencelock::{Error, ErrorKind, NodeFailure, Redlock, RetryPolicy};
use support::Cluster;

const NODE_TIMEOUT: Duration = Duration::from_millis(100);

async fn client(cluster: &Cluster, retry: RetryPolicy) -> Redlock {
    Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(NODE_TIMEOUT)
        .retry(retry)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_five_down_still_locks_three_down_fails_fast() {
    let cluster = Cluster::start(5).await;
    let retry = RetryPolicy::new(3, Duration::from_millis(50), Duration::from_millis(50));
    let locks = client(&cluster, retry).await;
    assert_eq!(locks.quorum(), 3);

    cluster.stop(0).await;
    cluster.stop(1).await;
    let guard = locks
        .lock("quorum:a", Duration::from_secs(10))
        .await
        .expect("3 of 5 nodes are a quorum");
    assert!(guard.validity() > Duration::from_secs(9));
    assert_eq!(cluster.holders_on(&[2, 3, 4], "quorum:a").await, 3);
    guard.release().await.expect("release on the live quorum");

    cluster.stop(2).await;
    let started = Instant::now();
    let err = locks
        .lock("quorum:b", Duration::from_secs(10))
        .await
        .expect_err("2 of 5 nodes are not a quorum");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::NoQuorum, "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains("reached 0 of the 3 nodes")
            || err.to_string().contains("of the 3 nodes"),
        "{err}"
    );
    // The budget: 4 rounds, each at most a node timeout for the acquire plus one for the
    // release, and 3 waits of at most 100 ms. Stopped nodes refuse connections at once, so
    // in practice it is far less; the bound is what users can rely on.
    let budget = retry.max_total_wait() + 4 * 2 * NODE_TIMEOUT + Duration::from_millis(500);
    assert!(took < budget, "no-quorum took {took:?}, budget {budget:?}");

    // Nothing leaked on the nodes that were up.
    assert_eq!(cluster.holders_on(&[3, 4], "quorum:b").await, 0);
    for i in 0..3 {
        cluster.start_again(i).await;
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_majority_is_a_timeout_and_late_sets_are_cleaned_up() {
    let cluster = Cluster::start(3).await;
    let locks = client(&cluster, RetryPolicy::never()).await;
    cluster.pause(1).await;
    cluster.pause(2).await;
    let started = Instant::now();
    let err = locks
        .try_lock("quorum:paused", Duration::from_secs(30))
        .await
        .expect_err("a paused majority cannot grant");
    assert_eq!(err.kind(), ErrorKind::NoQuorum, "{err}");
    let Error::NoQuorum { failures, .. } = &err else {
        unreachable!()
    };
    assert!(
        failures
            .iter()
            .all(|f| matches!(f, NodeFailure::Timeout { .. })),
        "paused nodes time out: {err}"
    );
    // One acquire timeout plus one release timeout, and a margin for the loaded machine.
    assert!(
        started.elapsed() < 2 * NODE_TIMEOUT + Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // The paused nodes still have our SET in their socket buffers, followed by our release:
    // once they run again, the SET lands and the release removes it.
    cluster.unpause(1).await;
    cluster.unpause(2).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}
