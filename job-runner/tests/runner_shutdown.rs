//! Graceful shutdown: the runner stops fetching, lets running jobs finish, releases their
//! locks and acknowledges them; jobs that outlive the shutdown timeout are cancelled and
//! put back. Nothing is left pending or locked, and no job is lost.

use fencelock_test_support as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use job_runner::{Handler, HandlerError, Job, JobContext, NewJob, Queue, Registry, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, wait_until};
use tokio_util::sync::CancellationToken;

/// Sleeps for the payload's `ms`, or until cancelled unless the payload says `stubborn`.
#[derive(Clone, Default)]
struct Sleepy {
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

impl Handler for Sleepy {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let ms = job.payload["ms"].as_u64().unwrap_or(0);
        if job.payload["stubborn"] == true {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {
                self.finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            () = ctx.cancel.cancelled() => Err(HandlerError::transient("cancelled")),
        }
    }
}

/// A runner of `handler` on `urls` (node 0 locks, node 1 queues), tuned by `tune`.
async fn sleepy_runner(
    urls: &[String],
    handler: &Sleepy,
    tune: impl FnOnce(job_runner::RunnerBuilder) -> job_runner::RunnerBuilder,
) -> Runner {
    tune(
        Runner::builder(
            Queue::connect(&urls[1], "sd", "runner").await.unwrap(),
            fenced_client(&urls[..1]).await,
            Registry::new().with("sleep", handler.clone()),
        )
        .lock_ttl(Duration::from_millis(900))
        .visibility_timeout(Duration::from_secs(5)),
    )
    .build()
    .unwrap()
}

async fn scenario(
    job_ms: u64,
    shutdown_timeout: Duration,
) -> (Cluster, Queue, Sleepy, job_runner::RunReport) {
    let (cluster, queue, handler, report, _) = scenario_with(
        json!({"ms": job_ms}),
        shutdown_timeout,
        Duration::from_secs(1),
    )
    .await;
    (cluster, queue, handler, report)
}

/// Four of twelve jobs with `payload` running when shutdown begins: what the run reports
/// and how long it took to stop.
async fn scenario_with(
    payload: serde_json::Value,
    shutdown_timeout: Duration,
    cancel_grace: Duration,
) -> (Cluster, Queue, Sleepy, job_runner::RunReport, Duration) {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let handler = Sleepy::default();
    let runner = sleepy_runner(&urls, &handler, |b| {
        b.concurrency(4)
            .shutdown_timeout(shutdown_timeout)
            .cancel_grace(cancel_grace)
    })
    .await;
    let queue = Queue::connect(&urls[1], "sd", "test").await.unwrap();
    let jobs: Vec<NewJob> = (0..12)
        .map(|i| NewJob::new("sleep", format!("r:{i}"), payload.clone()))
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await })
    };
    wait_until("four jobs to start", Duration::from_secs(10), || async {
        handler.started.load(Ordering::SeqCst) == 4
    })
    .await;
    let stopping = std::time::Instant::now();
    stop.cancel();
    let report = task.await.unwrap();
    (cluster, queue, handler, report, stopping.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_finish_and_nothing_is_left_pending_or_locked() {
    let (cluster, queue, handler, report) = scenario(1500, Duration::from_secs(25)).await;
    assert_eq!(report.done, 4, "{report:?}");
    assert_eq!(
        handler.started.load(Ordering::SeqCst),
        4,
        "no fetch after the signal"
    );
    assert_eq!(handler.finished.load(Ordering::SeqCst), 4);
    let st = queue.stats().await.unwrap();
    assert_eq!(
        (st.pending, st.depth, st.delayed, st.dead),
        (0, 8, 0, 0),
        "{st:?}"
    );
    cluster
        .assert_no_keys_on(&[0], Duration::from_millis(500))
        .await;
    cluster.teardown().await;
}

/// All twelve jobs are still there, eight never fetched and four put back to run again,
/// and no lock is left.
async fn assert_all_put_back(cluster: Cluster, queue: &Queue) {
    let st = queue.stats().await.unwrap();
    assert_eq!(st.pending, 0, "{st:?}");
    assert_eq!(st.depth + st.delayed, 12, "{st:?}");
    cluster
        .assert_no_keys_on(&[0], Duration::from_millis(500))
        .await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_past_the_timeout_are_cancelled_and_put_back() {
    let (cluster, queue, handler, report) = scenario(60_000, Duration::from_millis(500)).await;
    assert_eq!((report.done, report.interrupted), (0, 4), "{report:?}");
    assert_eq!(handler.finished.load(Ordering::SeqCst), 0);
    assert_all_put_back(cluster, &queue).await;
}

/// A process supervisor kills a runner that overstays its stop timeout (Kubernetes after
/// 30 s by default, against our 25 s `-t`): the whole shutdown, cancelled handlers' grace
/// included, fits in the shutdown timeout, even for handlers that ignore cancellation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fits_in_its_timeout_even_when_handlers_ignore_cancellation() {
    let timeout = Duration::from_secs(1);
    let (cluster, queue, handler, report, took) = scenario_with(
        json!({"ms": 60_000, "stubborn": true}),
        timeout,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!((report.done, report.interrupted), (0, 4), "{report:?}");
    assert_eq!(handler.finished.load(Ordering::SeqCst), 0);
    // The timeout, and a little for putting the jobs back and releasing their locks.
    assert!(
        took < timeout + Duration::from_millis(700),
        "shutdown with a 1 s timeout and a 3 s cancel grace took {took:?}"
    );
    assert_all_put_back(cluster, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_fetched_as_shutdown_begins_are_put_back_not_run() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let handler = Sleepy::default();
    let runner = sleepy_runner(&urls, &handler, |b| b).await;
    let queue = Queue::connect(&urls[1], "sd", "test").await.unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await })
    };
    // Idle, the runner waits inside a blocking fetch. The signal comes, then a job, which
    // that fetch returns.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    queue
        .enqueue(&NewJob::new("sleep", "r:late", json!({"ms": 0})))
        .await
        .unwrap();
    let report = task.await.unwrap();
    assert_eq!(handler.started.load(Ordering::SeqCst), 0, "{report:?}");
    let st = queue.stats().await.unwrap();
    assert_eq!(
        (st.pending, st.depth + st.delayed, st.dead),
        (0, 1, 0),
        "the job is waiting for the next runner: {st:?}"
    );
    cluster.teardown().await;
}
