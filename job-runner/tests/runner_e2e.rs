//! End to end: three runners with eight workers each drain 2 000 payment jobs over 200
//! orders (ten jobs per order, so nine duplicates each) into one SQLite ledger. Every order
//! ends paid, by exactly one accepted charge, and the attempt log shows no two holders of
//! one order overlapping.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::handlers::payment::{PaymentHandler, SimulatedGateway};
use job_runner::ledger::Ledger;
use job_runner::{NewJob, Queue, Registry, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, temp_path, wait_until};
use tokio_util::sync::CancellationToken;

const ORDERS: i64 = 200;
const JOBS_PER_ORDER: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runners_charge_every_order_exactly_once() {
    let cluster = Cluster::start(4).await;
    let urls = cluster.urls();
    let (lock_urls, queue_url) = (&urls[..3], &urls[3]);
    let ledger_path = temp_path("e2e-ledger");

    let producer = Queue::connect(queue_url, "e2e", "producer").await.unwrap();
    let mut jobs = Vec::new();
    for round in 0..JOBS_PER_ORDER {
        for order in 0..ORDERS {
            let _ = round;
            jobs.push(NewJob::new(
                "payment",
                format!("order:{order}"),
                json!({"order_id": order, "amount_cents": 100 + order}),
            ));
        }
    }
    for chunk in jobs.chunks(500) {
        producer.enqueue_many(chunk).await.unwrap();
    }

    let stop = CancellationToken::new();
    let mut runners = Vec::new();
    for i in 0..3 {
        let queue = Queue::connect(queue_url, "e2e", &format!("runner-{i}"))
            .await
            .unwrap();
        // Each runner opens the file itself, as separate processes would.
        let ledger = Ledger::open(&ledger_path).unwrap();
        let gateway = SimulatedGateway::new(Duration::ZERO, Duration::from_millis(2), 0.0);
        let runner = Runner::builder(
            queue,
            fenced_client(lock_urls).await,
            Registry::new().with("payment", PaymentHandler::new(ledger, gateway)),
        )
        .concurrency(8)
        .lock_ttl(Duration::from_secs(5))
        .visibility_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
        let stop = stop.clone();
        runners.push(tokio::spawn(async move {
            runner.run(async move { stop.cancelled().await }).await
        }));
    }

    wait_until("the queue to drain", Duration::from_secs(240), || async {
        let st = producer.stats().await.unwrap();
        st.depth == 0 && st.pending == 0 && st.delayed == 0
    })
    .await;
    stop.cancel();
    let mut done = 0;
    for r in runners {
        let report = r.await.unwrap();
        assert_eq!(report.dead, 0, "{report:?}");
        done += report.done;
    }
    assert_eq!(
        done,
        ORDERS as u64 * JOBS_PER_ORDER as u64,
        "every job acked once"
    );

    let ledger = Ledger::open(&ledger_path).unwrap();
    let audit = ledger.audit().unwrap();
    assert_eq!(audit.orders, ORDERS as usize, "{audit}");
    assert_eq!(audit.paid, ORDERS as usize, "{audit}");
    assert_eq!(
        audit.charged, ORDERS as usize,
        "one accepted charge per order: {audit}"
    );
    assert_eq!(audit.violations(), 0, "{audit:?}");
    // Duplicates found the order paid and charged nothing.
    let attempts = ledger.attempts().unwrap();
    assert_eq!(attempts.len(), ORDERS as usize * JOBS_PER_ORDER, "{audit}");
    for order in ledger.orders().unwrap() {
        assert_eq!(order.amount_cents, 100 + order.order_id);
    }
    // Per order, tokens grow with time: holders came one after another.
    let mut last: std::collections::HashMap<i64, (u64, i64)> = Default::default();
    for a in &attempts {
        if let Some(&(token, finished)) = last.get(&a.order_id) {
            assert!(a.started_us >= finished, "overlap on order {}", a.order_id);
            assert!(
                a.token > token,
                "token did not grow on order {}",
                a.order_id
            );
        }
        last.insert(a.order_id, (a.token, a.finished_us));
    }

    cluster
        .assert_no_keys_on(&[0, 1, 2], Duration::from_secs(2))
        .await;
    let _ = std::fs::remove_file(&ledger_path);
    cluster.teardown().await;
}
