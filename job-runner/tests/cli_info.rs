//! `job-runner info` on lock nodes that hold more than locks: only locks are counted, and
//! the other keys are named in a warning.

use fencelock_test_support as support;

use std::process::Command;
use std::time::Duration;

use redis::AsyncCommands;
use support::binary::out;
use support::{Cluster, fenced_client};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

/// Two lock nodes; the queue shares the first, and the second holds some plain keys, one
/// of them with a value shaped like a lock's but no TTL (so it is not one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_counts_only_locks_and_warns_of_other_keys_on_a_lock_node() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let job_runner = || {
        let mut c = support::binary::job_runner(BIN, &[]);
        c.env("JOB_RUNNER_LOCK_NODES", urls.join(","))
            .env("JOB_RUNNER_QUEUE", &urls[0])
            .args(["--metrics-addr", "off"]);
        c
    };
    let run = |c: &mut Command| c.output().expect("run job-runner");

    let o = run(job_runner().args(["enqueue", "noop", "--resource", "r:1", "--count", "3"]));
    assert!(o.status.success(), "{}", out(&o));
    let mut conn = cluster.conn(1).await;
    let _: () = conn.set("cache:greeting", "hello").await.unwrap();
    let _: () = conn
        .set("session:9", "0123456789abcdef0123456789abcdef")
        .await
        .unwrap();
    let _: () = conn.set_ex("cache:ttl", "soon", 600).await.unwrap();

    let locks = fenced_client(&urls).await;
    let a = locks
        .lock("order:7", Duration::from_secs(30))
        .await
        .unwrap();
    let b = locks
        .lock("order:8", Duration::from_secs(30))
        .await
        .unwrap();

    let o = run(job_runner().arg("info"));
    assert!(o.status.success(), "{}", out(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    for url in &urls {
        assert!(
            stdout.contains(&format!("lock node {url}: up, locks held: 2\n")),
            "two locks on {url}, the other keys not counted:\n{}",
            out(&o)
        );
    }
    // The queue's stream and its epoch (a value shaped like a lock's, without a TTL).
    assert!(
        stderr.contains(&format!(
            "warning: lock node {} holds 2 keys that are not locks",
            urls[0]
        )),
        "{}",
        out(&o)
    );
    assert!(
        stderr.contains(&format!(
            "warning: lock node {} holds 3 keys that are not locks",
            urls[1]
        )),
        "{}",
        out(&o)
    );
    assert!(
        stderr.contains("keep other data (the queue included) off lock nodes"),
        "{}",
        out(&o)
    );

    a.release().await.unwrap();
    b.release().await.unwrap();
    cluster.teardown().await;
}
