//! An unreachable lock quorum: the runner does not dead-letter or spend attempts; it puts
//! the job back, keeps serving, and runs it once the nodes answer again.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::{NewJob, Noop, Queue, Registry, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, wait_until};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_out_a_lost_quorum_without_spending_attempts() {
    let cluster = Cluster::start(4).await;
    let urls = cluster.urls();
    let queue = Queue::connect(&urls[3], "nq", "test").await.unwrap();
    let runner = Runner::builder(
        Queue::connect(&urls[3], "nq", "runner").await.unwrap(),
        fenced_client(&urls[..3]).await,
        Registry::new().with("noop", Noop),
    )
    .max_attempts(1)
    .build()
    .unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await })
    };

    // Two of three lock nodes freeze: no quorum.
    cluster.pause(0).await;
    cluster.pause(1).await;
    queue
        .enqueue(&NewJob::new("noop", "r:1", json!({})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = queue.stats().await.unwrap();
    assert_eq!(
        st.dead, 0,
        "an unreachable quorum is not the job's fault: {st:?}"
    );
    assert_eq!(
        st.depth + st.pending + st.delayed,
        1,
        "the job is kept: {st:?}"
    );

    cluster.unpause(0).await;
    cluster.unpause(1).await;
    wait_until(
        "the job to run once the quorum is back",
        Duration::from_secs(20),
        || async {
            let st = queue.stats().await.unwrap();
            st.depth == 0 && st.pending == 0 && st.delayed == 0
        },
    )
    .await;
    stop.cancel();
    let report = task.await.unwrap();
    assert_eq!((report.done, report.dead), (1, 0), "{report:?}");
    assert!(report.requeued >= 1, "{report:?}");
    cluster
        .assert_no_keys_on(&[0, 1, 2], Duration::from_secs(2))
        .await;
    cluster.teardown().await;
}
