//! The `exec` handler on real Redis: the job reaches the command through its environment
//! and stdin, the exit code decides the outcome (0 done, 75 retry, anything else dead),
//! and a cancelled or finished command leaves nothing of its process group running.

use fencelock_test_support as support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use job_runner::handlers::exec::ExecHandler;
use job_runner::{NewJob, Queue, Registry, RunReport, Runner};
use serde_json::json;
use support::{Cluster, fenced_client, temp_path, wait_until};
use tokio_util::sync::CancellationToken;

/// Runs `commands` (kind → shell script, run with `OUT` set to a scratch directory) on a
/// runner until `jobs` are all done, retried or dead; returns the report, the queue and
/// the scratch directory.
async fn run_exec(
    commands: &[(&str, &str)],
    jobs: &[NewJob],
    tune: impl FnOnce(job_runner::RunnerBuilder) -> job_runner::RunnerBuilder,
) -> (RunReport, Queue, PathBuf, Cluster) {
    let out = temp_path("exec-out");
    std::fs::create_dir_all(&out).unwrap();
    let argv: BTreeMap<String, Vec<String>> = commands
        .iter()
        .map(|(kind, script)| {
            let script = format!("OUT='{}'; {script}", out.display());
            (kind.to_string(), vec!["sh".into(), "-c".into(), script])
        })
        .collect();
    let exec = ExecHandler::new(argv).kill_grace(Duration::from_millis(300));
    let mut registry = Registry::new();
    for (kind, _) in commands {
        registry.insert(*kind, exec.clone());
    }
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let runner = tune(
        Runner::builder(
            Queue::connect(&urls[1], "exec", "runner").await.unwrap(),
            fenced_client(&urls[..1]).await,
            registry,
        )
        .lock_ttl(Duration::from_millis(600))
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .max_attempts(3),
    )
    .build()
    .unwrap();
    let queue = Queue::connect(&urls[1], "exec", "test").await.unwrap();
    queue.enqueue_many(jobs).await.unwrap();
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await })
    };
    wait_until("the queue to drain", Duration::from_secs(30), || async {
        let st = queue.stats().await.unwrap();
        st.depth == 0 && st.pending == 0 && st.delayed == 0
    })
    .await;
    stop.cancel();
    let report = task.await.unwrap();
    cluster
        .assert_no_keys_on(&[0], Duration::from_secs(2))
        .await;
    (report, queue, out, cluster)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Whether `pid` still runs (a zombie waiting for its reaper counts as gone).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_gets_the_job_and_its_exit_code_decides() {
    let commands = [
        (
            "record",
            r#"cat > "$OUT/stdin"; env | grep -E '^(JOB_|FENCING_TOKEN=)' | sort > "$OUT/env""#,
        ),
        (
            "flaky",
            r#"echo "$JOB_ATTEMPT" >> "$OUT/flaky"; [ "$JOB_ATTEMPT" -ge 1 ] || exit 75"#,
        ),
        ("broken", "exit 3"),
    ];
    let jobs = [
        NewJob::new(
            "record",
            "report:1",
            json!({"day": "2026-11-27", "rows": 3}),
        ),
        NewJob::new("flaky", "report:2", json!(null)),
        NewJob::new("broken", "report:3", json!(null)),
    ];
    let (report, queue, out, cluster) = run_exec(&commands, &jobs, |b| b).await;

    let stdin: serde_json::Value = serde_json::from_str(&read(&out, "stdin")).unwrap();
    assert_eq!(stdin, json!({"day": "2026-11-27", "rows": 3}));
    let env: BTreeMap<String, String> = read(&out, "env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(env["JOB_KIND"], "record");
    assert_eq!(env["JOB_RESOURCE"], "report:1");
    assert_eq!(env["JOB_ATTEMPT"], "0");
    let id = &env["JOB_ID"];
    assert!(
        id.len() == 36 && id.as_bytes()[14] == b'7',
        "a UUIDv7: {env:?}"
    );
    assert!(env["FENCING_TOKEN"].parse::<u64>().unwrap() >= 1, "{env:?}");

    // 75 (EX_TEMPFAIL) retried it; the second attempt succeeded.
    assert_eq!(read(&out, "flaky"), "0\n1\n");
    // Any other code is permanent: dead at once, with the code in the reason.
    let dead = queue.dead_list(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].raw.contains("report:3"), "{dead:?}");
    assert_eq!(dead[0].reason, "`sh` exited with 3");
    assert_eq!(
        (report.done, report.retried, report.dead),
        (2, 1, 1),
        "{report:?}"
    );
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_the_commands_process_group_outlives_its_job() {
    let commands = [
        // Times out; `sh` and its background `sleep` must both stop.
        ("hang", r#"sleep 300 & echo $! > "$OUT/hang.bg"; wait"#),
        // Exits at once, leaving a `sleep` that holds the output pipe open.
        ("leave", r#"sleep 300 & echo $! > "$OUT/leave.bg""#),
    ];
    let jobs = [
        NewJob::new("hang", "r:hang", json!(null)),
        NewJob::new("leave", "r:leave", json!(null)),
    ];
    let started = std::time::Instant::now();
    let (report, queue, out, cluster) = run_exec(&commands, &jobs, |b| {
        b.job_timeout(Duration::from_secs(1))
            .cancel_grace(Duration::from_secs(2))
            .max_attempts(1)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a leftover process held a job up: {:?}",
        started.elapsed()
    );
    for name in ["hang.bg", "leave.bg"] {
        let pid: u32 = read(&out, name).trim().parse().unwrap();
        wait_until(
            &format!("{name}'s process ({pid}) to stop"),
            Duration::from_secs(5),
            || async { !running(pid) },
        )
        .await;
    }
    let dead = queue.dead_list(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]
            .reason
            .starts_with("gave up after 1 attempts; last: job timed out"),
        "{dead:?}"
    );
    assert_eq!((report.done, report.dead), (1, 1), "{report:?}");
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_is_not_utf8_or_has_no_newline_does_not_hurt_the_job() {
    // Bytes that are not UTF-8, then 4 MiB without a newline, then more lines: the
    // command must be able to write all of it and exit 0.
    let commands = [(
        "noisy",
        r#"printf 'bad \377\376 bytes\n'; head -c 4194304 /dev/zero | tr '\0' x; echo; \
           printf 'more \377\n' >&2; echo done > "$OUT/noisy""#,
    )];
    let jobs = [NewJob::new("noisy", "noisy:1", json!(null))];
    let (report, _queue, out, cluster) = run_exec(&commands, &jobs, |b| b).await;
    assert_eq!(read(&out, "noisy"), "done\n");
    assert_eq!(
        (report.done, report.dead, report.retried),
        (1, 0, 0),
        "{report:?}"
    );
    cluster.teardown().await;
}
