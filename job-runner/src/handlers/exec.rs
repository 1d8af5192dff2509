//! The `exec` handler: runs a configured command per job kind, and the child-process
//! plumbing it shares with `job-runner lock exec`.
//!
//! The job goes in through the environment (`JOB_ID`, `JOB_KIND`, `JOB_RESOURCE`,
//! `JOB_ATTEMPT`, `FENCING_TOKEN`) and its payload as JSON on stdin. Exit code 0 means done,
//! 75 (`EX_TEMPFAIL`) means try again later, anything else is a permanent failure. The
//! child's stdout and stderr go to the log, line by line. On cancellation the child gets
//! SIGTERM, then SIGKILL after a grace period.
//!
//! An exec job's command runs in a process group of its own, and the signals go to the
//! whole group: `sh -c` and the programs it starts all stop together. Whatever the command
//! leaves running in its group when it exits is killed then, because it would go on
//! without the job's lock.
//!
//! The command must not outlive its runner either, SIGKILL included, which runs no code
//! in the runner: with a [supervisor](ExecHandler::supervisor) (the binary always uses
//! one), each command runs under `job-runner __supervise`, which leads the group, mirrors
//! the command's exit, and kills the whole group as soon as its runner is gone.
//!
//! A command starts from a clean environment: the job's variables and only those of the
//! runner's own that the [allow-list](ExecHandler::env_allow) names, so that the runner's
//! secrets (its Redis URLs with their passwords, say) do not leak into every job.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::handler::{Handler, HandlerError, JobContext};
use crate::job::Job;

/// The exit code that asks for a retry (`EX_TEMPFAIL` from `sysexits.h`).
pub const EX_TEMPFAIL: i32 = 75;

/// How long a child has between SIGTERM and SIGKILL, by default.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// The variables of the runner's environment a command gets by default.
pub const DEFAULT_ENV_ALLOW: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// The hidden subcommand of the binary that supervises one exec command:
/// `job-runner __supervise <runner pid> <program> [args...]`.
pub const SUPERVISE: &str = "__supervise";

/// Runs one command per job kind.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    commands: Arc<BTreeMap<String, Vec<String>>>,
    kill_grace: Duration,
    env_allow: Arc<Vec<String>>,
    supervisor: Option<PathBuf>,
}

impl ExecHandler {
    /// Runs `commands[kind]` (program and arguments) for jobs of that kind, with
    /// [`DEFAULT_KILL_GRACE`] and [`DEFAULT_ENV_ALLOW`], without a supervisor.
    pub fn new(commands: BTreeMap<String, Vec<String>>) -> Self {
        ExecHandler {
            commands: Arc::new(commands),
            kill_grace: DEFAULT_KILL_GRACE,
            env_allow: Arc::new(DEFAULT_ENV_ALLOW.iter().map(|&v| v.to_owned()).collect()),
            supervisor: None,
        }
    }

    /// The variables of this process's environment that commands get, besides the job's
    /// own; all others are withheld.
    #[must_use]
    pub fn env_allow(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.env_allow = Arc::new(names.into_iter().map(Into::into).collect());
        self
    }

    /// Runs each command under `program` (the `job-runner` binary) as
    /// `program __supervise <pid> <command...>`, which kills the command's process group
    /// when this process dies, even of SIGKILL. Without one, a runner killed that way
    /// leaves its commands running without their locks.
    #[must_use]
    pub fn supervisor(mut self, program: impl Into<PathBuf>) -> Self {
        self.supervisor = Some(program.into());
        self
    }

    /// How long a cancelled child has between SIGTERM and SIGKILL.
    #[must_use]
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// The kinds it has commands for.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.commands.keys().map(String::as_str)
    }
}

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

impl Handler for ExecHandler {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        let command = self.commands.get(&job.kind).ok_or_else(|| {
            HandlerError::permanent(format!("no command configured for kind `{}`", job.kind))
        })?;
        let allowed: Vec<(String, String)> = self
            .env_allow
            .iter()
            .filter_map(|name| Some((name.clone(), std::env::var(name).ok()?)))
            .collect();
        let mut env: Vec<(&str, String)> = allowed
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        env.extend([
            ("JOB_ID", job.id.clone()),
            ("JOB_KIND", job.kind.clone()),
            ("JOB_RESOURCE", job.resource.clone()),
            ("JOB_ATTEMPT", job.attempt.to_string()),
            ("FENCING_TOKEN", ctx.fencing_token.to_string()),
        ]);
        let payload = serde_json::to_vec(&job.payload).expect("JSON serializes");
        let label = format!("{}:{}", job.kind, job.id);
        let supervised: Vec<String>;
        let argv = match &self.supervisor {
            Some(program) => {
                supervised = [
                    program.to_string_lossy().into_owned(),
                    SUPERVISE.to_owned(),
                    std::process::id().to_string(),
                ]
                .into_iter()
                .chain(command.iter().cloned())
                .collect();
                &supervised
            }
            None => command,
        };
        let end = run_child(
            argv,
            &env,
            ChildIo::Logged(payload),
            &label,
            &ctx.cancel,
            self.kill_grace,
        )
        .await
        .map_err(|e| HandlerError::permanent(e.to_string()))?;
        match end {
            ChildEnd::Cancelled(_) => Err(HandlerError::transient("cancelled; child terminated")),
            ChildEnd::Exited(status) => match status.code() {
                Some(0) => Ok(()),
                Some(EX_TEMPFAIL) => Err(HandlerError::transient(format!(
                    "`{}` exited with {EX_TEMPFAIL} (EX_TEMPFAIL)",
                    command[0]
                ))),
                Some(code) => Err(HandlerError::permanent(format!(
                    "`{}` exited with {code}",
                    command[0]
                ))),
                // Killed by a signal from outside (OOM killer, an operator): worth a retry.
                None => Err(HandlerError::transient(format!(
                    "`{}` was killed by a signal ({status})",
                    command[0]
                ))),
            },
        }
    }
}

/// `job-runner __supervise <runner pid> <program> [args...]`: runs the command in this
/// process's group (which the runner made for it), waits for it, and exits as it did. The
/// runner's signals reach the whole group; the supervisor outlives SIGTERM, SIGINT and
/// SIGHUP so that it can report the command's own exit. Once its runner is gone (checked
/// every 50 ms, from the pid it was given, so a runner that died before the supervisor
/// started counts too), it SIGKILLs the whole group, itself included: nothing of the
/// job goes on without its lock.
pub fn supervise(args: &[OsString]) -> ! {
    let (Some(parent), Some((program, rest))) = (
        args.first()
            .and_then(|p| p.to_str())
            .and_then(|p| p.parse::<i32>().ok()),
        args.get(1..).and_then(<[OsString]>::split_first),
    ) else {
        eprintln!("job-runner {SUPERVISE}: usage: {SUPERVISE} <runner pid> <program> [args...]");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let status = runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut signals = [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ]
        .map(|kind| signal(kind).expect("signal handlers install"));
        let orphaned = || nix::unistd::getppid().as_raw() != parent;
        let kill_group = || {
            let _ = killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
            std::process::exit(137);
        };
        if orphaned() {
            kill_group();
        }
        let mut child = match Command::new(program).args(rest).spawn() {
            Ok(child) => child,
            Err(e) => {
                eprintln!("cannot start `{}`: {e}", program.to_string_lossy());
                std::process::exit(127);
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let [a, b, c] = &mut signals;
            tokio::select! {
                status = child.wait() => return status,
                _ = a.recv() => {}
                _ = b.recv() => {}
                _ = c.recv() => {}
                _ = tick.tick() => if orphaned() { kill_group() },
            }
        }
    });
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = status.code() {
                std::process::exit(code);
            }
            // Killed by a signal: die of it too, so that the runner sees the same. The
            // signals this process catches would not kill it; SIGKILL stands in for them.
            let caught = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];
            let signal = status
                .signal()
                .and_then(|s| Signal::try_from(s).ok())
                .filter(|s| !caught.contains(s))
                .unwrap_or(Signal::SIGKILL);
            let _ = nix::sys::signal::raise(signal);
            let _ = nix::sys::signal::raise(Signal::SIGKILL);
            std::process::exit(128 + signal as i32);
        }
        Err(e) => {
            eprintln!("waiting for the command failed: {e}");
            std::process::exit(70);
        }
    }
}
