//! The `job-runner` binary without Redis: config precedence, configuration and connection
//! errors with their exit codes, and help.

use fencelock_test_support as support;

use std::process::{Command, Output};

use support::binary::out;
use support::temp_path;

const BIN: &str = env!("CARGO_BIN_EXE_job-runner");

/// The binary with a clean environment of `JOB_RUNNER_*` settings.
fn job_runner(cluster_urls: &[String]) -> Command {
    support::binary::job_runner(BIN, cluster_urls)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run job-runner")
}

#[test]
fn config_precedence_is_flags_then_env_then_file() {
    let file = temp_path("cfg").with_extension("toml");
    std::fs::write(
        &file,
        "concurrency = 2\nqueue_name = \"from-file\"\nmax_attempts = 7\nlock_nodes = [\"redis://127.0.0.1:7001\"]\n",
    )
    .unwrap();
    let shown = |cmd: &mut Command| {
        let o = run(cmd);
        assert!(o.status.success(), "{}", out(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let base = || {
        let mut c = job_runner(&[]);
        c.args(["run", "--print-config", "--config"]).arg(&file);
        c
    };
    let from_file = shown(&mut base());
    assert!(from_file.contains("concurrency = 2\n"), "{from_file}");
    assert!(from_file.contains("queue_name = \"from-file\"\n"));
    assert!(from_file.contains("max_attempts = 7\n"));
    let from_env = shown(
        base()
            .env("JOB_RUNNER_CONCURRENCY", "3")
            .env("REDIS_URL", "redis://env-queue:6379"),
    );
    assert!(from_env.contains("concurrency = 3\n"), "{from_env}");
    assert!(
        from_env.contains("queue = \"redis://env-queue:6379\"\n"),
        "{from_env}"
    );
    let from_flag = shown(
        base()
            .args(["-c", "4", "--queue", "redis://flag-queue:6379"])
            .env("JOB_RUNNER_CONCURRENCY", "3")
            .env("JOB_RUNNER_QUEUE", "redis://env-queue:6379"),
    );
    assert!(from_flag.contains("concurrency = 4\n"), "{from_flag}");
    assert!(
        from_flag.contains("queue = \"redis://flag-queue:6379\"\n"),
        "{from_flag}"
    );
    // JOB_RUNNER_QUEUE beats REDIS_URL.
    let both = shown(
        base()
            .env("JOB_RUNNER_QUEUE", "redis://a:1")
            .env("REDIS_URL", "redis://b:1"),
    );
    assert!(both.contains("queue = \"redis://a:1\"\n"), "{both}");
    // Passwords are not printed.
    let secret = shown(base().args(["--queue", "redis://u:hunter2@q:1"]));
    assert!(
        !secret.contains("hunter2") && secret.contains("redis://u:***@q:1"),
        "{secret}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn bad_config_fails_before_work_with_the_key_named() {
    let file = temp_path("bad").with_extension("toml");
    std::fs::write(&file, "concurency = 3\n").unwrap();
    let o = run(job_runner(&[]).args(["run", "--config"]).arg(&file));
    assert_eq!(o.status.code(), Some(78), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("concurency"),
        "{}",
        out(&o)
    );

    let o = run(job_runner(&[]).args([
        "run",
        "--lock-nodes",
        "redis://127.0.0.1:1",
        "--lock-ttl-ms",
        "50000",
    ]));
    assert_eq!(o.status.code(), Some(78), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`visibility_timeout_ms`"),
        "{}",
        out(&o)
    );

    let o = run(job_runner(&[]).args(["run"]));
    assert_eq!(o.status.code(), Some(78), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`lock_nodes`"),
        "{}",
        out(&o)
    );

    let o = run(job_runner(&[]).args(["run", "--lock-nodes", "http://nope"]));
    assert_eq!(o.status.code(), Some(78), "{}", out(&o));

    let o = run(job_runner(&[]).args(["run", "-c", "many"]));
    assert_ne!(o.status.code(), Some(0), "{}", out(&o));
    let _ = std::fs::remove_file(&file);
}

#[test]
fn an_unreachable_queue_at_startup_exits_69() {
    let o = run(job_runner(&[]).args([
        "run",
        "--lock-nodes",
        "redis://127.0.0.1:1",
        "--queue",
        "redis://127.0.0.1:1",
        "--metrics-addr",
        "off",
    ]));
    assert_eq!(o.status.code(), Some(69), "{}", out(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("job-runner: cannot reach the queue"))
        .unwrap_or_else(|| panic!("{}", out(&o)));
    // The cause once, not once per layer that wraps it.
    assert_eq!(line.matches("(os error 111)").count(), 1, "{line}");
}

#[test]
fn help_shows_examples_for_each_subcommand() {
    let o = run(job_runner(&[]).arg("--help"));
    assert!(o.status.success(), "{}", out(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    for example in [
        "job-runner run",
        "job-runner enqueue payment",
        "job-runner info",
        "job-runner dead retry",
        "job-runner lock exec",
    ] {
        assert!(help.contains(example), "--help lacks `{example}`:\n{help}");
    }
}
