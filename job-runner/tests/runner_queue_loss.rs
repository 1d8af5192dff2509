//! A lost queue, on real Redis: a queue node that restarted empty or came back with
//! older data is reported (an error line and `job_runner_queue_data_lost_total`), and
//! the runners go on.

use fencelock_test_support as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use job_runner::{
    Handler, HandlerError, Job, JobContext, NewJob, Queue, Registry, RunReport, Runner,
};
use serde_json::json;
use support::{Cluster, fenced_client, wait_until};
use tokio_util::sync::CancellationToken;

/// Counts the jobs it ran.
#[derive(Clone, Default)]
struct Count(Arc<AtomicU64>);

impl Handler for Count {
    async fn handle(&self, _job: &Job, _ctx: JobContext) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A counting runner on queue `name` of `cluster` (node 0 locks, node 1 queues), running
/// until the token is cancelled.
async fn counting_runner(
    cluster: &Cluster,
    name: &str,
) -> (Count, CancellationToken, tokio::task::JoinHandle<RunReport>) {
    let urls = cluster.urls();
    let count = Count::default();
    let runner = Runner::builder(
        Queue::connect(&urls[1], name, "runner").await.unwrap(),
        fenced_client(&urls[..1]).await,
        Registry::new().with("count", count.clone()),
    )
    .lock_ttl(Duration::from_millis(300))
    .cancel_grace(Duration::from_millis(200))
    .visibility_timeout(Duration::from_secs(2))
    .build()
    .unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(stop.cancelled_owned()).await })
    };
    (count, stop, task)
}

/// Enqueues `n` jobs, retrying as a producer would while its connection comes back.
async fn enqueue(queue: &Queue, n: usize) {
    for i in 0..n {
        let job = NewJob::new("count", format!("r:{i}"), json!({}));
        let mut tries = 0;
        while let Err(e) = queue.enqueue(&job).await {
            tries += 1;
            assert!(tries < 50, "enqueue kept failing: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn ran(count: &Count, n: u64, what: &str) {
    wait_until(what, Duration::from_secs(20), || async {
        count.0.load(Ordering::SeqCst) >= n
    })
    .await;
}

/// `job_runner_queue_data_lost_total{what}` as the process's Prometheus recorder has it.
fn data_lost(what: &str) -> u64 {
    let handle = job_runner::telemetry::install_recorder().expect("the recorder");
    let prefix = format!("job_runner_queue_data_lost_total{{what=\"{what}\"}} ");
    handle
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_node_restarted_empty_is_reported_and_the_runners_go_on() {
    job_runner::telemetry::install_recorder();
    let before = data_lost("wiped");
    let cluster = Cluster::start(2).await;
    let (count, stop, task) = counting_runner(&cluster, "wipe").await;
    // A producer connected before the restart, as a long-running service would be.
    let producer = Queue::connect(&cluster.urls()[1], "wipe", "producer")
        .await
        .unwrap();
    enqueue(&producer, 5).await;
    ran(&count, 5, "the first jobs to run").await;

    cluster.restart_empty(1).await;
    enqueue(&producer, 5).await;
    ran(
        &count,
        10,
        "the jobs enqueued after the queue node restarted empty to run",
    )
    .await;
    wait_until(
        "the loss to be reported",
        Duration::from_secs(5),
        || async { data_lost("wiped") > before },
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_node_back_with_older_data_is_reported() {
    job_runner::telemetry::install_recorder();
    let before = data_lost("rolled_back");
    let cluster = Cluster::start(2).await;
    let (count, stop, task) = counting_runner(&cluster, "old").await;
    let producer = Queue::connect(&cluster.urls()[1], "old", "producer")
        .await
        .unwrap();
    let mut conn = cluster.conn(1).await;
    enqueue(&producer, 3).await;
    ran(&count, 3, "the first jobs to run").await;
    // A snapshot now, restored after three more jobs ran: what a node restarted from an
    // older RDB file, or one that lost the tail of its append-only file, holds.
    let snapshot: Vec<u8> = redis::cmd("DUMP")
        .arg("old:jobs")
        .query_async(&mut conn)
        .await
        .unwrap();
    enqueue(&producer, 3).await;
    ran(&count, 6, "the next jobs to run").await;
    let () = redis::cmd("RESTORE")
        .arg("old:jobs")
        .arg(0)
        .arg(snapshot)
        .arg("REPLACE")
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_until(
        "the queue node's older data to be reported",
        Duration::from_secs(5),
        || async { data_lost("rolled_back") > before },
    )
    .await;
    enqueue(&producer, 2).await;
    ran(&count, 8, "jobs enqueued after the rollback to run").await;
    stop.cancel();
    task.await.unwrap();
    cluster.teardown().await;
}
