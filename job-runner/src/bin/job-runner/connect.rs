//! Connections every subcommand opens: the queue and the lock client.

use std::time::Duration;

use fencelock::Redlock;
use job_runner::Queue;
use job_runner::error;

use crate::exit::{EX_CONFIG, EX_UNAVAILABLE, Exit};
use crate::settings::{Settings, redact};

/// The queue, as `consumer`.
pub(crate) async fn queue(settings: &Settings, consumer: &str) -> Result<Queue, Exit> {
    Queue::connect(&settings.queue, &settings.queue_name, consumer)
        .await
        .map(|q| {
            q.max_entry_bytes(settings.max_payload_bytes)
                .max_dead(settings.max_dead_letters)
        })
        .map_err(|e| {
            Exit::new(
                EX_UNAVAILABLE,
                format!(
                    "cannot reach the queue at {}: {}",
                    redact(&settings.queue),
                    error::chain(&e)
                ),
            )
        })
}

/// The lock client. Its restart quarantine covers `longest_ttl`, the longest TTL this
/// process locks with: a lock node that restarted without its data must not vote again
/// while a lock it granted may still be valid.
pub(crate) async fn locks(settings: &Settings, longest_ttl: Duration) -> Result<Redlock, Exit> {
    let nodes = settings.require_lock_nodes()?;
    Redlock::builder()
        .nodes(nodes.iter().cloned())
        .node_timeout(Duration::from_millis(settings.lock_node_timeout_ms))
        .restart_quarantine(longest_ttl.max(fencelock::DEFAULT_RESTART_QUARANTINE))
        .fencing(true)
        .fence_window(Duration::from_millis(settings.lock_fence_window_ms))
        .build()
        .await
        .map_err(|e| Exit::new(EX_CONFIG, format!("config error in `lock_nodes`: {e}")))
}
