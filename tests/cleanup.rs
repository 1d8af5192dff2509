//! Cleanup: a dropped guard frees its keys within a short grace, and a dropped in-flight
//! `lock` future leaves no key.

mod support;

use std::time::Duration;

use fencelock::Redlock;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_guard_releases_in_the_background() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    {
        let guard = locks
            .lock("cleanup:guard", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(cluster.holders("cleanup:guard").await >= locks.quorum());
        drop(guard);
    }
    // Far below the 30 s TTL: the release was spawned, not left to expiry.
    cluster
        .assert_no_keys_within(Duration::from_millis(500))
        .await;
    // And the next local locker gets it at once.
    let again = locks
        .try_lock("cleanup:guard", Duration::from_secs(30))
        .await
        .unwrap();
    again.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_lock_future_leaves_no_key() {
    let cluster = Cluster::start(3).await;
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    // With two nodes paused the round cannot decide for 5 s; node 0 grants at once.
    cluster.pause(1).await;
    cluster.pause(2).await;
    let in_flight = {
        let locks = locks.clone();
        tokio::spawn(async move { locks.lock("cleanup:future", Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !in_flight.is_finished(),
        "the lock call must still be in flight"
    );
    assert_eq!(cluster.keys(0).await, ["cleanup:future"], "node 0 granted");
    in_flight.abort();
    assert!(in_flight.await.unwrap_err().is_cancelled());
    // The dropped future's spawned release removes node 0's key long before its TTL.
    cluster
        .assert_no_keys_on(&[0], Duration::from_millis(500))
        .await;
    // The paused nodes run the queued SET and then the queued release.
    cluster.unpause(1).await;
    cluster.unpause(2).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

#[test]
fn dropped_guard_without_a_runtime_does_not_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(Cluster::start(1));
    let guard = rt.block_on(async {
        let locks = cluster.client().await;
        locks
            .lock("cleanup:noruntime", Duration::from_millis(500))
            .await
            .unwrap()
    });
    // Outside any runtime: Drop logs and lets the TTL expire, without blocking or panicking.
    drop(guard);
    rt.block_on(async {
        assert_eq!(cluster.holders("cleanup:noruntime").await, 1);
        cluster.assert_no_keys_within(Duration::from_secs(2)).await;
        cluster.teardown().await;
    });
}
