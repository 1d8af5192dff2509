//! Running the `job-runner` binary from a test.

use std::process::{Command, Output, Stdio};

/// `bin` with none of the runner's settings from the test's own environment
/// (`JOB_RUNNER_*`, `REDIS_URL`), logging warnings, stdin closed; with `cluster_urls`,
/// the last is the queue and the others the lock nodes.
pub fn job_runner(bin: &str, cluster_urls: &[String]) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("JOB_RUNNER_") || k == "REDIS_URL" {
            cmd.env_remove(k);
        }
    }
    if let Some((queue, nodes)) = cluster_urls.split_last() {
        cmd.env("JOB_RUNNER_LOCK_NODES", nodes.join(","))
            .env("JOB_RUNNER_QUEUE", queue);
    }
    cmd.env("RUST_LOG", "warn").stdin(Stdio::null());
    cmd
}

/// A finished command's code and output, for an assertion's message.
pub fn out(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
