//! `job-runner run`: the runner, its handlers, and the metrics endpoint, until a signal.

use std::future::Future;
use std::time::Duration;

use job_runner::handlers::exec::ExecHandler;
use job_runner::telemetry::{self, Health, names};
use job_runner::{Noop, Queue, Registry, Runner};
use tokio_util::sync::CancellationToken;

use crate::connect;
use crate::exit::{EX_UNAVAILABLE, Exit};
use crate::payment::LazyPayment;
use crate::settings::Settings;

/// Runs until `shutdown` (or, with `once`, until the queue is drained).
///
/// # Errors
///
/// On a configuration error or when the queue or the ledger cannot be opened.
///
/// # Cancel safety
///
/// As [`Runner::run`]: resolve `shutdown` for a graceful stop; a dropped future leaves
/// unfinished jobs pending and their locks released in the background.
pub(crate) async fn run(
    settings: Settings,
    once: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Exit> {
    let metrics_addr = settings.metrics_socket()?;
    let locks = connect::locks(&settings, settings.lock_ttl()).await?;
    let queue = connect::queue(&settings, &settings.consumer).await?;
    let handlers = handlers(&settings)?;
    let health = Health::new(Duration::from_secs(15));
    let mut runner_settings = settings.runner();
    runner_settings.once = once;
    let lock_nodes = locks.clone();
    let runner = Runner::builder(queue, locks, handlers)
        .settings(runner_settings)
        .health(health.clone())
        .build()?;

    let stop_http = CancellationToken::new();
    let server = match metrics_addr {
        Some(addr) => {
            let listener = telemetry::bind(addr)
                .await
                .map_err(|e| Exit::new(EX_UNAVAILABLE, e.to_string()))?;
            tracing::info!(%addr, "serving /metrics and /healthz");
            let handle = telemetry::install_recorder();
            let stop = stop_http.clone();
            Some(tokio::spawn(telemetry::serve(
                listener,
                handle,
                health,
                async move { stop.cancelled().await },
            )))
        }
        None => None,
    };
    let gauges = tokio::spawn(report_gauges(runner.queue().clone(), lock_nodes));
    runner.run(shutdown).await;
    gauges.abort();
    stop_http.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
}

/// The built-in kinds (`payment`, `noop`) and the configured exec kinds.
fn handlers(settings: &Settings) -> Result<Registry, Exit> {
    let mut handlers = Registry::new()
        .with("payment", LazyPayment::new(settings))
        .with("noop", Noop);
    if !settings.exec.is_empty() {
        let mut exec =
            ExecHandler::new(settings.exec.clone()).env_allow(settings.exec_env.iter().cloned());
        // The binary can supervise its own commands (a library user's runner cannot
        // assume its executable understands `__supervise`).
        if let Ok(me) = std::env::current_exe() {
            exec = exec.supervisor(me);
        }
        for kind in settings.exec.keys() {
            handlers.insert(kind.clone(), exec.clone());
        }
    }
    Ok(handlers)
}

/// The gauges read from outside the runner: the lock nodes' health every second (it is
/// in memory), the queue's counts every fifth (they cost a few commands).
async fn report_gauges(queue: Queue, locks: fencelock::Redlock) {
    for turn in 0u64.. {
        telemetry::record_lock_nodes(&locks);
        if turn % 5 == 0
            && let Ok(st) = queue.stats().await
        {
            metrics::gauge!(names::QUEUE_DEPTH).set(st.depth as f64);
            metrics::gauge!(names::QUEUE_PENDING).set(st.pending as f64);
            metrics::gauge!(names::QUEUE_DELAYED).set(st.delayed as f64);
            metrics::gauge!(names::QUEUE_DEAD).set(st.dead as f64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
