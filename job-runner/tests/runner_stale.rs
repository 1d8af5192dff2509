//! The stale worker: a runner frozen mid-job (a stop-the-world pause longer than the lock
//! TTL, watchdog included) loses its lock and its job to another runner. When it wakes up
//! and tries to commit, the ledger rejects its stale fencing token; the order is charged
//! once, by the new holder.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::handlers::payment::{PaymentHandler, SimulatedGateway};
use job_runner::ledger::{Ledger, Outcome};
use job_runner::{NewJob, Queue, Registry, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, temp_path, wait_until};
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_millis(1000);
const VISIBILITY: Duration = Duration::from_millis(1500);
const PAUSE: Duration = Duration::from_millis(4000);

async fn runner(
    cluster_urls: &[String],
    name: &str,
    ledger: Ledger,
    gateway: SimulatedGateway,
) -> Runner {
    let queue = Queue::connect(&cluster_urls[3], "stale", name)
        .await
        .unwrap();
    Runner::builder(
        queue,
        fenced_client(&cluster_urls[..3]).await,
        Registry::new().with("payment", PaymentHandler::new(ledger, gateway)),
    )
    .concurrency(2)
    .lock_ttl(TTL)
    .visibility_timeout(VISIBILITY)
    .backoff(Duration::from_millis(100), Duration::from_millis(200))
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_is_fenced_out_by_the_ledger() {
    let cluster = Cluster::start(4).await;
    let urls = cluster.urls();
    let path = temp_path("stale-ledger");
    let ledger = Ledger::open(&path).unwrap();

    // Runner A lives on a runtime of its own with one thread: the gateway's pause blocks
    // that thread, and with it A's lock watchdog and its queue heartbeat.
    let paused_gateway = SimulatedGateway::default();
    paused_gateway.pause_once(7, PAUSE);
    let stop_a = CancellationToken::new();
    let a = {
        let (urls, ledger, stop) = (urls.clone(), ledger.clone(), stop_a.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let a = runner(&urls, "runner-a", ledger, paused_gateway).await;
                    a.run(async move { stop.cancelled().await }).await
                })
        })
    };

    let producer = Queue::connect(&urls[3], "stale", "producer").await.unwrap();
    producer
        .enqueue(&NewJob::new(
            "payment",
            "order:7",
            json!({"order_id": 7, "amount_cents": 700}),
        ))
        .await
        .unwrap();
    // A has begun (the fence is its token) and is now frozen inside the gateway call.
    wait_until(
        "runner A to begin on order 7",
        Duration::from_secs(10),
        || async { ledger.order(7).unwrap().is_some_and(|o| o.fence > 0) },
    )
    .await;
    let token_a = ledger.order(7).unwrap().unwrap().fence;

    // Runner B reclaims the job once A's entry has been idle past the visibility timeout,
    // takes the lock A no longer extends, and pays the order.
    let b = runner(
        &urls,
        "runner-b",
        ledger.clone(),
        SimulatedGateway::default(),
    )
    .await;
    let stop_b = CancellationToken::new();
    let b_task = {
        let stop = stop_b.clone();
        tokio::spawn(async move { b.run(async move { stop.cancelled().await }).await })
    };
    wait_until(
        "runner B to pay order 7",
        Duration::from_secs(10),
        || async { ledger.order(7).unwrap().is_some_and(|o| o.paid) },
    )
    .await;
    let paid = ledger.order(7).unwrap().unwrap();
    assert!(
        paid.paid_token.unwrap() > token_a,
        "the new holder has a newer token"
    );
    assert_ne!(paid.paid_by.as_deref(), Some("runner-a"));

    // A wakes up and commits with its old token: rejected.
    wait_until(
        "A's stale commit to be rejected",
        Duration::from_secs(15),
        || async {
            ledger
                .attempts()
                .unwrap()
                .iter()
                .any(|x| x.worker == "runner-a" && x.outcome == Outcome::StaleRejected)
        },
    )
    .await;
    let stale: Vec<_> = ledger
        .attempts()
        .unwrap()
        .into_iter()
        .filter(|x| x.outcome == Outcome::StaleRejected)
        .collect();
    assert!(stale.iter().all(|x| x.token == token_a), "{stale:?}");

    // The job ends done, once: A's retry writes nothing, as the entry is B's now.
    wait_until("the queue to drain", Duration::from_secs(20), || async {
        let st = producer.stats().await.unwrap();
        st.depth == 0 && st.pending == 0 && st.delayed == 0
    })
    .await;
    stop_b.cancel();
    stop_a.cancel();
    let report_b = b_task.await.unwrap();
    let report_a = a.join().unwrap();
    assert_eq!(report_a.dead + report_b.dead, 0);
    assert!(report_b.reclaimed >= 1, "{report_b:?}");
    assert_eq!(
        (report_a.taken_over, report_a.retried, report_a.done),
        (1, 0, 0),
        "A left the job to B: {report_a:?}"
    );

    let audit = ledger.audit().unwrap();
    assert_eq!(audit.charged, 1, "{audit}");
    assert!(audit.stale_rejected >= 1, "{audit}");
    assert_eq!(audit.violations(), 0, "{audit:?}");
    cluster
        .assert_no_keys_on(&[0, 1, 2], Duration::from_secs(3))
        .await;
    let _ = std::fs::remove_file(&path);
    cluster.teardown().await;
}
