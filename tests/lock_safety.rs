//! Regression tests for the schedules that gave two holders or a stale token, each
//! replayed on model nodes (`fencelock::sim`) on a paused clock, so that every step happens
//! exactly when the schedule says. Each schedule runs twice: as the code is, where it must
//! hold, and with its hole planted back ([`Bug`]), where its check must fire.

mod support;

use std::time::Duration;

use fencelock::sim::{Bug, SimCluster, SimOptions};
use fencelock::{
    ErrorKind, LockGuard, LockState, LostReason, MAX_TTL, Redlock, RetryPolicy, WatchdogConfig,
};
use support::holds_and_catches;
use tokio::time::{Instant, sleep, sleep_until};

const QUARANTINE: Duration = Duration::from_secs(10);

fn planted(nodes: usize, seed: u64, bug: Option<Bug>) -> SimCluster {
    let cluster = SimCluster::new(nodes, seed);
    if let Some(bug) = bug {
        cluster.plant(bug);
    }
    cluster
}

/// A's lock held on nodes 0 and 2 only: node 1 loses A's request.
async fn lock_without_node_1(cluster: &SimCluster, locks: &Redlock, ttl: Duration) -> LockGuard {
    cluster.node(1).set_drop_rate(1.0);
    let held = locks.lock("r", ttl).await.unwrap();
    cluster.node(1).set_drop_rate(0.0);
    held
}

/// The violation when B got the lock while A's guard still claims validity.
fn two_holders(a: &LockGuard, b: &LockGuard) -> String {
    format!(
        "two holders: A valid for {:?} with token {:?}, B with token {:?}",
        a.validity(),
        a.fencing_token(),
        b.fencing_token()
    )
}

async fn client(cluster: &SimCluster, quarantine: Duration) -> Redlock {
    Redlock::builder()
        .node_timeout(Duration::from_millis(20))
        .fencing(true)
        .restart_quarantine(quarantine)
        .retry(RetryPolicy::never())
        .build_simulated_with(cluster, SimOptions::default().jitter_seed(1))
        .await
        .unwrap()
}

/// Hole 1: lock for 10 s; two of three nodes stall; `extend(1 s)` fails for lack of a
/// quorum, but the stalled PEXPIREs land later. The guard must not go on claiming the old
/// 10 s deadline once the keys have expired by the shorter TTL.
async fn failed_shortening_extend(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 1, bug);
    let a = client(&cluster, QUARANTINE).await;
    let b = client(&cluster, QUARANTINE).await;
    let mut guard = a.lock("r", Duration::from_secs(10)).await.unwrap();
    cluster.node(1).pause();
    cluster.node(2).pause();
    let err = guard.extend(Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoQuorum, "{err}");
    // The stalled nodes apply the shorter TTL now.
    cluster.node(1).unpause();
    cluster.node(2).unpause();
    sleep(Duration::from_millis(1_200)).await;
    let taken = b.try_lock("r", Duration::from_secs(5)).await;
    assert!(
        taken.is_ok(),
        "the keys expired by the shorter TTL: {taken:?}"
    );
    if guard.is_valid() {
        return Err(format!(
            "A's guard claims {:?} of validity while B holds the lock",
            guard.validity()
        ));
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_failed_shortening_extend_still_shortens_the_guard() {
    holds_and_catches(failed_shortening_extend, Bug::ExtendKeepsLongerDeadline).await;
}

/// Hole 2: client C1 decides to initialise a new cluster and its call opening node 2
/// arrives late; meanwhile C0 seeds node 2 properly, A locks on nodes 0 and 2, and node 2
/// restarts empty. C1's late call must not make node 2 vote at once.
async fn late_seeding(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 2, bug);
    let start = Instant::now();
    // C1's third call to node 2 (opening it, after its state read and its claim for the
    // new cluster) arrives 12 s late.
    cluster.node(2).stall_call(3, Duration::from_secs(12));
    let c1 = {
        let cluster = cluster.clone();
        tokio::spawn(async move { client(&cluster, QUARANTINE).await })
    };
    sleep(Duration::from_millis(1)).await;
    // C0 finds nodes 0 and 1 seeded (by C1) and seeds node 2, which waits out its quarantine.
    let c0 = client(&cluster, QUARANTINE).await;
    sleep_until(start + QUARANTINE + Duration::from_millis(100)).await;
    // A holds the lock on nodes 0 and 2: node 1 loses A's request.
    let held = lock_without_node_1(&cluster, &c0, QUARANTINE).await;
    // Node 2 restarts without its data; C1's seeding of the first life arrives after that.
    sleep(Duration::from_millis(100)).await;
    cluster.node(2).wipe();
    sleep_until(start + Duration::from_millis(12_100)).await;
    let c1 = c1.await.unwrap();
    let second = c1.try_lock("r", Duration::from_secs(5)).await;
    if let Ok(b) = &second {
        return Err(two_holders(&held, b));
    }
    assert!(held.is_valid());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_late_seeding_cannot_lift_a_newer_quarantine() {
    holds_and_catches(late_seeding, Bug::StaleSeed).await;
}

/// Found by the simulation after hole 2 was closed: C0 and C1 start on a new cluster at
/// once and both read every node unseeded, but C1's read of node 2 arrives late, after C0
/// opened the cluster, A locked on nodes 0 and 2, and node 2 restarted empty. C1's
/// decision ("a new cluster") rests on reads that went stale, and must open nothing.
async fn stale_new_cluster(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 9, bug);
    // Node 2's second call, C1's state read, arrives a second late.
    cluster.node(2).stall_call(2, Duration::from_secs(1));
    let builds: Vec<_> = (0..2)
        .map(|_| {
            let cluster = cluster.clone();
            tokio::spawn(async move { client(&cluster, QUARANTINE).await })
        })
        .collect();
    let mut builds = builds.into_iter();
    let c0 = builds.next().unwrap().await.unwrap();
    let held = lock_without_node_1(&cluster, &c0, QUARANTINE).await;
    sleep(Duration::from_millis(500)).await;
    cluster.node(2).wipe();
    let c1 = builds.next().unwrap().await.unwrap();
    let second = c1.try_lock("r", Duration::from_secs(5)).await;
    if let Ok(b) = &second {
        return Err(two_holders(&held, b));
    }
    assert!(held.is_valid());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_new_cluster_decided_from_stale_reads_opens_nothing() {
    holds_and_catches(stale_new_cluster, Bug::StaleSeed).await;
}

/// Hole 3: a TTL longer than the restart quarantine would let a node that restarted empty
/// vote again while the lock is still valid; it is refused, for a lock and an extension.
#[tokio::test(start_paused = true)]
async fn a_ttl_longer_than_the_quarantine_is_refused() {
    let cluster = SimCluster::new(3, 3);
    let locks = client(&cluster, Duration::from_secs(30)).await;
    let err = locks
        .lock("r", Duration::from_secs(60))
        .await
        .expect_err("a 60 s lock with a 30 s quarantine");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("restart_quarantine"), "{err}");
    let mut guard = locks.lock("r", Duration::from_secs(30)).await.unwrap();
    let err = guard.extend(Duration::from_secs(31)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    guard.release().await.unwrap();
}

/// Hole 3 planted: a 60 s lock with a 30 s quarantine; node 2 restarts empty; after its
/// quarantine it votes B in while A's lock is still valid.
#[tokio::test(start_paused = true)]
async fn a_ttl_longer_than_the_quarantine_gives_two_holders_when_planted() {
    let cluster = planted(3, 3, Some(Bug::TtlAboveQuarantine));
    let a = client(&cluster, Duration::from_secs(30)).await;
    let b = client(&cluster, Duration::from_secs(30)).await;
    let held = lock_without_node_1(&cluster, &a, Duration::from_secs(60)).await;
    cluster.node(2).wipe();
    // B's first try makes node 2 notice; it is seeded and waits out 30 s.
    assert!(b.try_lock("r", Duration::from_secs(5)).await.is_err());
    sleep(Duration::from_secs(31)).await;
    let second = b.try_lock("r", Duration::from_secs(5)).await;
    assert!(
        second.is_ok() && held.is_valid(),
        "with the hole planted back, B gets the lock while A's is valid"
    );
}

/// Hole 4: a node that restarts with an older copy of its data (an RDB snapshot) keeps its
/// `ready` marker but misses A's key. It must be found restarted and sit out its quarantine
/// instead of voting B in, and its fence counters must be raised before it counts again.
async fn restored_snapshot(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 4, bug);
    let a = client(&cluster, QUARANTINE).await;
    let b = client(&cluster, QUARANTINE).await;
    // B has talked to every node before the restart.
    b.try_lock("warm", Duration::from_secs(1))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let snapshot = cluster.node(2).snapshot();
    cluster.node(1).set_drop_rate(1.0);
    let held = a.lock("r", Duration::from_secs(10)).await.unwrap();
    let token = held.fencing_token().unwrap();
    cluster.node(1).set_drop_rate(0.0);
    cluster.node(2).restore(&snapshot);
    assert_eq!(cluster.node(2).holds("r"), None, "the snapshot predates A");

    let second = b.try_lock("r", Duration::from_secs(5)).await;
    if let Ok(g) = &second {
        return Err(format!(
            "two holders: A valid for {:?} with token {token}, B with token {:?}",
            held.validity(),
            g.fencing_token()
        ));
    }
    assert!(held.is_valid());
    drop(second);
    held.release().await.unwrap_err();
    // After the quarantine node 2 votes again, with counters that know A's token.
    sleep(QUARANTINE).await;
    cluster.node(0).set_drop_rate(1.0);
    let after = b.try_lock("r", Duration::from_secs(5)).await.unwrap();
    assert!(after.fencing_token().unwrap() > token);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_node_restored_from_an_older_snapshot_is_quarantined_and_reseeded() {
    holds_and_catches(restored_snapshot, Bug::NoRestartDetection).await;
}

/// Hole 5: a TTL beyond the maximum is refused instead of being truncated on the wire, and
/// `Duration::MAX` anywhere is an error or "never", not a panic.
#[tokio::test(start_paused = true)]
async fn huge_durations_are_refused_or_saturate_never_panic() {
    let cluster = SimCluster::new(3, 5);
    let locks = client(&cluster, MAX_TTL).await;
    for ttl in [
        Duration::MAX,
        MAX_TTL + Duration::from_millis(1),
        Duration::from_millis(u64::MAX) + Duration::from_millis(385),
    ] {
        let err = locks.lock("r", ttl).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{ttl:?}: {err}");
    }
    let mut guard = locks.lock("r", Duration::from_secs(3)).await.unwrap();
    assert_eq!(
        guard.extend(Duration::MAX).await.unwrap_err().kind(),
        ErrorKind::Config
    );
    // A hold limit of `Duration::MAX` means no limit.
    let watched = guard.auto_extend_with(WatchdogConfig::default().max_hold(Duration::MAX));
    sleep(Duration::from_secs(10)).await;
    assert_eq!(watched.health().state(), LockState::Held);
    watched.stop().await.release().await.unwrap();
    // A retry policy of `Duration::MAX` waits "forever" for a local holder, not a panic.
    let holder = locks.lock("r", Duration::from_secs(3)).await.unwrap();
    let patient = RetryPolicy::new(3, Duration::MAX, Duration::MAX);
    let waiting = tokio::time::timeout(
        Duration::from_secs(1),
        locks.lock_with_retry(&["r"], Duration::from_secs(3), patient),
    )
    .await;
    assert!(waiting.is_err(), "still waiting for the local holder");
    holder.release().await.unwrap();
    let err = Redlock::builder()
        .restart_quarantine(Duration::MAX)
        .build_simulated(&cluster)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// Hole 6: a health handle whose watchdog stopped (stop, release, drop) must not keep
/// saying `Held`: a sub-task holding a clone would go on working without the lock.
async fn health_after_stop(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 6, bug);
    let locks = client(&cluster, QUARANTINE).await;

    let watched = locks
        .lock("r", Duration::from_secs(3))
        .await
        .unwrap()
        .auto_extend();
    let health = watched.health();
    assert_eq!(health.state(), LockState::Held);
    watched.stop().await.release().await.unwrap();
    if health.state() != LockState::Lost(LostReason::Stopped) {
        return Err(format!(
            "released, yet the handle says {:?}",
            health.state()
        ));
    }
    assert_eq!(health.lost().await, LostReason::Stopped);

    let watched = locks
        .lock("r", Duration::from_secs(3))
        .await
        .unwrap()
        .auto_extend();
    let health = watched.health();
    drop(watched);
    let ended = tokio::time::timeout(Duration::from_secs(1), health.lost()).await;
    assert_eq!(ended, Ok(LostReason::Stopped));
    assert!(health.is_lost());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_health_handle_ends_lost_when_its_watchdog_stops() {
    holds_and_catches(health_after_stop, Bug::HealthNeverEnds).await;
}

/// Hole 7: a watchdog started with less than a third of the TTL left must extend at once,
/// and, when that fails, report at risk before the lock expires.
async fn late_watchdog(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 7, bug);
    let locks = client(&cluster, QUARANTINE).await;
    let ttl = Duration::from_secs(3);

    // Healthy nodes: the first extension comes at once, before the lock runs out.
    let guard = locks.lock("r", ttl).await.unwrap();
    sleep(Duration::from_millis(2_500)).await;
    let deadline = Instant::now() + guard.validity();
    let watched = guard.auto_extend();
    sleep_until(deadline + Duration::from_millis(100)).await;
    let guard = watched.stop().await;
    if !guard.is_valid() {
        return Err("the watchdog let the lock expire before its first extension".into());
    }
    guard.release().await.unwrap();

    // Unreachable nodes: at risk before expiry, lost after.
    let guard = locks.lock("r", ttl).await.unwrap();
    sleep(Duration::from_millis(2_500)).await;
    let deadline = Instant::now() + guard.validity();
    for i in 0..3 {
        cluster.node(i).set_drop_rate(1.0);
    }
    let watched = guard.auto_extend();
    let health = watched.health();
    let first = health.at_risk().await;
    if first != LockState::AtRisk || Instant::now() >= deadline {
        return Err(format!("first reported {first:?}, at or after expiry"));
    }
    assert_eq!(health.lost().await, LostReason::Expired);
    drop(watched);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_watchdog_started_late_extends_at_once_and_warns_before_expiry() {
    holds_and_catches(late_watchdog, Bug::WatchdogIgnoresValidity).await;
}

/// The drift allowance: every node's clock runs 0.99 % fast, within the 1 % drift factor,
/// so keys expire a little before the TTL the holder counts. B locks as soon as they do; A
/// must not be claiming validity then.
async fn fast_node_clocks(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 10, bug);
    for i in 0..3 {
        cluster.node(i).set_clock_rate(1.0099);
    }
    let a = client(&cluster, QUARANTINE).await;
    let b = client(&cluster, QUARANTINE).await;
    let held = a.lock("r", QUARANTINE).await.unwrap();
    loop {
        sleep(Duration::from_millis(1)).await;
        if let Ok(second) = b.try_lock("r", Duration::from_secs(1)).await {
            if held.is_valid() {
                return Err(format!(
                    "B holds the lock while A's guard claims {:?} of validity",
                    held.validity()
                ));
            }
            second.release().await.unwrap();
            return Ok(());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_drift_allowance_covers_node_clocks_that_run_fast() {
    holds_and_catches(fast_node_clocks, Bug::NoDrift).await;
}

/// Without a quarantine, a node that restarted empty votes B in at once while A's lock,
/// granted by that node, is still valid.
async fn restart_without_quarantine(bug: Option<Bug>) -> Result<(), String> {
    let cluster = planted(3, 11, bug);
    let a = client(&cluster, QUARANTINE).await;
    let b = client(&cluster, QUARANTINE).await;
    let held = lock_without_node_1(&cluster, &a, QUARANTINE).await;
    cluster.node(2).wipe();
    // The first try finds node 2 empty and has it seeded; the second comes after.
    for _ in 0..2 {
        if let Ok(second) = b.try_lock("r", Duration::from_secs(1)).await {
            return Err(format!(
                "two holders: A valid for {:?}, B with token {:?}",
                held.validity(),
                second.fencing_token()
            ));
        }
        sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_node_restarted_empty_sits_out_its_quarantine() {
    holds_and_catches(restart_without_quarantine, Bug::NoQuarantine).await;
}

/// Smaller: a resource may not collide with the crate's own keys.
#[tokio::test(start_paused = true)]
async fn resources_in_the_crates_own_key_space_are_refused() {
    let cluster = SimCluster::new(3, 8);
    let locks = client(&cluster, QUARANTINE).await;
    let err = locks
        .lock("fencelock:node", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("fencelock:"), "{err}");
}
