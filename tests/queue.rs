//! The job queue on a real Redis: at-least-once delivery with ack, reclaim of stalled
//! entries, retry through the delayed set, and dead letters written before the ack.

mod support;

use std::time::Duration;

use job_runner::{NewJob, Queue};
use redis::AsyncCommands;
use serde_json::json;
use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fetch_ack() {
    let cluster = Cluster::start(1).await;
    let url = cluster.urls()[0].clone();
    let queue = Queue::connect(&url, "q1", "worker-a").await.unwrap();
    let id = queue
        .enqueue(&NewJob::new(
            "payment",
            "order:42",
            json!({"order_id": 42, "amount_cents": 1999}),
        ))
        .await
        .unwrap();
    let got = queue.fetch(10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.len(), 1);
    let job = got[0].job.as_ref().unwrap();
    assert_eq!(
        (job.id.as_str(), job.kind.as_str(), job.resource.as_str()),
        (id.as_str(), "payment", "order:42")
    );
    assert_eq!(job.payload["amount_cents"], 1999);
    assert_eq!(job.attempt, 0);
    assert_eq!(queue.pending().await.unwrap(), 1);
    queue.ack(&got[0].entry_id).await.unwrap();
    assert_eq!(queue.pending().await.unwrap(), 0);
    // Nothing more to deliver.
    assert!(
        queue
            .fetch(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_go_to_dead_letters_with_a_reason() {
    let cluster = Cluster::start(1).await;
    let url = cluster.urls()[0].clone();
    let queue = Queue::connect(&url, "q2", "worker-a").await.unwrap();
    let mut c = cluster.conn(0).await;
    let _: String = c
        .xadd("q2:jobs", "*", &[("job", "this is not json")])
        .await
        .unwrap();
    let got = queue.fetch(10, Duration::from_millis(100)).await.unwrap();
    let reason = got[0].job.as_ref().unwrap_err().reason.clone();
    assert!(reason.starts_with("not a job:"), "{reason}");
    queue.dead_letter(&got[0], &reason).await.unwrap();
    assert_eq!(queue.pending().await.unwrap(), 0);
    assert_eq!(queue.dead().await.unwrap(), 1);
    let dead: redis::streams::StreamRangeReply = c.xrange_all("q2:dead").await.unwrap();
    let entry = &dead.ids[0];
    assert_eq!(
        entry.get::<String>("job").as_deref(),
        Some("this is not json")
    );
    assert_eq!(
        entry.get::<String>("reason").as_deref(),
        Some(reason.as_str())
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_goes_through_the_delayed_set() {
    let cluster = Cluster::start(1).await;
    let url = cluster.urls()[0].clone();
    let queue = Queue::connect(&url, "q3", "worker-a").await.unwrap();
    queue
        .enqueue(&NewJob::new("exec", "report", json!(null)))
        .await
        .unwrap();
    let got = queue.fetch(1, Duration::from_millis(100)).await.unwrap();
    let mut job = got[0].job.clone().unwrap();
    job.attempt += 1;
    queue
        .retry_later(&got[0].entry_id, &job, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(
        (
            queue.pending().await.unwrap(),
            queue.delayed().await.unwrap()
        ),
        (0, 1)
    );
    // Not due yet.
    assert_eq!(queue.promote_due(10).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(queue.promote_due(10).await.unwrap(), 1);
    assert_eq!(queue.delayed().await.unwrap(), 0);
    let again = queue.fetch(1, Duration::from_millis(100)).await.unwrap();
    let retried = again[0].job.as_ref().unwrap();
    assert_eq!((retried.id.as_str(), retried.attempt), (job.id.as_str(), 1));
    queue.ack(&again[0].entry_id).await.unwrap();
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_entries_are_reclaimed_after_the_visibility_timeout() {
    let cluster = Cluster::start(1).await;
    let url = cluster.urls()[0].clone();
    let crashed = Queue::connect(&url, "q4", "worker-crashed").await.unwrap();
    let rescuer = Queue::connect(&url, "q4", "worker-rescuer").await.unwrap();
    crashed
        .enqueue(&NewJob::new("payment", "order:7", json!({})))
        .await
        .unwrap();
    let taken = crashed.fetch(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(taken.len(), 1);
    // The first consumer never acks. Before the visibility timeout nobody else gets it.
    let visibility = Duration::from_millis(300);
    assert!(rescuer.reclaim(visibility, 10).await.unwrap().is_empty());
    assert!(
        rescuer
            .fetch(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(visibility + Duration::from_millis(50)).await;
    let reclaimed = rescuer.reclaim(visibility, 10).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].entry_id, taken[0].entry_id);
    rescuer.ack(&reclaimed[0].entry_id).await.unwrap();
    assert_eq!(rescuer.pending().await.unwrap(), 0);
    cluster.teardown().await;
}
