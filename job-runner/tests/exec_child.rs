//! The binary's exec commands: a runner killed with SIGKILL takes its commands (their
//! whole process group) down with it, the supervisor passes the command's exit on, and a
//! command gets only the job's variables and the allow-listed ones of the runner's.

use fencelock_test_support as support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use job_runner::{NewJob, Queue};
use serde_json::json;
use support::{Cluster, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

fn runner(urls: &[String], extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env("JOB_RUNNER_LOCK_NODES", &urls[0])
        .env("JOB_RUNNER_QUEUE", &urls[1])
        .env("RUST_LOG", "warn")
        .env("SECRET_TOKEN", "s3cret")
        .args([
            "run",
            "--metrics-addr",
            "off",
            "--lock-ttl-ms",
            "1000",
            "--visibility-timeout-ms",
            "15000",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
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

fn pid_in(dir: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = support::temp_path(name).with_extension("");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_runners_command_dies_with_it() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let dir = temp_dir("exec-orphan");
    let d = dir.display();
    // The shell and a program it started: both must go.
    let command = format!(
        "slow=echo $$ > {d}/sh.tmp && mv {d}/sh.tmp {d}/sh.pid; \
         sleep 120 & echo $! > {d}/sleep.tmp && mv {d}/sleep.tmp {d}/sleep.pid; wait"
    );
    let mut runner = runner(&urls, &["--exec", &command]).spawn().unwrap();
    let queue = Queue::connect(&urls[1], "jobs", "test").await.unwrap();
    queue
        .enqueue(&NewJob::new("slow", "slow:1", json!({})))
        .await
        .unwrap();
    wait_until("the command to start", Duration::from_secs(20), || async {
        pid_in(&dir, "sh.pid").is_some() && pid_in(&dir, "sleep.pid").is_some()
    })
    .await;
    let (sh, sleep) = (
        pid_in(&dir, "sh.pid").unwrap(),
        pid_in(&dir, "sleep.pid").unwrap(),
    );
    assert!(running(sh) && running(sleep));
    runner.start_kill().unwrap();
    runner.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while (running(sh) || running(sleep)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<u32> = [sh, sleep].into_iter().filter(|&p| running(p)).collect();
    for &pid in &left {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    assert!(
        left.is_empty(),
        "the command outlived its SIGKILLed runner (still running: {left:?})"
    );
    let _ = std::fs::remove_dir_all(&dir);
    cluster.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_commands_keep_their_exit_codes_and_get_a_clean_environment() {
    let cluster = Cluster::start(2).await;
    let urls = cluster.urls();
    let dir = temp_dir("exec-env");
    let d = dir.display();
    let queue = Queue::connect(&urls[1], "jobs", "test").await.unwrap();
    for kind in ["env", "fail", "killed"] {
        queue
            .enqueue(&NewJob::new(kind, format!("{kind}:1"), json!({})))
            .await
            .unwrap();
    }
    let env_cmd = format!("env=env > {d}/env.txt");
    let status = runner(
        &urls,
        &[
            "--once",
            "--max-attempts",
            "1",
            "--exec",
            &env_cmd,
            "--exec",
            "fail=exit 3",
            "--exec",
            "killed=kill -9 $$",
        ],
    )
    .status()
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    let env = std::fs::read_to_string(dir.join("env.txt")).unwrap();
    for present in ["JOB_ID=", "JOB_KIND=env", "FENCING_TOKEN=", "PATH="] {
        assert!(
            env.lines().any(|l| l.starts_with(present)),
            "{present} missing from the command's environment:\n{env}"
        );
    }
    for withheld in [
        "SECRET_TOKEN=",
        "JOB_RUNNER_QUEUE=",
        "JOB_RUNNER_LOCK_NODES=",
    ] {
        assert!(
            !env.lines().any(|l| l.starts_with(withheld)),
            "{withheld} leaked into the command's environment:\n{env}"
        );
    }
    let dead = queue.dead_list(10).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("exited with 3")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("killed by a signal")),
        "{reasons:?}"
    );

    // An allow-listed variable gets through.
    queue
        .enqueue(&NewJob::new("env", "env:2", json!({})))
        .await
        .unwrap();
    let status = runner(
        &urls,
        &[
            "--once",
            "--exec",
            &env_cmd,
            "--exec-env",
            "PATH,SECRET_TOKEN",
        ],
    )
    .status()
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    let env = std::fs::read_to_string(dir.join("env.txt")).unwrap();
    assert!(env.lines().any(|l| l == "SECRET_TOKEN=s3cret"), "{env}");
    let _ = std::fs::remove_dir_all(&dir);
    cluster.teardown().await;
}
