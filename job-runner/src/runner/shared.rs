//! What every job task of one runner shares.

use std::sync::Arc;

use fencelock::Redlock;

use super::settings::RunnerSettings;
use crate::handler::Registry;
use crate::queue::Queue;
use crate::telemetry::Health;

/// The runner's parts, behind one `Arc` that each job task holds.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) queue: Queue,
    pub(crate) locks: Redlock,
    pub(crate) handlers: Registry,
    /// The registered kinds, for dead letters of jobs no handler takes.
    pub(crate) kinds: Vec<String>,
    pub(crate) settings: RunnerSettings,
    pub(crate) health: Health,
    /// This process's consumer name.
    pub(crate) worker: Arc<str>,
}
