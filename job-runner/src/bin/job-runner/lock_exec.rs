//! `job-runner lock exec`: a command run while holding a lock, like `flock(1)` across
//! machines.

use std::future::Future;
use std::time::Duration;

use fencelock::{RetryPolicy, ScopedError, WatchdogConfig};
use job_runner::handlers::exec::{ChildEnd, ChildIo, EX_TEMPFAIL, run_child};
use tokio_util::sync::CancellationToken;

use crate::args::LockExecArgs;
use crate::connect;
use crate::exit::{EX_CONFIG, EX_UNAVAILABLE, Exit};
use crate::settings::Settings;

/// `lock exec`: takes the lock (waiting up to `--wait-secs`), then runs the command
/// under it; returns the command's exit code, or 75 when the lock could not be taken
/// or was lost.
///
/// # Cancel safety
///
/// As `run_locked`: a dropped future kills the command and releases the lock in the
/// background.
pub(crate) async fn lock_exec(
    settings: &Settings,
    args: LockExecArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, Exit> {
    let ttl = Duration::from_millis(args.ttl_ms);
    let locks = connect::locks(settings, ttl).await?;
    let wait_secs = args.wait_secs.unwrap_or(DEFAULT_LOCK_WAIT_SECS);
    if args.wait_secs.is_none() {
        // Waiting only makes sense for a lock that is held elsewhere or nodes that come
        // and go; when so many nodes cannot be reached that no quorum can answer, say so
        // now rather than after the whole wait.
        match locks
            .lock_with_retry(&[args.resource.as_str()], ttl, RetryPolicy::never())
            .await
        {
            Err(fencelock::Error::NoQuorum {
                succeeded: 0,
                failures,
                quorum,
                ..
            }) if failures.len() > locks.nodes().len() - quorum
                && failures
                    .iter()
                    .all(|f| !matches!(f, fencelock::NodeFailure::Restarted { .. })) =>
            {
                let failures: Vec<String> = failures.iter().map(ToString::to_string).collect();
                return Err(Exit::new(
                    EX_UNAVAILABLE,
                    format!(
                        "lock nodes unreachable, so no quorum of {quorum} can answer ({}); not waiting for them (pass --wait-secs to wait)",
                        failures.join("; ")
                    ),
                ));
            }
            Err(e) if e.kind() == fencelock::ErrorKind::Config => {
                return Err(Exit::new(EX_CONFIG, e.to_string()));
            }
            Ok(guard) => return run_locked(guard, args, shutdown).await,
            Err(_) => {}
        }
    }
    // Retry about every 150 ms for the whole wait.
    let retries = (wait_secs * 1000 / 150) as u32;
    let policy = RetryPolicy::new(
        retries,
        Duration::from_millis(100),
        Duration::from_millis(100),
    );
    let guard = match locks
        .lock_with_retry(&[args.resource.as_str()], ttl, policy)
        .await
    {
        Ok(guard) => guard,
        Err(e) if e.kind() == fencelock::ErrorKind::Config => {
            return Err(Exit::new(EX_CONFIG, e.to_string()));
        }
        Err(e) => {
            return Err(Exit::new(
                EX_TEMPFAIL,
                format!(
                    "could not take the lock on `{}` within {wait_secs}s: {e}",
                    args.resource
                ),
            ));
        }
    };
    run_locked(guard, args, shutdown).await
}

/// The default of `lock exec --wait-secs`.
const DEFAULT_LOCK_WAIT_SECS: u64 = 30;

/// Runs `lock exec`'s command under `guard`, kept alive by fencelock's scoped hold (the
/// one the worker's locks use too), until it exits or the lock is lost or a signal comes.
///
/// # Cancel safety
///
/// Dropping it kills the command (SIGKILL to its group) and releases the lock in the
/// background.
async fn run_locked(
    guard: fencelock::LockGuard,
    args: LockExecArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, Exit> {
    let token = guard.fencing_token().unwrap_or_default();
    tracing::info!(resource = %args.resource, token, "lock taken; running the command");
    // The command is stopped here when the lock goes, and must end before the release.
    let config = WatchdogConfig::holding(
        Duration::from_secs(args.max_hold_secs),
        Duration::from_millis(args.ttl_ms),
    )
    .cancel_on_loss(false);
    let resource = args.resource.clone();
    let held = guard
        .hold_while(config, |health| async move {
            let cancel = CancellationToken::new();
            let env = [
                ("FENCING_TOKEN", token.to_string()),
                ("LOCK_RESOURCE", args.resource.clone()),
            ];
            let child = run_child(
                &args.command,
                &env,
                ChildIo::Inherit,
                &args.resource,
                &cancel,
                Duration::from_secs(args.kill_grace_secs),
            );
            tokio::pin!(child);
            tokio::pin!(shutdown);
            let mut lost = false;
            let end = loop {
                tokio::select! {
                    end = &mut child => break end,
                    _ = health.lost(), if !lost => {
                        tracing::error!(resource = %args.resource, "lock lost; stopping the command");
                        lost = true;
                        cancel.cancel();
                    }
                    () = &mut shutdown, if !cancel.is_cancelled() => {
                        tracing::info!("signal received; stopping the command");
                        cancel.cancel();
                    }
                }
            };
            end.map(|end| (end, lost))
        })
        .await;
    let lost = || {
        Exit::new(
            EX_TEMPFAIL,
            format!("lost the lock on `{resource}` while the command ran"),
        )
    };
    match held {
        Ok((_, true)) | Err(ScopedError::Lost { .. }) => Err(lost()),
        Ok((ChildEnd::Exited(status) | ChildEnd::Cancelled(status), false)) => {
            Ok(exit_code(status))
        }
        Err(ScopedError::Work(e)) => Err(Exit::new(1, e.to_string())),
        Err(e) => Err(Exit::new(1, e.to_string())),
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
