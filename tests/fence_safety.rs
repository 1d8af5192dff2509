//! Schedules for the fencing state that expires, replayed on model nodes
//! (`fencelock::sim`) on a paused clock. Each runs twice: as the code is, where its tokens
//! must strictly increase, and with its safeguard planted away ([`Bug`]), where they must
//! not.

mod support;

use std::time::Duration;

use fencelock::sim::{Bug, SimCluster, SimOptions};
use fencelock::{Redlock, RetryPolicy};
use support::holds_and_catches;
use tokio::time::sleep;

const QUARANTINE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(2);

async fn client(cluster: &SimCluster, window: Duration) -> Redlock {
    Redlock::builder()
        .node_timeout(Duration::from_millis(20))
        .fencing(true)
        .fence_window(window)
        .restart_quarantine(QUARANTINE)
        .retry(RetryPolicy::never())
        .build_simulated_with(cluster, SimOptions::default().jitter_seed(1))
        .await
        .unwrap()
}

/// Locks and releases `resource` once, while node `away` (if any) loses every request;
/// returns the token.
async fn cycle(cluster: &SimCluster, locks: &Redlock, resource: &str, away: Option<usize>) -> u64 {
    if let Some(i) = away {
        cluster.node(i).set_drop_rate(1.0);
    }
    let guard = locks.lock(resource, TTL).await.unwrap();
    let token = guard.fencing_token().unwrap();
    // A release that misses the node that is away still reaches a quorum.
    let _ = guard.release().await;
    if let Some(i) = away {
        cluster.node(i).set_drop_rate(0.0);
    }
    token
}

fn cluster(bug: Option<Bug>) -> SimCluster {
    let cluster = SimCluster::new(3, 7);
    if let Some(bug) = bug {
        cluster.plant(bug);
    }
    cluster
}

/// A resource locked again after its counters expired is known by the nodes' high-water
/// marks: its token is larger than every earlier one.
async fn locked_again_after_expiry(bug: Option<Bug>) -> Result<(), String> {
    let cluster = cluster(bug);
    let window = Duration::from_millis(100);
    let locks = client(&cluster, window).await;
    let first = cycle(&cluster, &locks, "r", None).await;
    sleep(window * 2).await;
    // Another client: this one's hint (its last token of `r`) would hide the nodes'.
    let other = client(&cluster, window).await;
    let again = cycle(&cluster, &other, "r", None).await;
    if again <= first {
        return Err(format!("token {again} after {first}, the counters expired"));
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_resource_locked_after_its_counters_expired_gets_a_larger_token() {
    holds_and_catches(locked_again_after_expiry, Bug::NoHighWater).await;
}

/// A node restored from an older snapshot keeps a counter that still lives and is below
/// the tokens handed out since. After its seeding the floor lifts it: with the other node
/// of the quorum behind too, the token is still larger than every earlier one.
async fn restored_counter(bug: Option<Bug>) -> Result<(), String> {
    let cluster = cluster(bug);
    let window = Duration::from_secs(60);
    let locks = client(&cluster, window).await;
    let first = cycle(&cluster, &locks, "r", None).await;
    let snapshot = cluster.node(2).snapshot();
    // Node 1 misses the next acquisitions, which nodes 0 and 2 grant.
    let mut last = first;
    for _ in 0..3 {
        last = cycle(&cluster, &locks, "r", Some(1)).await;
    }
    // Node 2 comes back with its older counter; a client that starts now finds it
    // restarted and seeds it from nodes 0 and 1, and it sits out its quarantine.
    cluster.node(2).restore(&snapshot);
    let other = client(&cluster, window).await;
    sleep(QUARANTINE + Duration::from_secs(1)).await;
    // Nodes 1 and 2 decide; neither has a counter of `r` that knows the last tokens (and
    // the client has no hint of them).
    let after = cycle(&cluster, &other, "r", Some(0)).await;
    if after <= last {
        return Err(format!(
            "token {after} after {last}, from a node restored with an older counter"
        ));
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_counter_restored_from_an_older_snapshot_counts_for_the_floor() {
    holds_and_catches(restored_counter, Bug::NoFloor).await;
}
