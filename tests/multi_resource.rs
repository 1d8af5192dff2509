//! Multi-resource locks: on each node all keys are set or none.

mod support;

use std::time::Duration;

use fencelock::ErrorKind;
use redis::AsyncCommands;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_are_set_and_released_together() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let guard = locks
        .lock_many(&["multi:b", "multi:a", "multi:c"], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(guard.resources(), ["multi:a", "multi:b", "multi:c"]);
    for key in guard.resources() {
        // At least a quorum at return; the last node may still be on its way.
        assert!(cluster.holders(key).await >= locks.quorum(), "{key}");
    }
    // Each resource alone is now contended.
    let other = cluster.client().await;
    let err = other
        .try_lock("multi:b", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Contended);
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_held_on_a_majority_sets_nothing() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    // Another client holds `multi:y` on two of the three nodes.
    for i in [0, 2] {
        assert!(cluster.foreign_set_nx(i, "multi:y", "foreign").await);
    }
    let err = locks
        .try_lock_many(&["multi:x", "multi:y", "multi:z"], Duration::from_secs(10))
        .await
        .expect_err("y is held on a majority");
    assert_eq!(err.kind(), ErrorKind::Contended, "{err}");
    for i in 0..3 {
        let keys = cluster.keys(i).await;
        let expected: Vec<String> = if i == 1 {
            vec![]
        } else {
            vec!["multi:y".into()]
        };
        assert_eq!(keys, expected, "node {i} holds part of the set");
    }
    for i in [0, 2] {
        let mut c = cluster.conn(i).await;
        let _: () = c.del("multi:y").await.unwrap();
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
