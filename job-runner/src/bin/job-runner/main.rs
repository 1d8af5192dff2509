//! `job-runner`: parses the command line and the settings, sets up logs and the async
//! runtime, and runs the subcommand with a shutdown signal on SIGTERM or SIGINT.

use std::future::Future;

use clap::Parser;

/// Prints a line on stdout; a closed stdout (`job-runner info | head -1`) is not an error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// As `say!`, without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod args;
mod audit;
mod connect;
mod dead;
mod enqueue;
mod exit;
mod info;
mod lock_exec;
mod logs;
mod payment;
mod run;
mod settings;
mod signals;

use args::{Cli, Command, LedgerCommand, LockCommand};
use exit::{EX_CONFIG, Exit};
use settings::{Layer, Settings};

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == job_runner::handlers::exec::SUPERVISE)
    {
        job_runner::handlers::exec::supervise(&args[2..]);
    }
    let cli = Cli::parse();
    let settings = match settings_of(&cli) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("job-runner: {e}");
            std::process::exit(EX_CONFIG);
        }
    };
    logs::init(settings.log_format);
    // One thread by default: with tasks that never block, a current-thread runtime batches
    // the lock commands of many jobs into one write per node, where worker threads wake
    // each other for every command (measured: 14 600 vs 8 400 no-op jobs/s).
    let runtime = match settings.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .expect("the tokio runtime starts");
    let code = runtime.block_on(async {
        match dispatch(cli, settings, signals::shutdown_signal()).await {
            Ok(code) => code,
            Err(exit) => {
                eprintln!("job-runner: {}", exit.message);
                exit.code
            }
        }
    });
    // Give background work (a dropped guard's release, the lock nodes' and the acks'
    // driver tasks) a moment, but never hang the exit on it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

/// The settings in force: flags, then environment, then the `--config` file, then
/// defaults.
fn settings_of(cli: &Cli) -> Result<Settings, job_runner::ConfigError> {
    let file = match &cli.config {
        Some(path) => Layer::load(path)?,
        None => Layer::default(),
    };
    let redis_url = std::env::var("REDIS_URL").ok().filter(|v| !v.is_empty());
    let exec = match &cli.command {
        Command::Run(run) => run.exec.as_slice(),
        _ => &[],
    };
    Settings::resolve(cli.settings.clone(), redis_url, file, exec)
}

/// Runs the parsed command. `shutdown` stops `run` (and `lock exec`) when it resolves.
///
/// # Cancel safety
///
/// Resolve `shutdown` rather than dropping the future. If it is dropped anyway, locks held
/// by running jobs or by `lock exec` are released in the background (or expire by their
/// TTL), a `lock exec` child is killed, and unfinished jobs stay pending for another runner.
async fn dispatch(
    cli: Cli,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, Exit> {
    match cli.command {
        Command::Run(args) => {
            if args.print_config {
                say_raw!("{}", settings.to_toml());
                return Ok(0);
            }
            run::run(settings, args.once, shutdown).await.map(|()| 0)
        }
        Command::Enqueue(args) => enqueue::enqueue(&settings, args).await.map(|()| 0),
        Command::Info => info::info(&settings).await.map(|()| 0),
        Command::Dead(cmd) => dead::dead(&settings, cmd).await.map(|()| 0),
        Command::Lock(LockCommand::Exec(args)) => {
            lock_exec::lock_exec(&settings, args, shutdown).await
        }
        Command::Ledger(LedgerCommand::Audit) => audit::audit(&settings),
    }
}
