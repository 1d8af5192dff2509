//! Child processes: started in a group of their own when asked, their output logged,
//! stopped with SIGTERM then SIGKILL, and never left behind.

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    /// It exited by itself.
    Exited(ExitStatus),
    /// It was stopped because of the cancel signal.
    Cancelled(ExitStatus),
}

/// Where a child's standard streams go.
#[derive(Debug, Clone)]
pub enum ChildIo {
    /// Write these bytes to its stdin; log its stdout and stderr line by line. The child
    /// runs in a process group of its own, which every signal reaches, and gets no
    /// environment but the one given.
    Logged(Vec<u8>),
    /// Share this process's stdin, stdout and stderr and its process group (as `flock`
    /// does, so that a terminal's Ctrl-C and job control still reach the child).
    Inherit,
}

/// How long the logging of a child's output may go on after it exits: a process it left
/// behind may hold the pipes open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Children that may still be running, by pid, and whether each leads a process group of
/// its own: what [`kill_children`] takes down.
static LIVE: Mutex<BTreeMap<u32, bool>> = Mutex::new(BTreeMap::new());

/// SIGKILLs every child this process started that may still be running (their process
/// groups, for exec jobs). For a forced exit, which skips the destructors that would do it.
pub fn kill_children() {
    let live = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (&pid, &group) in live.iter() {
        signal_child(pid, group, Signal::SIGKILL);
    }
}

fn signal_child(pid: u32, group: bool, signal: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    let pid = Pid::from_raw(pid);
    // ESRCH (already gone) is the only expected error, and there is nothing to do then.
    let _ = if group {
        killpg(pid, signal)
    } else {
        kill(pid, signal)
    };
}

/// A started child, registered in [`LIVE`] until dropped. Dropping it kills what is left:
/// the child if it was not reaped, and for a group leader whatever is left in its group.
struct Tracked {
    pid: u32,
    group: bool,
    reaped: bool,
}

impl Tracked {
    fn new(pid: u32, group: bool) -> Tracked {
        LIVE.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pid, group);
        Tracked {
            pid,
            group,
            reaped: false,
        }
    }

    fn signal(&self, signal: Signal) {
        signal_child(self.pid, self.group, signal);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.pid);
        // A reaped child's pid may be reused, but not while its process group still has
        // members: signalling the group stays safe.
        if self.group || !self.reaped {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Spawns `argv` with `env`, wires its streams as `io` says (logging under `label`), and
/// waits for it; on `cancel` sends SIGTERM and, after `grace`, SIGKILL.
///
/// # Errors
///
/// When the program cannot be started.
///
/// # Cancel safety
///
/// Dropping the future kills the child (SIGKILL), and for [`ChildIo::Logged`] its whole
/// process group.
pub async fn run_child(
    argv: &[String],
    env: &[(&str, String)],
    io: ChildIo,
    label: &str,
    cancel: &CancellationToken,
    grace: Duration,
) -> std::io::Result<ChildEnd> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true);
    let group = matches!(io, ChildIo::Logged(_));
    let stdin = match io {
        ChildIo::Logged(input) => {
            cmd.env_clear()
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            Some(input)
        }
        ChildIo::Inherit => {
            cmd.stdin(Stdio::inherit())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit());
            None
        }
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start `{program}`: {e}")))?;
    let mut tracked = child.id().map(|pid| Tracked::new(pid, group));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that does not read its stdin must not block us: write in the background.
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
            let _ = pipe.shutdown().await;
        });
    }
    let out = child
        .stdout
        .take()
        .map(|p| log_lines(p, label.to_owned(), false));
    let err = child
        .stderr
        .take()
        .map(|p| log_lines(p, label.to_owned(), true));
    let end = tokio::select! {
        status = child.wait() => ChildEnd::Exited(status?),
        () = cancel.cancelled() => {
            ChildEnd::Cancelled(terminate(&mut child, tracked.as_ref(), grace).await?)
        }
    };
    if let Some(t) = &mut tracked {
        t.reaped = true;
    }
    // Leftovers in the group die here, which also closes the pipes they held.
    drop(tracked);
    for mut task in [out, err].into_iter().flatten() {
        if tokio::time::timeout(DRAIN_AFTER_EXIT, &mut task)
            .await
            .is_err()
        {
            // Something outside the group holds the pipe: stop logging it.
            task.abort();
        }
    }
    Ok(end)
}

/// SIGTERM, then SIGKILL after `grace`: to the child's process group when it has one.
async fn terminate(
    child: &mut Child,
    tracked: Option<&Tracked>,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    if let Some(t) = tracked {
        t.signal(Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "child ignored SIGTERM; killing it"
            );
            match tracked {
                Some(t) => t.signal(Signal::SIGKILL),
                None => child.start_kill()?,
            }
            child.wait().await
        }
    }
}

/// The longest line of a child's output that goes to the log; the rest of a longer
/// line is skipped, so a command that prints megabytes without a newline costs no more
/// memory than this.
pub const MAX_LOG_LINE: usize = 8 * 1024;

/// Logs a child's output line by line. Output is bytes, decoded lossily: a command that
/// prints something that is not UTF-8 must not stop the reading, which would close the
/// pipe and kill the command with SIGPIPE.
fn log_lines(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    label: String,
    stderr: bool,
) -> tokio::task::JoinHandle<()> {
    let emit = move |line: &[u8], cut: bool| {
        let mut text = String::from_utf8_lossy(line).into_owned();
        if cut {
            text.push_str(&format!(" … (line cut at {MAX_LOG_LINE} bytes)"));
        }
        if stderr {
            tracing::warn!(target: "job_runner::exec", child = %label, "{text}");
        } else {
            tracing::info!(target: "job_runner::exec", child = %label, "{text}");
        }
    };
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        let mut cut = false;
        while let Ok(buf) = reader.fill_buf().await {
            if buf.is_empty() {
                if !line.is_empty() || cut {
                    emit(&line, cut);
                }
                break;
            }
            let newline = buf.iter().position(|&b| b == b'\n');
            let chunk = &buf[..newline.unwrap_or(buf.len())];
            let room = MAX_LOG_LINE - line.len();
            if chunk.len() > room {
                cut = true;
            }
            line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let used = newline.map_or(buf.len(), |i| i + 1);
            reader.consume(used);
            if newline.is_some() {
                emit(&line, cut);
                line.clear();
                cut = false;
            }
        }
    })
}
