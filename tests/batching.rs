//! Batching: the calls that concurrent tasks make to a node while it is busy go out as one
//! command, and one call that fails in a batch does not fail the others.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use redis::AsyncCommands;
use support::Cluster;

const TTL: Duration = Duration::from_secs(30);

/// EVALSHA commands node `i` has run so far.
async fn evalsha_calls(cluster: &Cluster, i: usize) -> u64 {
    let mut c = cluster.conn(i).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

// One thread: the 64 tasks all make their calls before any driver runs, which makes the
// batching deterministic.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_calls_share_one_command_per_node() {
    let cluster = Cluster::start(3).await;
    let locks = support::fenced_client(&cluster.urls()).await;
    // Warm up: the first round seeds the new nodes.
    locks
        .lock("batch:warm", TTL)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let before = join_all((0..3).map(|i| evalsha_calls(&cluster, i))).await;

    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(&format!("batch:{t}"), TTL).await.unwrap() })
        })
        .collect();
    let guards: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Every lock is real: a token from its resource's counter, and a quorum holding it.
    assert!(guards.iter().all(|g| g.fencing_token() >= Some(1)));
    for t in 0..64 {
        assert!(cluster.holders(&format!("batch:{t}")).await >= locks.quorum());
    }
    let releases: Vec<_> = guards
        .into_iter()
        .map(|g| tokio::spawn(g.release()))
        .collect();
    for released in join_all(releases).await {
        released.unwrap().unwrap();
    }

    let after = join_all((0..3).map(|i| evalsha_calls(&cluster, i))).await;
    for i in 0..3 {
        // 64 acquisitions and 64 releases: a handful of commands, not 128.
        let commands = after[i] - before[i];
        assert!(
            commands <= 16,
            "node {i} ran {commands} EVALSHA commands for 128 calls: not batched"
        );
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_failing_call_does_not_fail_its_batch() {
    let cluster = Cluster::start(3).await;
    let locks = cluster.client().await;
    let guards = join_all((0..16).map(|t| {
        let locks = locks.clone();
        async move { locks.lock(&format!("iso:{t}"), TTL).await.unwrap() }
    }))
    .await;
    // Someone overwrites one lock key with a hash on every node: our release of it now
    // fails there with WRONGTYPE, in the same batch as the 15 others.
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let _: () = c.del("iso:3").await.unwrap();
        let _: () = c.hset("iso:3", "f", "v").await.unwrap();
    }
    let released = join_all(guards.into_iter().map(|g| g.release())).await;
    for (t, r) in released.iter().enumerate() {
        if t == 3 {
            assert!(r.is_err(), "the release of the overwritten key must fail");
        } else {
            assert!(r.is_ok(), "release {t} failed with its neighbour: {r:?}");
        }
    }
    for i in 0..3 {
        assert_eq!(cluster.keys(i).await, ["iso:3"], "node {i}");
        let mut c = cluster.conn(i).await;
        let _: () = c.del("iso:3").await.unwrap();
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

/// One batch mixing calls of different shapes (single-key releases with one argument,
/// three-key fenced acquisitions with seven keys and four arguments): each call sees only
/// its own keys and arguments, whatever ran before it in the batch.
#[tokio::test(flavor = "current_thread")]
async fn calls_of_different_shapes_share_a_batch() {
    let cluster = Cluster::start(3).await;
    let locks = support::fenced_client(&cluster.urls()).await;
    let singles = join_all((0..16).map(|t| {
        let locks = locks.clone();
        async move { locks.lock(&format!("shape:one:{t}"), TTL).await.unwrap() }
    }))
    .await;
    let before = join_all((0..3).map(|i| evalsha_calls(&cluster, i))).await;

    // Interleaved, and all queued before any driver runs: one batch per node.
    let mut releases = Vec::new();
    let mut acquisitions = Vec::new();
    for (t, single) in singles.into_iter().enumerate() {
        releases.push(tokio::spawn(single.release()));
        let locks = locks.clone();
        acquisitions.push(tokio::spawn(async move {
            let names = [0, 1, 2].map(|j| format!("shape:many:{t}:{j}"));
            let resources: Vec<&str> = names.iter().map(String::as_str).collect();
            locks.lock_many(&resources, TTL).await.unwrap()
        }));
    }
    for released in join_all(releases).await {
        released.unwrap().unwrap();
    }
    let guards: Vec<_> = join_all(acquisitions)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let after = join_all((0..3).map(|i| evalsha_calls(&cluster, i))).await;
    for i in 0..3 {
        assert!(
            after[i] - before[i] <= 4,
            "node {i}: {} commands, so the calls were not batched together",
            after[i] - before[i]
        );
    }

    // Exactly the acquisitions' keys are held, each with its own value, and the singles are
    // gone.
    let mut expected: Vec<String> = (0..16)
        .flat_map(|t| [0, 1, 2].map(|j| format!("shape:many:{t}:{j}")))
        .collect();
    expected.sort();
    for i in 0..3 {
        assert_eq!(cluster.keys(i).await, expected, "node {i}");
    }
    for g in &guards {
        assert!(g.fencing_token() >= Some(1));
    }
    for released in join_all(guards.into_iter().map(|g| g.release())).await {
        released.unwrap();
    }
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
