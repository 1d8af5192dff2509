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

/// `GET path` on `127.0.0.1:port` over HTTP/1.0: the status and the whole response.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let status = body
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {body:?}")))?;
    Ok((status, body))
}
