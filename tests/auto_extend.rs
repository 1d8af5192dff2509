//! Auto-extension: the watchdog keeps a lock through many TTLs, warns "at risk" before the
//! lock can expire, reports "lost" after, stops at its limits, and the scoped API cancels
//! the work on loss without hiding the work's own error.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fencelock::{
    Error, ErrorKind, LockState, LostReason, Redlock, RetryPolicy, ScopedError, WatchdogConfig,
};
use support::Cluster;

const NODE_TIMEOUT: Duration = Duration::from_millis(50);

async fn client(cluster: &Cluster) -> Redlock {
    Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(NODE_TIMEOUT)
        .retry(RetryPolicy::never())
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn using_keeps_the_lock_through_many_ttls() {
    let cluster = Cluster::start(3).await;
    let locks = client(&cluster).await;
    let other = client(&cluster).await;
    let ttl = Duration::from_millis(300);
    let result: Result<u32, ScopedError<std::io::Error>> = locks
        .using(&["auto:long"], ttl, |health| {
            let other = other.clone();
            async move {
                // Four TTLs of work; nobody else gets the lock meanwhile.
                for _ in 0..8 {
                    tokio::time::sleep(ttl / 2).await;
                    assert_eq!(health.state(), LockState::Held);
                    let err = other.try_lock("auto:long", ttl).await.unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::Contended);
                }
                Ok(7)
            }
        })
        .await;
    assert_eq!(result.unwrap(), 7);
    // Released at the end.
    other
        .try_lock("auto:long", ttl)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_risk_fires_before_expiry_and_lost_follows() {
    let cluster = Cluster::start(3).await;
    let locks = client(&cluster).await;
    let ttl = Duration::from_millis(1_000);
    let guard = locks.lock("auto:risk", ttl).await.unwrap();
    let expires = guard.valid_until();
    let watched = guard.auto_extend();
    let health = watched.health();
    // A majority stops answering before the first extension.
    cluster.pause(1).await;
    cluster.pause(2).await;
    let risk = health.at_risk().await;
    let at_risk_at = Instant::now();
    assert_eq!(risk, LockState::AtRisk);
    assert!(
        at_risk_at < expires,
        "at-risk came {:?} after expiry",
        at_risk_at - expires
    );
    let reason = health.lost().await;
    let lost_at = Instant::now();
    assert_eq!(reason, LostReason::Expired);
    assert!(
        lost_at >= expires - Duration::from_millis(5),
        "lost before expiry"
    );
    assert!(lost_at > at_risk_at);
    eprintln!(
        "at risk {:?} before expiry; lost {:?} after it",
        expires - at_risk_at,
        lost_at.saturating_duration_since(expires)
    );
    let guard = watched.stop().await;
    assert!(!guard.is_valid());
    drop(guard);
    cluster.unpause(1).await;
    cluster.unpause(2).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn using_cancels_the_work_when_the_lock_is_lost() {
    let cluster = Cluster::start(3).await;
    let locks = client(&cluster).await;
    let ttl = Duration::from_millis(600);
    let finished = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let result: Result<(), ScopedError<std::io::Error>> = locks
        .using(&["auto:lost"], ttl, |_health| {
            let finished = finished.clone();
            let cluster = &cluster;
            async move {
                cluster.pause(1).await;
                cluster.pause(2).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                finished.store(true, Ordering::SeqCst);
                Ok(())
            }
        })
        .await;
    let took = started.elapsed();
    let Err(ScopedError::Lost { error, work: None }) = result else {
        panic!("expected a loss, got {result:?}");
    };
    assert_eq!(error.kind(), ErrorKind::Lost);
    assert!(
        !finished.load(Ordering::SeqCst),
        "the work must have been dropped"
    );
    assert!(took < ttl + Duration::from_millis(500), "took {took:?}");
    cluster.unpause(1).await;
    cluster.unpause(2).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_works_own_error_is_not_hidden_by_the_loss() {
    let cluster = Cluster::start(3).await;
    let locks = client(&cluster).await;
    let ttl = Duration::from_millis(400);
    let config = WatchdogConfig::default().cancel_on_loss(false);
    let result: Result<(), ScopedError<String>> = locks
        .using_with(&["auto:both"], ttl, config, |health| {
            let cluster = &cluster;
            async move {
                cluster.pause(1).await;
                cluster.pause(2).await;
                health.lost().await;
                Err("charge failed".to_owned())
            }
        })
        .await;
    let Err(ScopedError::Lost { error, work }) = result else {
        panic!("expected a loss, got {result:?}");
    };
    assert_eq!(error.kind(), ErrorKind::Lost);
    assert_eq!(work.as_deref(), Some("charge failed"));
    cluster.unpause(1).await;
    cluster.unpause(2).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_end_the_lock_with_distinct_reasons() {
    let cluster = Cluster::start(3).await;
    let locks = client(&cluster).await;
    let ttl = Duration::from_millis(300);
    for (config, expected) in [
        (
            WatchdogConfig::default().max_extensions(2),
            LostReason::ExtensionLimit,
        ),
        (
            WatchdogConfig::default().max_hold(Duration::from_millis(500)),
            LostReason::HoldLimit,
        ),
    ] {
        let started = Instant::now();
        let result: Result<(), ScopedError<String>> = locks
            .using_with(&["auto:limit"], ttl, config, |health| async move {
                std::future::pending::<()>().await;
                let _ = health;
                Ok(())
            })
            .await;
        let Err(ScopedError::Lost {
            error: Error::Lost { reason, .. },
            ..
        }) = result
        else {
            panic!("expected a loss, got {result:?}");
        };
        assert_eq!(reason, expected);
        // Held beyond its first TTL (the watchdog extended it), and not forever.
        let took = started.elapsed();
        assert!(
            took > ttl && took < Duration::from_secs(3),
            "{expected:?} after {took:?}"
        );
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
