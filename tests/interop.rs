//! Interop with node-redlock and redsync: the key is the resource name and the value an
//! opaque random string, so their locks and ours exclude each other.

mod support;

use std::time::Duration;

use fencelock::ErrorKind;
use redis::AsyncCommands;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_redlock_lock_refuses_us() {
    let cluster = Cluster::start(3).await;
    // node-redlock v5 acquires with `SET key <random> NX PX ttl` on every node.
    for i in 0..3 {
        let granted = cluster
            .foreign_set_nx(i, "interop:order:1", "a1b2c3d4e5f60718293a4b5c6d7e8f90")
            .await;
        assert!(granted, "node {i}");
    }
    let locks = cluster.client().await;
    let err = locks
        .try_lock("interop:order:1", Duration::from_secs(5))
        .await
        .expect_err("held by node-redlock");
    assert_eq!(err.kind(), ErrorKind::Contended, "{err}");
    // And we did not touch their keys.
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let v: String = c.get("interop:order:1").await.unwrap();
        assert_eq!(v, "a1b2c3d4e5f60718293a4b5c6d7e8f90");
        let _: () = c.del("interop:order:1").await.unwrap();
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_lock_makes_a_plain_set_nx_fail() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let guard = locks
        .lock("interop:order:2", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(guard.value().len(), 32, "128 bits, hex");
    cluster
        .wait_all_hold("interop:order:2", guard.value())
        .await;
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        // The key is the resource name as given, no prefix.
        let v: String = c.get("interop:order:2").await.unwrap();
        assert_eq!(v, guard.value());
        let granted = cluster
            .foreign_set_nx(i, "interop:order:2", "node-redlock")
            .await;
        assert!(!granted, "node {i}: SET NX must fail while we hold it");
    }
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
