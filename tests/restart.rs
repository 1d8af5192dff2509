//! Restart awareness: a node restarted empty while a lock is held does not let a second
//! client take that lock; it is seeded and sits out its quarantine. A node with AOF keeps
//! its state and needs no quarantine.

mod support;

use std::time::Duration;

use fencelock::{Error, ErrorKind, NodeFailure, Redlock, RetryPolicy};
use redis::AsyncCommands;
use support::{Cluster, TEST_NODE_TIMEOUT};

async fn client(cluster: &Cluster, quarantine: Duration) -> Redlock {
    Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        .fencing(true)
        .restart_quarantine(quarantine)
        .retry(RetryPolicy::never())
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restarted_empty_does_not_let_a_second_holder_in() {
    let cluster = Cluster::start(5).await;
    // Long enough for the restart below; the TTL may not exceed it.
    let quarantine = Duration::from_secs(8);
    let a = client(&cluster, quarantine).await;
    // A holds the lock on exactly nodes 0, 1 and 2.
    cluster.pause(3).await;
    cluster.pause(4).await;
    let held = a.lock("restart:r", quarantine).await.unwrap();
    let token = held.fencing_token().unwrap();
    cluster.unpause(3).await;
    cluster.unpause(4).await;
    for i in [3, 4] {
        // The SETs queued while they were paused land now; take them away so that A holds
        // exactly a bare quorum.
        let mut c = cluster.conn(i).await;
        let _: () = c.del("restart:r").await.unwrap();
    }
    // Node 2 loses its data.
    cluster.restart_empty(2).await;

    // Without restart awareness B would get nodes 2, 3 and 4: a second holder.
    let b = client(&cluster, quarantine).await;
    let err = b
        .try_lock("restart:r", Duration::from_secs(5))
        .await
        .expect_err("node 2 must not vote");
    // Nodes 0 and 1 are A's, 3 and 4 grant, node 2 sits out: 2 of the 3 needed.
    assert_eq!(err.kind(), ErrorKind::Contended, "{err}");
    assert!(held.is_valid());

    // Node 2 has been seeded from the others (it knows A's token) and waits out its
    // quarantine on its own clock.
    let mut c2 = cluster.conn(2).await;
    let state: (Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg("fencelock:node")
        .arg("seeded")
        .arg("vote_after")
        .query_async(&mut c2)
        .await
        .unwrap();
    assert_eq!(state.0.as_deref(), Some("1"), "node 2 was seeded");
    // Its high-water mark (and floor) is at least A's token and the tokens A's round
    // reserved after it, as the counter on the nodes that granted A holds.
    let high: Option<u64> = c2.get("fencelock:fence:high").await.unwrap();
    let floor: Option<u64> = c2.get("fencelock:fence:floor").await.unwrap();
    let granted: Option<u64> = cluster
        .conn(0)
        .await
        .get("fencelock:fence:{restart:r}")
        .await
        .unwrap();
    assert!(granted >= Some(token));
    assert!(
        high >= granted,
        "node 2's high-water mark {high:?} is below {granted:?}"
    );
    assert_eq!(floor, high, "node 2's floor is its seeded high-water mark");
    let err = b.try_lock("restart:other", Duration::from_secs(5)).await;
    if let Err(Error::NoQuorum { failures, .. }) = &err {
        panic!("nodes 0, 1, 3, 4 are a quorum: {failures:?}");
    }
    err.unwrap().release().await.unwrap();

    // A's lock now stands on two nodes, short of a quorum, and its release says so.
    let err = held.release().await.expect_err("node 2 lost A's key");
    assert_eq!(err.kind(), ErrorKind::Lost);
    // After the quarantine node 2 votes again: with two others gone it is needed.
    tokio::time::sleep(quarantine).await;
    cluster.pause(0).await;
    cluster.pause(1).await;
    let after = b
        .try_lock("restart:r", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(after.fencing_token().unwrap() > token);
    after.release().await.unwrap();
    cluster.unpause(0).await;
    cluster.unpause(1).await;
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_aof_keeps_its_state_and_needs_no_quarantine() {
    let cluster = Cluster::start_with_aof(3).await;
    let quarantine = Duration::from_secs(60);
    let a = client(&cluster, quarantine).await;
    let held = a.lock("aof:r", Duration::from_secs(20)).await.unwrap();
    cluster.stop(1).await;
    cluster.start_again(1).await;
    // Node 1 still holds A's key after the restart.
    let mut c1 = cluster.conn(1).await;
    let v: Option<String> = c1.get("aof:r").await.unwrap();
    assert_eq!(v.as_deref(), Some(held.value()));
    held.release().await.unwrap();
    // And it votes at once: with node 0 gone, nodes 1 and 2 are the quorum.
    cluster.stop(0).await;
    let b = client(&cluster, quarantine).await;
    let guard = b.try_lock("aof:r", Duration::from_secs(5)).await;
    if let Err(e) = &guard {
        assert!(
            !matches!(e, Error::NoQuorum { failures, .. } if failures.iter().any(|f| matches!(f, NodeFailure::Restarted { .. }))),
            "node 1 was quarantined: {e}"
        );
    }
    guard.unwrap().release().await.unwrap();
    cluster.start_again(0).await;
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

/// A node restored from an older RDB snapshot keeps its `ready` marker but not A's key: it
/// is found restarted by its run_id on the first new connection, and sits out its
/// quarantine instead of voting B in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restored_from_an_rdb_snapshot_does_not_let_a_second_holder_in() {
    let cluster = Cluster::start(3).await;
    let quarantine = Duration::from_secs(30);
    let a = client(&cluster, quarantine).await;
    // The snapshot: node 2 ready and verified, knowing nothing of A's lock.
    let mut c2 = cluster.conn(2).await;
    let _: () = redis::cmd("SAVE").query_async(&mut c2).await.unwrap();
    // A holds the lock on exactly nodes 0 and 2.
    cluster.pause(1).await;
    let held = a.lock("rdb:r", Duration::from_secs(30)).await.unwrap();
    cluster.unpause(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: () = cluster.conn(1).await.del("rdb:r").await.unwrap();
    // Node 2 restarts and loads the snapshot.
    cluster.stop(2).await;
    cluster.start_again(2).await;
    let mut c2 = cluster.conn(2).await;
    let ready: bool = c2.exists("fencelock:node:ready").await.unwrap();
    let key: bool = c2.exists("rdb:r").await.unwrap();
    assert!(
        ready && !key,
        "the snapshot has the ready marker and not A's key"
    );

    let b = client(&cluster, quarantine).await;
    let second = b.try_lock("rdb:r", Duration::from_secs(5)).await;
    if let Ok(g) = &second {
        panic!(
            "two holders: A valid for {:?}, B with token {:?}",
            held.validity(),
            g.fencing_token()
        );
    }
    assert!(held.is_valid());
    let state: (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg("fencelock:node")
        .arg("seeded")
        .arg("boot")
        .query_async(&mut c2)
        .await
        .unwrap();
    let run_id: String = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut c2)
        .await
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        state.1.as_deref(),
        Some(run_id.as_str()),
        "verified under the new run"
    );
    assert_eq!(
        state.0.as_deref(),
        Some("1"),
        "re-seeded from nodes 0 and 1"
    );
    drop(second);
    held.release().await.unwrap_err();
    cluster.teardown().await;
}

/// Eviction loses keys with no restart at all: a node whose `maxmemory-policy` may evict
/// is refused by name, unless the client explicitly accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_may_evict_keys_is_refused_unless_allowed() {
    let cluster = Cluster::start(3).await;
    let mut c1 = cluster.conn(1).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut c1)
        .await
        .unwrap();
    let err = Redlock::builder()
        .nodes(cluster.urls())
        .build()
        .await
        .expect_err("an evicting node");
    assert_eq!(err.kind(), ErrorKind::Config);
    let msg = err.to_string();
    assert!(
        msg.starts_with("invalid `nodes[1]`") && msg.contains("maxmemory-policy is `allkeys-lru`"),
        "{msg}"
    );
    let allowed = Redlock::builder()
        .nodes(cluster.urls())
        .allow_eviction(true)
        .build()
        .await
        .unwrap();
    allowed
        .lock("evict:r", Duration::from_secs(1))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    cluster.teardown().await;
}

/// `SCRIPT FLUSH` on every node under a connected client: the calls that meet NOSCRIPT did
/// not run and fail like a broken connection; the client reconnects (which loads the
/// scripts again) and its retry gets the lock, with nothing left behind after release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_script_cache_was_flushed_are_reconnected_and_lock_again() {
    let cluster = Cluster::start(3).await;
    // The default retry policy: a retry after a failed round is what recovers.
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        .build()
        .await
        .unwrap();
    let guard = locks
        .lock("flush:before", Duration::from_secs(5))
        .await
        .unwrap();
    guard.release().await.unwrap();
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let guard = locks
        .lock("flush:after", Duration::from_secs(5))
        .await
        .expect("the retry after the flush gets the lock");
    cluster.wait_all_hold("flush:after", guard.value()).await;
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
