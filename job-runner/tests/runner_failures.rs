//! The runner's failure paths on real Redis: transient failures retry with backoff, the
//! last attempt and permanent failures go to dead letters with the reason, malformed
//! entries are dead-lettered without hurting the worker, `dead retry` brings a job back,
//! a contended lock requeues without spending an attempt, and a lost lock or a timeout
//! cancels the handler and retries the job.

use fencelock_test_support as support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use job_runner::{
    Handler, HandlerError, Job, JobContext, NewJob, Queue, Registry, RunReport, Runner,
};
use redis::AsyncCommands;
use serde_json::json;
use support::{Cluster, fenced_client, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Does what the payload says, and logs each call's attempt number per job id.
#[derive(Clone, Default)]
struct Scripted {
    calls: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    heal: Arc<std::sync::atomic::AtomicBool>,
}

impl Scripted {
    fn calls(&self, id: &str) -> Vec<u32> {
        self.calls
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Handler for Scripted {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        self.calls
            .lock()
            .unwrap()
            .entry(job.id.clone())
            .or_default()
            .push(job.attempt);
        let fail_times = job.payload["fail_times"].as_u64().unwrap_or(0) as u32;
        if job.attempt >= fail_times || self.heal.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        match job.payload["mode"].as_str().unwrap_or("") {
            "transient" => Err(HandlerError::transient("the service is busy")),
            "permanent" => Err(HandlerError::permanent("card declined")),
            "panic" => panic!("handler bug"),
            "wait_cancel" => {
                ctx.cancel.cancelled().await;
                Err(HandlerError::transient("cancelled"))
            }
            other => Err(HandlerError::permanent(format!("unknown mode {other}"))),
        }
    }
}

struct Rig {
    cluster: Cluster,
    queue: Queue,
    handler: Scripted,
    stop: CancellationToken,
    task: JoinHandle<RunReport>,
}

impl Rig {
    async fn start(
        tune: impl FnOnce(job_runner::RunnerBuilder) -> job_runner::RunnerBuilder,
    ) -> Rig {
        Rig::start_on(Cluster::start(2).await, tune).await
    }

    /// A runner on `cluster` (node 0 locks, node 1 queues), which a test may have
    /// prepared before the runner starts.
    async fn start_on(
        cluster: Cluster,
        tune: impl FnOnce(job_runner::RunnerBuilder) -> job_runner::RunnerBuilder,
    ) -> Rig {
        let urls = cluster.urls();
        let handler = Scripted::default();
        let runner = tune(
            Runner::builder(
                Queue::connect(&urls[1], "fail", "runner").await.unwrap(),
                fenced_client(&urls[..1]).await,
                Registry::new().with("scripted", handler.clone()),
            )
            .lock_ttl(Duration::from_millis(600))
            .visibility_timeout(Duration::from_secs(5))
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
            .requeue_delay(Duration::from_millis(50))
            .max_attempts(3),
        )
        .build()
        .unwrap();
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await })
        };
        Rig {
            queue: Queue::connect(&urls[1], "fail", "test").await.unwrap(),
            cluster,
            handler,
            stop,
            task,
        }
    }

    async fn enqueue(&self, resource: &str, payload: serde_json::Value) -> String {
        self.queue
            .enqueue(&NewJob::new("scripted", resource, payload))
            .await
            .unwrap()
    }

    async fn drained(&self) {
        wait_until("the queue to drain", Duration::from_secs(20), || async {
            let st = self.queue.stats().await.unwrap();
            st.depth == 0 && st.pending == 0 && st.delayed == 0
        })
        .await;
    }

    async fn finish(self) -> RunReport {
        self.drained().await;
        self.stop.cancel();
        let report = self.task.await.unwrap();
        self.cluster
            .assert_no_keys_on(&[0], Duration::from_secs(2))
            .await;
        self.cluster.teardown().await;
        report
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_with_backoff_until_success() {
    let rig = Rig::start(|b| b).await;
    let id = rig
        .enqueue("r:1", json!({"mode": "transient", "fail_times": 2}))
        .await;
    rig.drained().await;
    assert_eq!(rig.handler.calls(&id), vec![0, 1, 2]);
    let report = rig.finish().await;
    assert_eq!(
        (report.retried, report.done, report.dead),
        (2, 1, 0),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_and_permanent_failures_are_dead_lettered_with_the_reason() {
    let rig = Rig::start(|b| b).await;
    let exhausted = rig
        .enqueue("r:1", json!({"mode": "transient", "fail_times": 99}))
        .await;
    let permanent = rig
        .enqueue("r:2", json!({"mode": "permanent", "fail_times": 99}))
        .await;
    let panicking = rig
        .enqueue("r:3", json!({"mode": "panic", "fail_times": 99}))
        .await;
    rig.drained().await;
    assert_eq!(
        rig.handler.calls(&exhausted),
        vec![0, 1, 2],
        "max_attempts is 3"
    );
    assert_eq!(
        rig.handler.calls(&permanent),
        vec![0],
        "no retry of a permanent failure"
    );
    assert_eq!(
        rig.handler.calls(&panicking),
        vec![0],
        "a panic is not retried forever"
    );
    let dead = rig.queue.dead_list(10).await.unwrap();
    let reason = |id: &str| {
        dead.iter()
            .find(|d| d.raw.contains(id))
            .map(|d| d.reason.clone())
            .unwrap_or_else(|| panic!("{id} is not in dead letters: {dead:?}"))
    };
    assert_eq!(
        reason(&exhausted),
        "gave up after 3 attempts; last: the service is busy"
    );
    assert_eq!(reason(&permanent), "card declined");
    assert_eq!(reason(&panicking), "the handler panicked");

    // `dead retry` puts a job back with its attempts reset; healed, it now succeeds.
    rig.handler
        .heal
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let entry = dead.iter().find(|d| d.raw.contains(&permanent)).unwrap();
    assert!(rig.queue.dead_retry(&entry.id).await.unwrap());
    assert!(!rig.queue.dead_retry(&entry.id).await.unwrap(), "only once");
    rig.drained().await;
    assert_eq!(rig.handler.calls(&permanent), vec![0, 0]);
    assert_eq!(rig.queue.stats().await.unwrap().dead, 2);
    let report = rig.finish().await;
    assert_eq!((report.dead, report.done), (3, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_and_the_worker_goes_on() {
    let rig = Rig::start(|b| b).await;
    let mut conn = rig.cluster.conn(1).await;
    let _: String = conn
        .xadd("fail:jobs", "*", &[("job", "not json")])
        .await
        .unwrap();
    let _: String = conn
        .xadd("fail:jobs", "*", &[("other", "field")])
        .await
        .unwrap();
    let no_resource = json!({"id": "x1", "kind": "scripted", "resource": "", "payload": {}, "attempt": 0, "enqueued_at_ms": 1});
    let _: String = conn
        .xadd("fail:jobs", "*", &[("job", no_resource.to_string())])
        .await
        .unwrap();
    let unknown = rig
        .queue
        .enqueue(&NewJob::new("mystery", "r:9", json!({})))
        .await
        .unwrap();
    let good = rig.enqueue("r:1", json!({})).await;
    rig.drained().await;
    assert_eq!(rig.handler.calls(&good), vec![0]);
    // Workers run concurrently, so the dead letters come in any order.
    let dead = rig.queue.dead_list(10).await.unwrap();
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons[0], "malformed job: entry has no `job` field");
    assert_eq!(reasons[1], "malformed job: job has an empty `resource`");
    assert!(
        reasons[2].starts_with("malformed job: not a job:"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons[3],
        "unknown kind `mystery` (this runner handles: scripted)"
    );
    assert!(
        dead.iter()
            .any(|d| d.raw.contains(&unknown) && d.reason.starts_with("unknown kind"))
    );
    // A malformed dead letter cannot be retried, and stays where it is.
    let not_json = dead.iter().find(|d| d.raw == "not json").unwrap();
    assert!(rig.queue.dead_retry(&not_json.id).await.is_err());
    assert_eq!(rig.queue.stats().await.unwrap().dead, 4);
    let report = rig.finish().await;
    assert_eq!((report.dead, report.done), (4, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_taking_its_runners_down_is_dead_lettered() {
    // Four consumers took the job and died on it (one fetched it, three reclaimed it, none
    // came back); the runner's reclaim is its fifth hand-out, more than `max_attempts`.
    let cluster = Cluster::start(2).await;
    let url = cluster.urls()[1].clone();
    let visibility = Duration::from_millis(1000);
    let first = Queue::connect(&url, "fail", "crashed-0").await.unwrap();
    let id = first
        .enqueue(&NewJob::new("scripted", "r:poison", json!({})))
        .await
        .unwrap();
    assert_eq!(
        first
            .fetch(1, Duration::from_millis(100))
            .await
            .unwrap()
            .len(),
        1
    );
    for i in 1..4 {
        tokio::time::sleep(visibility + Duration::from_millis(50)).await;
        let next = Queue::connect(&url, "fail", &format!("crashed-{i}"))
            .await
            .unwrap();
        let got = next.reclaim(visibility, 10, "0-0").await.unwrap().entries;
        assert_eq!(got[0].deliveries, i + 1);
    }
    tokio::time::sleep(visibility + Duration::from_millis(50)).await;
    let rig = Rig::start_on(cluster, |b| {
        b.visibility_timeout(visibility).max_attempts(3)
    })
    .await;
    rig.drained().await;
    assert!(
        rig.handler.calls(&id).is_empty(),
        "the poison job ran again"
    );
    let dead = rig.queue.dead_list(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].raw.contains(&id)
            && dead[0]
                .reason
                .starts_with("handed out 5 times and never finished"),
        "{dead:?}"
    );
    let report = rig.finish().await;
    assert_eq!(
        (report.reclaimed, report.dead, report.done),
        (1, 1, 0),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contended_lock_requeues_without_spending_attempts() {
    // One attempt only: if contention spent attempts, the job would die.
    let rig = Rig::start(|b| b.max_attempts(1)).await;
    let other = fenced_client(&rig.cluster.urls()[..1]).await;
    let held = other.lock("r:busy", Duration::from_secs(5)).await.unwrap();
    let id = rig.enqueue("r:busy", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        rig.handler.calls(&id).is_empty(),
        "ran while the lock was held elsewhere"
    );
    held.release().await.unwrap();
    rig.drained().await;
    assert_eq!(rig.handler.calls(&id), vec![0], "attempt count untouched");
    let report = rig.finish().await;
    assert!(report.requeued >= 2, "{report:?}");
    assert_eq!((report.done, report.dead), (1, 0), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_cancels_the_handler_and_retries_the_job() {
    let rig = Rig::start(|b| b).await;
    let id = rig
        .enqueue("r:lost", json!({"mode": "wait_cancel", "fail_times": 1}))
        .await;
    wait_until("the handler to start", Duration::from_secs(5), || async {
        !rig.handler.calls(&id).is_empty()
    })
    .await;
    // The lock vanishes from its node (an operator, a failover): the next extension finds
    // the value gone.
    let mut conn = rig.cluster.conn(0).await;
    let _: i64 = conn.del("r:lost").await.unwrap();
    rig.drained().await;
    assert_eq!(rig.handler.calls(&id), vec![0, 1]);
    let report = rig.finish().await;
    assert_eq!((report.retried, report.done), (1, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_runs_too_long_is_cancelled_and_retried() {
    let rig = Rig::start(|b| b.job_timeout(Duration::from_millis(300))).await;
    let id = rig
        .enqueue("r:slow", json!({"mode": "wait_cancel", "fail_times": 1}))
        .await;
    rig.drained().await;
    assert_eq!(rig.handler.calls(&id), vec![0, 1]);
    let report = rig.finish().await;
    assert_eq!((report.retried, report.done), (1, 1), "{report:?}");
}
