//! Tasks of one process that want the same resource queue in-process: `try_lock` fails at
//! once without asking the nodes, and `lock` gets the resource as soon as the holder
//! releases, handed over in one round without the keys ever being free.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    // The lock passed without being let go: a quorum holds the waiter's fresh value, and
    // a node-redlock-style client is still refused.
    cluster.wait_all_hold("local:r", guard.value()).await;
    for i in 0..3 {
        assert!(
            !cluster.foreign_set_nx(i, "local:r", "intruder").await,
            "node {i} was free"
        );
    }
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

/// Within a hand-off chain the keys are never free: an intruder spinning on
/// `SET NX` against one node never gets in while tasks of the process pass the lock along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_never_free_during_hand_offs() {
    let cluster = Cluster::start(3).await;
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        .max_local_handoffs(usize::MAX)
        .build()
        .await
        .unwrap();
    // Hold it first, so the chain starts before the intruder does.
    let first = locks
        .lock("local:chain", Duration::from_secs(10))
        .await
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let intruder = {
        let done = done.clone();
        let mut c = cluster.conn(0).await;
        tokio::spawn(async move {
            let (mut tries, mut wins) = (0u32, 0u32);
            while !done.load(Ordering::SeqCst) {
                let reply: redis::Value = redis::cmd("SET")
                    .arg("local:chain")
                    .arg("intruder")
                    .arg("NX")
                    .arg("PX")
                    .arg(50)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                tries += 1;
                wins += u32::from(reply != redis::Value::Nil);
            }
            (tries, wins)
        })
    };
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let locks = locks.clone();
            tokio::spawn(async move {
                for _ in 0..30 {
                    let g = locks
                        .lock("local:chain", Duration::from_secs(10))
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                    g.release().await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.release().await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (tries, wins) = intruder.await.unwrap();
    assert!(
        tries > 10,
        "the intruder must actually have tried ({tries})"
    );
    // The last release is real, so the intruder may get in after the chain ends; its key
    // then expires within 50 ms. Before that, never.
    assert!(
        wins <= 1,
        "the keys were free {wins} times in {tries} tries"
    );
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
