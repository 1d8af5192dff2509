//! SIGTERM and SIGINT: the first stops the work gracefully, the second exits at once.

/// Resolves on the first SIGTERM or SIGINT. A second one exits the process at once with
/// code 130; jobs still running stay unacknowledged and are reclaimed by other runners.
pub(crate) async fn shutdown_signal() {
    let mut signals = Signals::new();
    signals.next().await;
    tracing::info!("shutdown requested; send the signal again to exit at once");
    // The same handlers stay installed, so a second signal that comes quickly is not lost.
    tokio::spawn(async move {
        signals.next().await;
        eprintln!("job-runner: second signal, exiting now; unfinished jobs stay pending");
        // `exit` runs no destructors: take the children down first, or a `lock exec`
        // command would run on after its lock expires.
        job_runner::handlers::exec::kill_children();
        std::process::exit(130);
    });
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = signal(SignalKind::terminate())
            .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
            .ok();
        Signals { streams }
    }

    async fn next(&mut self) {
        match &mut self.streams {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
