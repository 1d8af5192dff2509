//! The memory row of the lock benchmark: what 100 000 distinct fenced resources leave on
//! the lock nodes, right after they were locked and once the fence window has passed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fencelock::Redlock;

use crate::support::Cluster;
use crate::{TTL, median};

/// Distinct resources the memory row locks, and how many per `lock_many`.
const MEMORY_RESOURCES: usize = 100_000;
const MEMORY_BATCH: usize = 100;
/// The fence window of the memory row: long enough that every counter is still there when
/// the last resource has been locked, which is what a node kept for good before counters
/// expired.
const MEMORY_WINDOW: Duration = Duration::from_secs(15);

/// Lock nodes' keys and `used_memory` (medians over the nodes) before, right after
/// 100 000 distinct fenced resources, and once the fence window has passed.
pub(crate) async fn memory_row(cluster: &Cluster) {
    let urls = cluster.urls();
    let n = urls.len();
    let locks = Redlock::builder()
        .nodes(urls.iter().cloned())
        .node_timeout(Duration::from_millis(250))
        .fencing(true)
        .fence_window(MEMORY_WINDOW)
        .restart_quarantine(TTL)
        .build()
        .await
        .expect("client");
    // The phases before used a window of the default length; wait for nothing of theirs.
    let before = node_state(cluster).await;
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (locks, next) = (locks.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let from = next.fetch_add(MEMORY_BATCH as u64, Ordering::Relaxed) as usize;
                    if from >= MEMORY_RESOURCES {
                        return;
                    }
                    let names: Vec<String> = (from..from + MEMORY_BATCH)
                        .map(|i| format!("bench:payment:{{order-{i}}}"))
                        .collect();
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let guard = locks.lock_many(&names, TTL).await.expect("lock");
                    guard.release().await.expect("release");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    let after_locking = node_state(cluster).await;
    // Past the window from the last write, Redis expires the counters and shrinks its
    // tables within seconds.
    tokio::time::sleep(MEMORY_WINDOW + Duration::from_secs(5)).await;
    let after_window = node_state(cluster).await;
    println!(
        "\nmemory: {MEMORY_RESOURCES} distinct fenced resources in batches of {MEMORY_BATCH} ({:.1}s), fence window {}s, medians over {n} nodes",
        took.as_secs_f64(),
        MEMORY_WINDOW.as_secs()
    );
    println!("| when | keys per node | used_memory per node |");
    println!("|---|---|---|");
    for (when, (keys, kib)) in [
        ("before", before),
        (
            "after locking (what stayed for good before the window)",
            after_locking,
        ),
        ("after the window", after_window),
    ] {
        println!("| {when} | {keys:.0} | {kib:.0} KiB |");
    }
}

/// Keys and `used_memory` in KiB, medians over the nodes.
async fn node_state(cluster: &Cluster) -> (f64, f64) {
    let (mut keys, mut memory) = (Vec::new(), Vec::new());
    for i in 0..cluster.urls().len() {
        keys.push(cluster.dbsize(i).await as f64);
        memory.push(cluster.used_memory(i).await as f64);
    }
    (median(keys), median(memory) / 1024.0)
}
