//! Validity: a TTL that the drift allowance eats is refused and leaves nothing behind; a
//! granted lock's deadline is `start + ttl - drift` on the monotonic clock.

mod support;

use std::time::{Duration, Instant};

use fencelock::ErrorKind;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_within_drift_is_refused_and_leaves_no_key() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_millis(2),
    ] {
        let err = locks
            .lock("validity:tiny", ttl)
            .await
            .expect_err("no validity left");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(!err.is_retryable());
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validity_is_ttl_minus_elapsed_minus_drift() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let ttl = Duration::from_secs(10);
    let before = Instant::now();
    let guard = locks.lock("validity:ten", ttl).await.unwrap();
    let after = Instant::now();
    let drift = locks.drift(ttl);
    assert_eq!(drift, Duration::from_millis(102));
    assert!(guard.valid_until() <= after + ttl - drift);
    assert!(guard.valid_until() >= before + ttl - drift);
    // A quorum holds the key (the last node may still be on its way), and every key that is
    // there expires no earlier than the guard's deadline.
    let mut holders = 0;
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let pttl: i64 = redis::cmd("PTTL")
            .arg("validity:ten")
            .query_async(&mut c)
            .await
            .unwrap();
        if pttl == -2 {
            continue;
        }
        holders += 1;
        assert!(
            pttl > 0 && Duration::from_millis(pttl as u64) + drift >= guard.validity(),
            "node {i}: pttl {pttl}"
        );
    }
    assert!(holders >= locks.quorum());
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lock_expires_and_reports_lost_on_release() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let guard = locks
        .lock("validity:short", Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!guard.is_valid());
    assert_eq!(guard.validity(), Duration::ZERO);
    let err = guard
        .release()
        .await
        .expect_err("the critical section overran its lock");
    assert_eq!(err.kind(), ErrorKind::Lost);
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
