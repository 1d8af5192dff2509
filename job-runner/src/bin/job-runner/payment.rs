//! The demo `payment` kind as the binary runs it: its ledger is opened by the first
//! payment job, so a runner of other kinds never creates one.

use std::path::PathBuf;
use std::time::Duration;

use job_runner::handlers::payment::{PaymentHandler, SimulatedGateway};
use job_runner::ledger::Ledger;
use job_runner::{Handler, HandlerError, Job, JobContext, error};
use tokio::sync::OnceCell;

use crate::settings::Settings;

/// The payment handler, its ledger opened on first use.
pub(crate) struct LazyPayment {
    path: PathBuf,
    fencing: bool,
    gateway: SimulatedGateway,
    handler: OnceCell<PaymentHandler<SimulatedGateway>>,
}

impl LazyPayment {
    pub(crate) fn new(settings: &Settings) -> Self {
        LazyPayment {
            path: settings.ledger.clone(),
            fencing: settings.ledger_fencing,
            gateway: SimulatedGateway::new(
                Duration::ZERO,
                Duration::from_millis(settings.gateway_latency_ms),
                settings.gateway_failure_rate,
            ),
            handler: OnceCell::new(),
        }
    }

    async fn open(&self) -> Result<PaymentHandler<SimulatedGateway>, HandlerError> {
        if self.path.as_os_str().is_empty() {
            return Err(HandlerError::transient(
                "no ledger: neither XDG_STATE_HOME nor HOME is set; give --ledger",
            ));
        }
        let (path, fencing) = (self.path.clone(), self.fencing);
        let opened = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            Ledger::open_with(&path, fencing).map_err(|e| error::chain(&e))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let ledger = opened.map_err(|e| {
            HandlerError::transient(format!(
                "cannot open the ledger {}: {e}",
                self.path.display()
            ))
        })?;
        tracing::info!(ledger = %self.path.display(), "payment ledger opened");
        if !fencing {
            tracing::warn!("the ledger's fencing check is OFF: stale writes will be accepted");
        }
        Ok(PaymentHandler::new(ledger, self.gateway.clone()))
    }
}

impl Handler for LazyPayment {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        let handler = self.handler.get_or_try_init(|| self.open()).await?;
        handler.handle(job, ctx).await
    }
}
