//! Fencing tokens on real nodes: strictly increasing across clients and resources, written
//! back to a quorum when the nodes' counters disagree.

mod support;

use std::time::Duration;

use fencelock::Redlock;
use redis::AsyncCommands;
use support::{Cluster, TEST_NODE_TIMEOUT};

async fn fenced(cluster: &Cluster) -> Redlock {
    Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        .fencing(true)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_across_clients_and_resources() {
    let cluster = Cluster::start(3).await;
    let clients = [
        fenced(&cluster).await,
        fenced(&cluster).await,
        fenced(&cluster).await,
    ];
    let mut last = 0;
    for i in 0..30 {
        let guard = clients[i % 3]
            .lock("fence:a", Duration::from_secs(5))
            .await
            .unwrap();
        let token = guard.fencing_token().expect("fencing is on");
        assert!(token > last, "token {token} after {last}");
        last = token;
        guard.release().await.unwrap();
    }
    // A multi-resource lock outranks every earlier holder of each of its resources.
    let b = clients[0]
        .lock("fence:b", Duration::from_secs(5))
        .await
        .unwrap();
    let b_token = b.fencing_token().unwrap();
    b.release().await.unwrap();
    let both = clients[1]
        .lock_many(&["fence:a", "fence:b"], Duration::from_secs(5))
        .await
        .unwrap();
    let both_token = both.fencing_token().unwrap();
    assert!(both_token > last && both_token > b_token);
    both.release().await.unwrap();
    let a = clients[2]
        .lock("fence:a", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(a.fencing_token().unwrap() > both_token);
    a.release().await.unwrap();

    // Without fencing there is no token.
    let plain = cluster.client().await;
    let g = plain
        .lock("fence:plain", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(g.fencing_token(), None);
    g.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreeing_counters_are_written_back_before_the_token_is_handed_out() {
    let cluster = Cluster::start(3).await;
    let locks = fenced(&cluster).await;
    let first = locks
        .lock("fence:wb", Duration::from_secs(5))
        .await
        .unwrap();
    first.release().await.unwrap();
    // Node 0 alone saw later acquisitions (as if the others had been partitioned away).
    let counter = "fencelock:fence:{fence:wb}";
    let mut c0 = cluster.conn(0).await;
    let _: () = c0.set(counter, 100).await.unwrap();

    let guard = locks
        .lock("fence:wb", Duration::from_secs(5))
        .await
        .unwrap();
    let token = guard.fencing_token().unwrap();
    guard.release().await.unwrap();
    // Whichever quorum answered, the token outranks what any node had, and a quorum now
    // stores it: with node 0 gone, the next token is still larger.
    let mut stored = 0;
    for i in 0..3 {
        let mut c = cluster.conn(i).await;
        let v: Option<u64> = c.get(counter).await.unwrap();
        stored += usize::from(v.unwrap_or(0) >= token);
    }
    assert!(stored >= 2, "token {token} is on {stored} node(s)");
    cluster.stop(0).await;
    let next = locks
        .lock("fence:wb", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(next.fencing_token().unwrap() > token);
    assert!(token >= 2, "token {token} ignores the fresher counters");
    next.release().await.unwrap();
    cluster.start_again(0).await;
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}
