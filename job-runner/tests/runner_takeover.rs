//! A runner whose entry another runner took over (it stalled past the visibility timeout)
//! stops: its handler is cancelled at the next refresh, and a job it finishes anyway is
//! not acknowledged under the new owner. Settings where a stalled runner's entry could be
//! reclaimed while its lock is still held are refused.

use fencelock_test_support as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use job_runner::{Handler, HandlerError, Job, JobContext, NewJob, Queue, Registry, Runner};
use redis::Value;
use serde_json::json;
use support::{Cluster, fenced_client, wait_until};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Hold {
    started: Arc<AtomicU32>,
    cancelled: Arc<AtomicU32>,
    finish: Arc<Notify>,
}

impl Handler for Hold {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if job.payload["mode"] == "until_cancelled" {
            tokio::select! {
                () = ctx.cancel.cancelled() => {
                    self.cancelled.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::transient("cancelled"))
                }
                () = tokio::time::sleep(Duration::from_secs(8)) => Ok(()),
            }
        } else {
            self.finish.notified().await;
            Ok(())
        }
    }
}

/// The entry ids pending for `consumer`.
async fn pending_for(conn: &mut redis::aio::MultiplexedConnection, consumer: &str) -> Vec<String> {
    let reply: Value = redis::cmd("XPENDING")
        .arg("take:jobs")
        .arg("take-workers")
        .arg("-")
        .arg("+")
        .arg(100)
        .arg(consumer)
        .query_async(conn)
        .await
        .unwrap();
    let Value::Array(rows) = reply else {
        panic!("{reply:?}")
    };
    rows.iter()
        .map(|row| match row {
            Value::Array(cols) => match &cols[0] {
                Value::BulkString(id) => String::from_utf8(id.clone()).unwrap(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        })
        .collect()
}

/// What a runner that reclaimed the entry after this one stalled does: take it over.
async fn steal(conn: &mut redis::aio::MultiplexedConnection, id: &str) {
    let _: Value = redis::cmd("XCLAIM")
        .arg("take:jobs")
        .arg("take-workers")
        .arg("thief")
        .arg(0)
        .arg(id)
        .arg("JUSTID")
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_entry_was_taken_over_stops_and_leaves_it_to_the_new_owner() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    let hold = Hold::default();
    let runner = Runner::builder(
        Queue::connect(&urls[1], "take", "runner").await.unwrap(),
        fenced_client(&urls[..1]).await,
        Registry::new().with("hold", hold.clone()),
    )
    .lock_ttl(Duration::from_millis(300))
    .cancel_grace(Duration::from_millis(500))
    .visibility_timeout(Duration::from_millis(1500))
    .build()
    .unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(stop.cancelled_owned()).await })
    };
    let queue = Queue::connect(&urls[1], "take", "test").await.unwrap();

    // Taken over while it runs: the next refresh notices, and the handler is cancelled.
    queue
        .enqueue(&NewJob::new(
            "hold",
            "r:1",
            json!({"mode": "until_cancelled"}),
        ))
        .await
        .unwrap();
    wait_until(
        "the first job to start",
        Duration::from_secs(10),
        || async { hold.started.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let ids = pending_for(&mut conn, "runner").await;
    steal(&mut conn, &ids[0]).await;
    wait_until(
        "the handler to be cancelled once its entry was taken over",
        Duration::from_secs(3),
        || async { hold.cancelled.load(Ordering::SeqCst) == 1 },
    )
    .await;

    // Taken over, then the job finishes before a refresh could tell: it is not
    // acknowledged, since the entry is the new owner's.
    queue
        .enqueue(&NewJob::new("hold", "r:2", json!({"mode": "until_told"})))
        .await
        .unwrap();
    wait_until(
        "the second job to start",
        Duration::from_secs(10),
        || async { hold.started.load(Ordering::SeqCst) == 2 },
    )
    .await;
    let ids = pending_for(&mut conn, "runner").await;
    steal(&mut conn, &ids[0]).await;
    hold.finish.notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let report = task.await.unwrap();
    assert_eq!(
        pending_for(&mut conn, "thief").await.len(),
        2,
        "both entries stay with their new owner: the stalled runner retired or retried one \
         ({report:?})"
    );
    assert_eq!((report.taken_over, report.done), (2, 0), "{report:?}");
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visibility_timeout_that_does_not_cover_lock_and_grace_is_refused() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let build = |grace: Option<Duration>| {
        let urls = urls.clone();
        async move {
            let builder = Runner::builder(
                Queue::connect(&urls[1], "cfg", "runner").await.unwrap(),
                fenced_client(&urls[..1]).await,
                Registry::new().with("hold", Hold::default()),
            )
            .lock_ttl(Duration::from_secs(3))
            .visibility_timeout(Duration::from_secs(8));
            match grace {
                Some(g) => builder.cancel_grace(g),
                None => builder,
            }
            .build()
        }
    };
    let refused = build(Some(Duration::from_secs(10)))
        .await
        .expect_err("8 s of visibility cannot cover a 3 s TTL and a 10 s grace");
    assert_eq!(refused.key, "visibility_timeout_ms", "{refused}");
    assert!(refused.problem.contains("cancel grace"), "{refused}");
    // Unset, the grace is what the visibility timeout leaves (8 - 3 - 1 = 4 s).
    build(None).await.unwrap();
    build(Some(Duration::from_secs(4))).await.unwrap();
    cluster.teardown().await;
}

/// Sleeps `ms` from its payload.
#[derive(Clone)]
struct Sleep;

impl Handler for Sleep {
    async fn handle(&self, job: &Job, _ctx: JobContext) -> Result<(), HandlerError> {
        let ms = job.payload["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_on_a_busy_resource_back_off() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let queue = Queue::connect(&urls[1], "busy", "test").await.unwrap();
    // One job holds `hot` for 8 s; three more wait for it.
    let mut jobs = vec![NewJob::new("sleep", "hot", json!({"ms": 8000}))];
    jobs.extend((0..3).map(|_| NewJob::new("sleep", "hot", json!({"ms": 10}))));
    queue.enqueue_many(&jobs).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runner = Runner::builder(
        Queue::connect(&urls[1], "busy", "runner").await.unwrap(),
        fenced_client(&urls[..1]).await,
        Registry::new().with("sleep", Sleep),
    )
    .concurrency(4)
    .lock_ttl(Duration::from_millis(1000))
    .visibility_timeout(Duration::from_secs(5))
    .once(true)
    .build()
    .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), runner.run(std::future::pending()))
        .await
        .unwrap();
    assert_eq!(report.done, 4, "{report:?}");
    // Every 0-250 ms for 8 s would be some 15 requeues per waiting job; doubling waits
    // make it about 5.
    assert!(
        report.requeued <= 25,
        "3 jobs waiting 8 s for a lock were put back {} times",
        report.requeued
    );
    cluster.teardown().await;
}
