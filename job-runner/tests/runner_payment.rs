//! Payment jobs on real Redis: a job must lock its own order (the fence is per order, and
//! another resource's tokens come from another counter), and a duplicate of a paid order's
//! job is done whatever its token, rather than retried as stale until dead-lettered.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::handlers::payment::{PaymentHandler, SimulatedGateway};
use job_runner::ledger::{Begin, Holder, Ledger};
use job_runner::{NewJob, Queue, Registry, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, temp_path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_must_lock_its_order_and_a_paid_orders_duplicate_is_done() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let path = temp_path("payment-rules");
    let ledger = Ledger::open(&path).unwrap();
    // Order 8 was paid under a lock whose token counter is far ahead of `order:8`'s.
    let holder = Holder {
        token: 271,
        worker: "elsewhere",
        job_id: "j0",
    };
    let Begin::Pending { started_us } = ledger.begin(8, 800, holder).unwrap() else {
        panic!("order 8 is new");
    };
    ledger.commit(8, "ch_8", holder.writer(started_us)).unwrap();

    let queue = Queue::connect(&urls[1], "pay", "test").await.unwrap();
    let pay = |resource: &str, order: i64| {
        NewJob::new(
            "payment",
            resource,
            json!({"order_id": order, "amount_cents": order * 100}),
        )
    };
    queue
        .enqueue_many(&[pay("hot", 7), pay("order:8", 8)])
        .await
        .unwrap();
    let runner = Runner::builder(
        Queue::connect(&urls[1], "pay", "runner").await.unwrap(),
        fenced_client(&urls[..1]).await,
        Registry::new().with(
            "payment",
            PaymentHandler::new(ledger.clone(), SimulatedGateway::default()),
        ),
    )
    .lock_ttl(Duration::from_millis(500))
    .backoff(Duration::from_millis(20), Duration::from_millis(50))
    .max_attempts(3)
    .once(true)
    .build()
    .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), runner.run(std::future::pending()))
        .await
        .unwrap();

    let dead = queue.dead_list(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].raw.contains("\"hot\""), "{dead:?}");
    assert!(
        dead[0].reason.contains("must run under the lock `order:7`"),
        "{}",
        dead[0].reason
    );
    assert!(
        ledger.order(7).unwrap().is_none_or(|o| !o.paid),
        "order 7 was charged under another resource's lock"
    );
    assert_eq!((report.done, report.dead), (1, 1), "{report:?}");
    let audit = ledger.audit().unwrap();
    assert_eq!((audit.charged, audit.violations()), (1, 0), "{audit}");
    cluster.teardown().await;
}
