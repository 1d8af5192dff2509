//! Tasks of one process that want the same resource queue in-process: `try_lock` fails at
//! once without asking the nodes, and `lock` gets the resource as soon as the holder
//! releases, without waiting for a retry delay.

mod support;

use std::time::{Duration, Instant};

use fencelock::{Error, ErrorKind, Redlock, RetryPolicy};
use support::{Cluster, TEST_NODE_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_waiters_are_handed_the_lock_without_retry_delay() {
    let cluster = Cluster::start(3).await;
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        // A long retry delay: a waiter that went through Redis retries would need >= 2 s.
        .retry(RetryPolicy::new(3, Duration::from_secs(2), Duration::ZERO))
        .build()
        .await
        .unwrap();
    let held = locks
        .lock("local:r", Duration::from_secs(10))
        .await
        .unwrap();

    let err = locks
        .try_lock("local:r", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Contended);
    assert!(
        matches!(err, Error::Contended { attempts: 0, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "lock on `local:r` is held by another task of this process"
    );

    let waiter = {
        let locks = locks.clone();
        tokio::spawn(async move {
            let guard = locks.lock("local:r", Duration::from_secs(10)).await;
            (Instant::now(), guard)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the waiter must wait for the holder");
    let released_at = Instant::now();
    held.release().await.unwrap();
    let (got_at, guard) = waiter.await.unwrap();
    let guard = guard.expect("the waiter gets the lock");
    let handoff = got_at.duration_since(released_at);
    assert!(
        handoff < Duration::from_secs(1),
        "hand-off took {handoff:?}"
    );
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
