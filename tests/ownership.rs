//! Ownership: nobody releases or extends a lock that is not theirs, and a failed extension
//! never deletes a lock that is still valid.

mod support;

use std::time::Duration;

use fencelock::{Error, ErrorKind, LostReason, Redlock, RetryPolicy};
use redis::AsyncCommands;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_release_by_a_former_owner_deletes_nothing() {
    let cluster = Cluster::start(3).await;
    let a = cluster.client().await;
    let b = cluster.client().await;
    let stale = a.lock("own:r", Duration::from_millis(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let current = b
        .lock("own:r", Duration::from_secs(10))
        .await
        .expect("expired lock is free");
    cluster.wait_all_hold("own:r", current.value()).await;
    let err = stale.release().await.expect_err("A's lock is gone");
    assert_eq!(err.kind(), ErrorKind::Lost);
    // B's key is intact on every node, with B's value.
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let v: Option<String> = c.get("own:r").await.unwrap();
        assert_eq!(v.as_deref(), Some(current.value()), "node {i}");
    }
    current.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_after_expiry_is_refused_locally() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let mut guard = locks
        .lock("own:expired", Duration::from_millis(50))
        .await
        .unwrap();
    // Keep the keys alive on the nodes (as if their clocks were slow) to show that the
    // refusal is local: the nodes would have said yes.
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let _: bool = c.pexpire("own:expired", 10_000).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    let err = guard
        .extend(Duration::from_secs(10))
        .await
        .expect_err("validity is gone");
    assert!(
        matches!(
            err,
            Error::Lost {
                reason: LostReason::Expired,
                ..
            }
        ),
        "{err}"
    );
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let pttl: i64 = c.pttl("own:expired").await.unwrap();
        assert!(pttl <= 10_000 - 60, "node {i} was extended: pttl {pttl}");
    }
    drop(guard);
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_extension_keeps_the_lock() {
    let cluster = Cluster::start(3).await;
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(Duration::from_millis(100))
        .retry(RetryPolicy::never())
        .build()
        .await
        .unwrap();
    let mut guard = locks
        .lock("own:extend", Duration::from_secs(10))
        .await
        .unwrap();
    let deadline = guard.valid_until();
    // The round returned at a quorum; which nodes hold the key is what must not change.
    let mut holders = Vec::new();
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let v: Option<String> = c.get("own:extend").await.unwrap();
        if v.as_deref() == Some(guard.value()) {
            holders.push(i);
        }
    }
    assert!(holders.len() >= locks.quorum());
    cluster.pause(1).await;
    cluster.pause(2).await;
    let err = guard
        .extend(Duration::from_secs(20))
        .await
        .expect_err("one node is no quorum");
    assert_eq!(err.kind(), ErrorKind::NoQuorum, "{err}");
    assert!(err.is_retryable());
    // Still ours, with the old deadline.
    assert_eq!(guard.valid_until(), deadline);
    assert!(guard.is_valid());
    cluster.unpause(1).await;
    cluster.unpause(2).await;
    for &i in &holders {
        let mut c = cluster.conn(i).await;
        let v: Option<String> = c.get("own:extend").await.unwrap();
        assert_eq!(v.as_deref(), Some(guard.value()), "node {i} lost the key");
    }
    // And a retry once the nodes are back succeeds.
    guard
        .extend(Duration::from_secs(20))
        .await
        .expect("extend on a healthy quorum");
    assert!(guard.validity() > Duration::from_secs(19));
    // Someone else must not be able to take it meanwhile.
    let other = cluster.client().await;
    let err = other
        .try_lock("own:extend", Duration::from_secs(1))
        .await
        .expect_err("held");
    assert_eq!(err.kind(), ErrorKind::Contended);
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_of_a_taken_over_lock_is_lost_and_deletes_nothing() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let mut guard = locks
        .lock("own:taken", Duration::from_secs(10))
        .await
        .unwrap();
    // An operator (or a bug elsewhere) overwrites the key on every node.
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let _: () = c.set("own:taken", "someone-else").await.unwrap();
    }
    let err = guard
        .extend(Duration::from_secs(10))
        .await
        .expect_err("not ours any more");
    assert!(
        matches!(
            err,
            Error::Lost {
                reason: LostReason::NotOwned,
                ..
            }
        ),
        "{err}"
    );
    assert!(!guard.is_valid());
    let err = guard.release().await.expect_err("not ours");
    assert_eq!(err.kind(), ErrorKind::Lost);
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let v: Option<String> = c.get("own:taken").await.unwrap();
        assert_eq!(v.as_deref(), Some("someone-else"), "node {i}");
        let _: () = c.del("own:taken").await.unwrap();
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
