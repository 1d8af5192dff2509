//! A payment cut short while the gateway call is in flight: the ledger logs the attempt as
//! cancelled (its charge may or may not have gone through), and writes nothing else.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::handlers::payment::{PaymentHandler, SimulatedGateway};
use job_runner::ledger::{Ledger, Outcome};
use job_runner::{NewJob, Queue, Registry, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, temp_path, wait_until};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_cancelled_in_flight_is_logged_as_an_attempt() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let path = temp_path("cancel-ledger");
    let ledger = Ledger::open(&path).unwrap();
    // Every charge takes 3 s; the job may take 500 ms.
    let slow = SimulatedGateway::new(Duration::from_secs(3), Duration::from_secs(3), 0.0);
    let runner = Runner::builder(
        Queue::connect(&urls[1], "cancel", "runner-c")
            .await
            .unwrap(),
        fenced_client(&urls[..1]).await,
        Registry::new().with("payment", PaymentHandler::new(ledger.clone(), slow)),
    )
    .lock_ttl(Duration::from_millis(600))
    .job_timeout(Duration::from_millis(500))
    .backoff(Duration::from_millis(50), Duration::from_millis(100))
    .max_attempts(2)
    .build()
    .unwrap();
    let queue = Queue::connect(&urls[1], "cancel", "test").await.unwrap();
    queue
        .enqueue(&NewJob::new(
            "payment",
            "order:3",
            json!({"order_id": 3, "amount_cents": 300}),
        ))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await })
    };
    wait_until(
        "the job to be dead-lettered",
        Duration::from_secs(20),
        || async { queue.stats().await.unwrap().dead == 1 },
    )
    .await;
    stop.cancel();
    let report = task.await.unwrap();
    assert_eq!((report.retried, report.dead), (1, 1), "{report:?}");

    let attempts = ledger.attempts().unwrap();
    let outcomes: Vec<(Outcome, &str)> = attempts
        .iter()
        .map(|a| (a.outcome, a.worker.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Outcome::Cancelled, "runner-c"),
            (Outcome::Cancelled, "runner-c")
        ]
    );
    assert!(
        attempts[0].token < attempts[1].token,
        "each attempt ran under a newer token: {attempts:?}"
    );
    let order = ledger.order(3).unwrap().unwrap();
    assert!(!order.paid, "{order:?}");
    let audit = ledger.audit().unwrap();
    assert_eq!((audit.charged, audit.violations()), (0, 0), "{audit}");
    let _ = std::fs::remove_file(&path);
    cluster.teardown().await;
}
