//! The job queue on a real Redis: at-least-once delivery with ack, reclaim of stalled
//! entries, retry through the delayed set, and dead letters written before the ack.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::{NewJob, Queue};
use redis::AsyncCommands;
use serde_json::json;
use support::Cluster;

/// A one-node cluster, and the queue `name` on it read as each of `consumers`.
async fn queues<const N: usize>(name: &str, consumers: [&str; N]) -> (Cluster, [Queue; N]) {
    let cluster = Cluster::start(1).await;
    let url = cluster.urls()[0].clone();
    let mut queues = Vec::with_capacity(N);
    for consumer in consumers {
        queues.push(Queue::connect(&url, name, consumer).await.unwrap());
    }
    let queues: [Queue; N] = queues.try_into().expect("one queue per consumer");
    (cluster, queues)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fetch_ack() {
    let (cluster, [queue]) = queues("q1", ["worker-a"]).await;
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
    let (cluster, [queue]) = queues("q2", ["worker-a"]).await;
    let mut c = cluster.conn(0).await;
    let _: String = c
        .xadd("q2:jobs", "*", &[("job", "this is not json")])
        .await
        .unwrap();
    let got = queue.fetch(10, Duration::from_millis(100)).await.unwrap();
    let reason = got[0].job.as_ref().unwrap_err().reason.clone();
    assert!(reason.starts_with("not a job:"), "{reason}");
    assert!(queue.dead_letter(&got[0], &reason).await.unwrap());
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
    let (cluster, [queue]) = queues("q3", ["worker-a"]).await;
    queue
        .enqueue(&NewJob::new("exec", "report", json!(null)))
        .await
        .unwrap();
    let got = queue.fetch(1, Duration::from_millis(100)).await.unwrap();
    let mut job = got[0].job.clone().unwrap();
    job.attempt += 1;
    assert!(
        queue
            .retry_later(&got[0].entry_id, &job, Duration::from_millis(200))
            .await
            .unwrap()
    );
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
    let (cluster, [crashed, rescuer]) = queues("q4", ["worker-crashed", "worker-rescuer"]).await;
    crashed
        .enqueue(&NewJob::new("payment", "order:7", json!({})))
        .await
        .unwrap();
    let taken = crashed.fetch(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(taken.len(), 1);
    // The first consumer never acks. Before the visibility timeout nobody else gets it.
    let visibility = Duration::from_millis(300);
    assert_eq!(taken[0].deliveries, 1);
    assert!(
        rescuer
            .reclaim(visibility, 10, "0-0")
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    assert!(
        rescuer
            .fetch(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(visibility + Duration::from_millis(50)).await;
    let reclaimed = rescuer
        .reclaim(visibility, 10, "0-0")
        .await
        .unwrap()
        .entries;
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].entry_id, taken[0].entry_id);
    // Handed out twice now: the count a runner uses to stop a job that keeps crashing
    // its runners from being reclaimed forever.
    assert_eq!(reclaimed[0].deliveries, 2);
    rescuer.ack(&reclaimed[0].entry_id).await.unwrap();
    assert_eq!(rescuer.pending().await.unwrap(), 0);
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_cannot_retire_an_entry_another_one_reclaimed() {
    let (cluster, [stalled, rescuer]) = queues("q5", ["worker-stalled", "worker-rescuer"]).await;
    stalled
        .enqueue(&NewJob::new("payment", "order:9", json!({})))
        .await
        .unwrap();
    let taken = stalled.fetch(1, Duration::from_millis(100)).await.unwrap();
    let entry = &taken[0];
    // While it is still the stalled consumer's, touching keeps it.
    assert!(stalled.touch(&[&entry.entry_id]).await.unwrap().is_empty());
    let visibility = Duration::from_millis(200);
    tokio::time::sleep(visibility + Duration::from_millis(50)).await;
    let reclaimed = rescuer
        .reclaim(visibility, 10, "0-0")
        .await
        .unwrap()
        .entries;
    assert_eq!(reclaimed.len(), 1);

    // The stalled consumer wakes up: its touch reports the loss instead of taking the
    // entry back, and its retry and dead letter write nothing.
    assert_eq!(
        stalled.touch(&[&entry.entry_id]).await.unwrap(),
        vec![entry.entry_id.clone()]
    );
    let job = entry.job.clone().unwrap();
    assert!(
        !stalled
            .retry_later(&entry.entry_id, &job, Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(!stalled.dead_letter(entry, "stale").await.unwrap());
    assert_eq!(
        (
            stalled.delayed().await.unwrap(),
            stalled.dead().await.unwrap()
        ),
        (0, 0),
        "the stalled consumer wrote a second copy of the job"
    );
    // The entry is still pending, and still the rescuer's: its retry goes through.
    assert_eq!(rescuer.pending().await.unwrap(), 1);
    assert!(
        rescuer
            .retry_later(&entry.entry_id, &job, Duration::ZERO)
            .await
            .unwrap()
    );
    assert_eq!(
        (
            rescuer.pending().await.unwrap(),
            rescuer.delayed().await.unwrap()
        ),
        (0, 1)
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_without_a_text_job_field_keeps_its_fields_in_the_dead_letter() {
    let (cluster, [queue]) = queues("q6", ["worker-a"]).await;
    let mut c = cluster.conn(0).await;
    let _: String = c
        .xadd("q6:jobs", "*", &[("task", "charge order 5")])
        .await
        .unwrap();
    let _: String = c
        .xadd("q6:jobs", "*", &[("job", &b"\xff\xfe not text"[..])])
        .await
        .unwrap();
    let got = queue.fetch(10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.len(), 2);
    let reasons: Vec<String> = got
        .iter()
        .map(|d| d.job.as_ref().unwrap_err().reason.clone())
        .collect();
    assert_eq!(
        reasons,
        [
            "entry has no `job` field",
            "the entry's `job` field is not UTF-8 text"
        ]
    );
    for d in &got {
        assert!(queue.dead_letter(d, "malformed").await.unwrap());
    }
    let dead = queue.dead_list(10).await.unwrap();
    let first: serde_json::Value = serde_json::from_str(&dead[0].raw).unwrap();
    assert_eq!(first, json!({"task": "charge order 5"}));
    assert!(
        dead[1].raw.contains("not text"),
        "the undecodable field is kept, lossily: {}",
        dead[1].raw
    );
    assert_eq!(queue.pending().await.unwrap(), 0);
    cluster.teardown().await;
}
