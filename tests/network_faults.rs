//! Network faults between the client and its nodes, made by a [`Link`] in front of each
//! node: a partition that heals (commands arrive late, and late grants must be taken back),
//! and connections closed under load (the client must reconnect by itself).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fencelock::{LockGuard, Redlock};
use support::{Cluster, Link, TEST_NODE_TIMEOUT};

const TTL: Duration = Duration::from_secs(30);

async fn client_over(links: &[Link], node_timeout: Duration, fencing: bool) -> Redlock {
    Redlock::builder()
        .nodes(links.iter().map(Link::url))
        .node_timeout(node_timeout)
        .fencing(fencing)
        .build()
        .await
        .expect("build a client over the links")
}

/// Locks `resource` and waits until every node holds it, not only the quorum that decided.
async fn lock_everywhere(locks: &Redlock, cluster: &Cluster, resource: &str) -> LockGuard {
    let guard = locks.lock(resource, TTL).await.unwrap();
    cluster.wait_all_hold(resource, guard.value()).await;
    guard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_minority_costs_at_most_the_node_timeout_and_leaves_nothing_after_healing() {
    let cluster = Cluster::start(5).await;
    let links = cluster.links().await;
    let node_timeout = Duration::from_millis(200);
    // With fencing, every acquisition a node runs leaves a counter: what was sent shows.
    let locks = client_over(&links, node_timeout, true).await;
    // Held across the cut, on every node.
    let held = lock_everywhere(&locks, &cluster, "cut:held").await;

    links[1].cut();
    links[4].cut();
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let resource = format!("cut:{i}");
        let started = Instant::now();
        let guard = locks
            .lock(&resource, TTL)
            .await
            .expect("the 3 reachable nodes of 5 are a quorum");
        worst = worst.max(started.elapsed());
        assert_eq!(cluster.holders_on(&[0, 2, 3], &resource).await, 3);
        assert_eq!(cluster.holders_on(&[1, 4], &resource).await, 0);
        guard
            .release()
            .await
            .expect("release on the reachable quorum");
    }
    assert!(
        worst < node_timeout + Duration::from_millis(150),
        "worst acquire {worst:?} with two nodes cut off"
    );

    // Healing delivers what was in flight when the cut began: the first acquisition reaches
    // the two nodes now, long after its guard was released, and is granted there. The nine
    // acquisitions queued behind it had ended by then and must not be sent at all.
    links[1].heal();
    links[4].heal();
    // Each node runs its commands in order, so once this release has been answered by
    // every node, the healed ones have run everything held up behind the cut.
    held.release().await.expect("release on all 5 nodes");
    cluster.assert_no_keys_within(Duration::from_secs(3)).await;
    for i in [1, 4] {
        let counters: Vec<String> = cluster
            .all_keys(i)
            .await
            .into_iter()
            .filter(|k| k.starts_with("fencelock:fence:{"))
            .collect();
        assert_eq!(
            counters,
            ["fencelock:fence:{cut:0}", "fencelock:fence:{cut:held}"],
            "node {i} ran acquisitions that had ended before they were sent"
        );
    }

    // The two cut-off nodes were marked down once, and up once their link healed.
    let health = locks.node_health();
    let flips: Vec<(bool, u64, u64)> = health
        .iter()
        .map(|h| (h.up, h.marked_down, h.marked_up))
        .collect();
    let (down_once, never) = ((true, 1, 1), (true, 0, 0));
    assert_eq!(
        flips,
        [never, down_once, never, never, down_once],
        "{health:?}"
    );
    // The healed nodes vote again.
    let guard = lock_everywhere(&locks, &cluster, "cut:after").await;
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_under_load_are_reopened_and_nothing_leaks() {
    let cluster = Cluster::start(3).await;
    let links = cluster.links().await;
    let locks = client_over(&links, TEST_NODE_TIMEOUT, false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|t| {
            let (locks, stop, cycles) = (locks.clone(), stop.clone(), cycles.clone());
            tokio::spawn(async move {
                let resource = format!("reset:{t}");
                while !stop.load(Ordering::Relaxed) {
                    // One node at a time is reset, so two of three always answer.
                    let guard = locks
                        .lock(&resource, TTL)
                        .await
                        .expect("a quorum stays reachable");
                    // A release that meets a reset may report it; what this test holds the
                    // client to is that locking goes on and nothing leaks (checked below).
                    let _ = guard.release().await;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for round in 0..9 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        links[round % 3].reset();
    }
    let before = cycles.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        cycles.load(Ordering::Relaxed) > before,
        "no lock cycle completed after the last reset"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    // Every node takes part again: its connection was reopened.
    let guard = lock_everywhere(&locks, &cluster, "reset:after").await;
    guard.release().await.unwrap();
    // A grant whose reply a reset cut off is released with the guard, which tries a
    // broken node once more.
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}
