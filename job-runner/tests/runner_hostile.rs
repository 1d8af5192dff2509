//! Hostile input on real Redis: entries holding any bytes are dead-lettered alone, with
//! their exact fields, whether fetched or reclaimed, and never hold up the jobs around
//! them; `/healthz` fails when reclaims keep failing; finished entries are removed and
//! the dead-letter stream is bounded. A lost queue node: `runner_queue_loss`.

use fencelock_test_support as support;

use std::time::Duration;

use job_runner::telemetry::{Health, HealthStatus};
use job_runner::{NewJob, Noop, Queue, Registry, RunReport, Runner, RunnerBuilder};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::Value;
use serde_json::json;
use support::{Cluster, fenced_client, wait_until};
use tokio_util::sync::CancellationToken;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Random bytes: mostly short, sometimes empty, sometimes huge, sometimes `job`.
fn random_bytes(rng: &mut SmallRng) -> Vec<u8> {
    match rng.random_range(0..12) {
        0 => Vec::new(),
        1 => {
            let mut b = vec![0u8; rng.random_range(256 * 1024..1024 * 1024)];
            rng.fill(&mut b[..]);
            b
        }
        2 => b"job".to_vec(),
        3 => b"{\"id\":\"x\",\"kind\":\"noop\"}".to_vec(),
        _ => {
            let mut b = vec![0u8; rng.random_range(1..64)];
            rng.fill(&mut b[..]);
            b
        }
    }
}

/// An entry that is not a job: one to four random fields, some named `job`.
fn hostile_entry(rng: &mut SmallRng) -> Fields {
    (0..rng.random_range(1..=4))
        .map(|_| {
            let name = if rng.random_bool(0.3) {
                b"job".to_vec()
            } else {
                random_bytes(rng)
            };
            (name, random_bytes(rng))
        })
        .collect()
}

async fn xadd(conn: &mut redis::aio::MultiplexedConnection, stream: &str, fields: &Fields) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_slice()).arg(v.as_slice());
    }
    let _: Value = cmd.query_async(conn).await.unwrap();
}

/// A dead letter's `fields`: each name and value as `<length>:<bytes>`, in order.
fn decode_fields(mut raw: &[u8]) -> Fields {
    let mut items = Vec::new();
    while !raw.is_empty() {
        let colon = raw.iter().position(|&b| b == b':').expect("a length");
        let len: usize = std::str::from_utf8(&raw[..colon]).unwrap().parse().unwrap();
        items.push(raw[colon + 1..colon + 1 + len].to_vec());
        raw = &raw[colon + 1 + len..];
    }
    assert_eq!(items.len() % 2, 0, "names and values pair up");
    items
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect()
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => panic!("not a bulk string: {other:?}"),
    }
}

/// A short fingerprint of entries' fields, in a canonical order, so that a mismatch
/// prints a few numbers rather than megabytes.
fn fingerprints(entries: &[Fields]) -> Vec<(usize, usize, u64)> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut prints: Vec<(usize, usize, u64)> = entries
        .iter()
        .map(|fields| {
            let mut h = DefaultHasher::new();
            fields.hash(&mut h);
            let bytes = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
            (fields.len(), bytes, h.finish())
        })
        .collect();
    prints.sort_unstable();
    prints
}

/// Every dead letter's exact original fields (decoded from its `fields`).
async fn dead_fields(conn: &mut redis::aio::MultiplexedConnection, dead: &str) -> Vec<Fields> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(dead)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let Value::Array(entries) = reply else {
        panic!("XRANGE reply: {reply:?}")
    };
    entries
        .iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else {
                panic!("entry: {e:?}")
            };
            let Value::Array(flat) = &parts[1] else {
                panic!("fields: {:?}", parts[1])
            };
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = flat
                .chunks(2)
                .map(|kv| (bytes(&kv[0]), bytes(&kv[1])))
                .collect();
            let raw = pairs.iter().find(|(k, _)| k == b"fields")?;
            Some(decode_fields(&raw.1))
        })
        .collect()
}

fn runner(
    queue: Queue,
    locks: fencelock::Redlock,
    tune: impl FnOnce(RunnerBuilder) -> RunnerBuilder,
) -> Runner {
    tune(
        Runner::builder(queue, locks, Registry::new().with("noop", Noop))
            .lock_ttl(Duration::from_millis(300))
            .cancel_grace(Duration::from_millis(200))
            .visibility_timeout(Duration::from_secs(2))
            .concurrency(8),
    )
    .build()
    .unwrap()
}

async fn run_once(runner: Runner) -> RunReport {
    tokio::time::timeout(Duration::from_secs(60), runner.run(std::future::pending()))
        .await
        .expect("the runner did not drain the queue: hostile entries held it up")
}

/// Random hostile entries and jobs, interleaved; returns the hostile ones in order and
/// the number of jobs.
async fn fill(
    conn: &mut redis::aio::MultiplexedConnection,
    queue: &Queue,
    stream: &str,
    seed: u64,
) -> (Vec<Fields>, u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut hostile = Vec::new();
    let mut jobs = 0;
    for i in 0..80 {
        if rng.random_bool(0.5) {
            let fields = hostile_entry(&mut rng);
            xadd(conn, stream, &fields).await;
            hostile.push(fields);
        } else {
            queue
                .enqueue(&NewJob::new("noop", format!("r:{i}"), json!({})))
                .await
                .unwrap();
            jobs += 1;
        }
    }
    (hostile, jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_any_bytes_are_dead_lettered_alone_with_their_exact_fields() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    let locks = fenced_client(&urls[..1]).await;

    // Fetched: the hostile entries come straight from XREADGROUP.
    let queue = Queue::connect(&urls[1], "h1", "runner")
        .await
        .unwrap()
        .max_entry_bytes(16 << 20);
    let (hostile, jobs) = fill(&mut conn, &queue, "h1:jobs", 14).await;
    let report = run_once(runner(queue.clone(), locks.clone(), |b| b.once(true))).await;
    assert_eq!(
        (report.done, report.dead),
        (jobs, hostile.len() as u64),
        "every job done, every hostile entry dead-lettered: {report:?}"
    );
    let st = queue.stats().await.unwrap();
    assert_eq!((st.depth, st.pending, st.delayed), (0, 0, 0), "{st:?}");
    assert_eq!(
        fingerprints(&dead_fields(&mut conn, "h1:dead").await),
        fingerprints(&hostile),
        "the dead letters keep the hostile entries' exact fields"
    );

    // Reclaimed: a consumer took them and crashed, so they come from XAUTOCLAIM.
    let queue = Queue::connect(&urls[1], "h2", "runner")
        .await
        .unwrap()
        .max_entry_bytes(16 << 20);
    let (hostile, jobs) = fill(&mut conn, &queue, "h2:jobs", 15).await;
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("h2-workers")
        .arg("crashed")
        .arg("STREAMS")
        .arg("h2:jobs")
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let report = run_once(runner(queue.clone(), locks, |b| b.once(true))).await;
    assert_eq!(
        (report.done, report.dead, report.reclaimed),
        (jobs, hostile.len() as u64, jobs + hostile.len() as u64),
        "{report:?}"
    );
    assert_eq!(
        fingerprints(&dead_fields(&mut conn, "h2:dead").await),
        fingerprints(&hostile),
        "the dead letters keep the hostile entries' exact fields"
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_every_reclaim_fails() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    // A queue user that may fetch but not reclaim: the fetch loop turns and its fetches
    // succeed, yet no stalled entry would ever be taken over.
    let _: Value = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "noclaim",
                "on",
                ">pw",
                "~*",
                "&*",
                "+@all",
                "-xautoclaim",
            ][..],
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = urls[1].replace("redis://", "redis://noclaim:pw@");
    let queue = Queue::connect(&url, "h3", "runner").await.unwrap();
    let health = Health::new(Duration::from_secs(15));
    let runner = runner(queue, fenced_client(&urls[..1]).await, |b| {
        b.health(health.clone())
    });
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(stop.cancelled_owned()).await })
    };
    wait_until(
        "/healthz to fail while every reclaim fails",
        Duration::from_secs(15),
        || async { matches!(health.status(), HealthStatus::Unhealthy(why) if why.contains("reclaims failed")) },
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_metrics_are_labelled_only_with_kinds_the_runner_handles() {
    let handle = job_runner::telemetry::install_recorder().expect("the recorder");
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let queue = Queue::connect(&urls[1], "kinds", "runner").await.unwrap();
    let mut rng = SmallRng::seed_from_u64(9);
    for i in 0..20 {
        let kind = format!("kind-{:08x}", rng.random::<u32>());
        queue
            .enqueue(&NewJob::new(kind, format!("r:{i}"), json!({})))
            .await
            .unwrap();
    }
    let report = run_once(runner(queue, fenced_client(&urls[..1]).await, |b| {
        b.once(true)
    }))
    .await;
    assert_eq!(report.dead, 20, "{report:?}");
    let series: Vec<String> = handle
        .render()
        .lines()
        .filter(|l| l.starts_with("job_runner_jobs_total{") && l.contains("kind-"))
        .map(str::to_owned)
        .collect();
    assert!(
        series.is_empty(),
        "a producer's kinds became label values: {} series, e.g. {:?}",
        series.len(),
        series.first()
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_jobs_are_refused_at_enqueue_and_dead_lettered_unparsed_at_fetch() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    let queue = Queue::connect(&urls[1], "big", "runner")
        .await
        .unwrap()
        .max_entry_bytes(4096);
    let big = json!({"blob": "x".repeat(10_000)});
    let refused = queue
        .enqueue(&NewJob::new("noop", "r:big", big.clone()))
        .await
        .expect_err("a job over the limit is refused");
    assert!(
        format!("{refused:?}").contains("more than the limit of 4096"),
        "{refused:?}"
    );
    // A producer without the limit wrote one anyway: a 1 MiB job.
    let huge = serde_json::to_string(&json!({
        "id": "h", "kind": "noop", "resource": "r:huge", "attempt": 0, "enqueued_at_ms": 1,
        "payload": {"blob": "y".repeat(1 << 20)},
    }))
    .unwrap();
    xadd(
        &mut conn,
        "big:jobs",
        &vec![(b"job".to_vec(), huge.into_bytes())],
    )
    .await;
    queue
        .enqueue(&NewJob::new("noop", "r:small", json!({})))
        .await
        .unwrap();
    let report = run_once(runner(
        queue.clone(),
        fenced_client(&urls[..1]).await,
        |b| b.once(true),
    ))
    .await;
    assert_eq!((report.done, report.dead), (1, 1), "{report:?}");
    let dead = queue.dead_list(10).await.unwrap();
    assert!(
        dead[0].reason.contains("more than the limit of 4096"),
        "{dead:?}"
    );
    assert!(
        dead[0].raw.len() < 4096,
        "the dead letter keeps a summary, not a copy"
    );
    assert!(dead_fields(&mut conn, "big:dead").await.is_empty());
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_entries_are_removed_from_the_stream() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    let queue = Queue::connect(&urls[1], "tidy", "runner").await.unwrap();
    let jobs: Vec<NewJob> = (0..300)
        .map(|i| NewJob::new("noop", format!("r:{}", i % 7), json!({})))
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    // And some that are not jobs, which go to dead letters.
    for _ in 0..5 {
        xadd(
            &mut conn,
            "tidy:jobs",
            &vec![(b"x".to_vec(), b"y".to_vec())],
        )
        .await;
    }
    let report = run_once(runner(
        queue.clone(),
        fenced_client(&urls[..1]).await,
        |b| b.once(true),
    ))
    .await;
    assert_eq!((report.done, report.dead), (300, 5), "{report:?}");
    let len: u64 = redis::cmd("XLEN")
        .arg("tidy:jobs")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0, "finished entries stay in the stream");
    assert_eq!(queue.stats().await.unwrap().depth, 0);
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_stream_keeps_at_most_its_limit() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let mut conn = cluster.conn(1).await;
    let queue = Queue::connect(&urls[1], "cap", "runner")
        .await
        .unwrap()
        .max_dead(10);
    for i in 0..25 {
        xadd(&mut conn, "cap:jobs", &vec![(b"n".to_vec(), vec![i])]).await;
    }
    let report = run_once(runner(
        queue.clone(),
        fenced_client(&urls[..1]).await,
        |b| b.once(true),
    ))
    .await;
    assert_eq!(report.dead, 25, "{report:?}");
    assert_eq!(
        queue.dead().await.unwrap(),
        10,
        "the dead letters outgrew their limit"
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_counts_undelivered_entries_while_retired_ones_are_deleted() {
    let cluster = Cluster::start(1).await;
    let queue = Queue::connect(&cluster.urls()[0], "depth", "runner")
        .await
        .unwrap();
    let job = |i: usize| NewJob::new("noop", format!("r:{i}"), json!({}));
    queue.enqueue_many(&[job(0), job(1), job(2)]).await.unwrap();
    let got = queue.fetch(3, Duration::from_millis(100)).await.unwrap();
    // The middle one is retired (deleted) while the first stays in flight: Redis's lag is
    // nil from then on.
    assert!(queue.ack(&got[1].entry_id).await.unwrap());
    queue.enqueue_many(&[job(3), job(4)]).await.unwrap();
    let st = queue.stats().await.unwrap();
    assert_eq!((st.depth, st.pending), (2, 2), "{st:?}");
    cluster.teardown().await;
}
