//! 32 tasks × 50 iterations contend for one resource; a check inside the critical section
//! never sees two holders.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fencelock::{Redlock, RetryPolicy};
use support::{Cluster, TEST_NODE_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_tasks_never_overlap() {
    let cluster = Cluster::start(3).await;
    // Several clients, as several processes would have, so contention goes through Redis
    // as well as through each client's in-process queue.
    let mut clients = Vec::new();
    for _ in 0..std::env::var("NCLIENTS")
        .map(|v| v.parse().unwrap())
        .unwrap_or(4)
    {
        clients.push(
            Redlock::builder()
                .nodes(cluster.urls())
                .node_timeout(TEST_NODE_TIMEOUT)
                .retry(RetryPolicy::new(
                    400,
                    Duration::from_millis(5),
                    Duration::from_millis(20),
                ))
                .build()
                .await
                .unwrap(),
        );
    }
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..32 {
        let client = clients[t % clients.len()].clone();
        let (inside, overlaps, done) = (inside.clone(), overlaps.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let guard = client
                    .lock("mutex:shared", Duration::from_secs(5))
                    .await
                    .expect("lock eventually");
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                tokio::task::yield_now().await;
                assert!(guard.is_valid());
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release a held lock");
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    assert_eq!(done.load(Ordering::SeqCst), 32 * 50);
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
