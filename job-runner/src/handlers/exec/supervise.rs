//! The supervisor each exec command runs under, so that it dies with its runner.

use std::ffi::OsString;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use tokio::process::Command;

/// The hidden subcommand of the binary that supervises one exec command:
/// `job-runner __supervise <runner pid> <program> [args...]`.
pub const SUPERVISE: &str = "__supervise";

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
