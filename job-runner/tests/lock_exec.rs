//! `job-runner lock exec`: a distributed flock. Concurrent invocations on one resource
//! never overlap, the child sees its fencing token, and its exit code is passed on.

use fencelock_test_support as support;

use std::process::Stdio;
use std::time::Duration;

use support::{Cluster, temp_path};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

fn lock_exec(nodes: &str, resource: &str, script: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env("JOB_RUNNER_LOCK_NODES", nodes)
        .env("RUST_LOG", "warn")
        .args([
            "lock",
            "exec",
            "--resource",
            resource,
            "--ttl-ms",
            "1000",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lock_execs_never_overlap() {
    let cluster = Cluster::start(3).await;
    let nodes = cluster.urls().join(",");
    let log = temp_path("flock-log").with_extension("txt");
    // Each run writes begin and end around a pause longer than the TTL (so the lock must
    // be extended to stay held), with its fencing token.
    let script = format!(
        "echo \"begin $FENCING_TOKEN\" >> {0}; sleep 1.2; echo \"end $FENCING_TOKEN\" >> {0}",
        log.display()
    );
    let mut children = Vec::new();
    for _ in 0..4 {
        children.push(
            lock_exec(&nodes, "nightly-report", &script)
                .spawn()
                .unwrap(),
        );
    }
    for mut c in children {
        let status = tokio::time::timeout(Duration::from_secs(60), c.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let begin: u64 = pair[0]
            .strip_prefix("begin ")
            .expect(&text)
            .parse()
            .unwrap();
        let end: u64 = pair[1].strip_prefix("end ").expect(&text).parse().unwrap();
        assert_eq!(begin, end, "another holder ran in between: {text}");
        assert!(begin > last_token, "tokens grow: {text}");
        last_token = begin;
    }
    let _ = std::fs::remove_file(&log);
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_code_is_passed_on_and_a_held_lock_gives_75() {
    let cluster = Cluster::start(3).await;
    let nodes = cluster.urls().join(",");
    let status = lock_exec(&nodes, "r", "exit 7").status().await.unwrap();
    assert_eq!(status.code(), Some(7));

    let mut holder = lock_exec(&nodes, "r", "sleep 2").spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut busy = tokio::process::Command::new(BIN);
    busy.env("JOB_RUNNER_LOCK_NODES", &nodes).args([
        "lock",
        "exec",
        "--resource",
        "r",
        "--wait-secs",
        "0",
        "--",
        "true",
    ]);
    let out = busy.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("held by another owner"));
    assert!(holder.wait().await.unwrap().success());
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

/// A TTL above the lock crate's default restart quarantine (30 s) works: the client's
/// quarantine follows the longest TTL the command locks with, instead of every lock
/// failing with "longer than the restart quarantine".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_above_the_default_quarantine_gets_a_quarantine_to_match() {
    let cluster = Cluster::start(3).await;
    let nodes = cluster.urls().join(",");
    let mut long = tokio::process::Command::new(BIN);
    long.env("JOB_RUNNER_LOCK_NODES", &nodes).args([
        "lock",
        "exec",
        "--resource",
        "long",
        "--ttl-ms",
        "45000",
        "--wait-secs",
        "0",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    let out = long.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.assert_no_keys_within(Duration::from_secs(2)).await;
    cluster.teardown().await;
}

/// With no lock node reachable and no `--wait-secs`, `lock exec` says so and exits 69 at
/// once, instead of waiting out its default 30 s; given `--wait-secs`, it waits as told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_node_fails_at_once_unless_told_to_wait() {
    let nodes = "redis://127.0.0.1:1,redis://127.0.0.1:2,redis://127.0.0.1:3";
    let run = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.env("JOB_RUNNER_LOCK_NODES", nodes)
            .args(["lock", "exec", "--resource", "r"])
            .args(extra)
            .args(["--", "true"])
            .stdin(Stdio::null());
        cmd
    };
    let started = std::time::Instant::now();
    let out = run(&[]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("lock nodes unreachable"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited {:?} for nodes that never answered",
        started.elapsed()
    );

    let out = run(&["--wait-secs", "1"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("within 1s"), "{stderr}");
}
