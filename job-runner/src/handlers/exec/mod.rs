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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::handler::{Handler, HandlerError, JobContext};
use crate::job::Job;

mod child;
mod supervise;

pub use child::{ChildEnd, ChildIo, MAX_LOG_LINE, kill_children, run_child};
pub use supervise::{SUPERVISE, supervise};

/// The exit code that asks for a retry (`EX_TEMPFAIL` from `sysexits.h`).
pub const EX_TEMPFAIL: i32 = 75;

/// How long a child has between SIGTERM and SIGKILL, by default.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// The variables of the runner's environment a command gets by default.
pub const DEFAULT_ENV_ALLOW: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

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
