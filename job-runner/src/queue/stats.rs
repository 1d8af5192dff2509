//! The queue's counts, for `info` and the gauges.

use super::{Queue, QueueError};

/// Depth, pending, delayed and dead counts of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries not yet delivered to any consumer (the group's lag).
    pub depth: u64,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    /// Jobs waiting in the delayed set for a retry or a scheduled run.
    pub delayed: u64,
    /// Entries in the dead-letter stream.
    pub dead: u64,
    /// Consumers the group has seen.
    pub consumers: u64,
}

impl Queue {
    /// Depth, pending, delayed and dead counts, in one round trip.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let mut conn = self.conn.clone();
        let (groups, delayed, dead, len): (redis::Value, u64, u64, u64) = redis::pipe()
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .zcard(&self.delayed)
            .xlen(&self.dead)
            .xlen(&self.stream)
            .query_async(&mut conn)
            .await
            .map_err(QueueError::on("stats"))?;
        let mut stats = QueueStats {
            delayed,
            dead,
            ..QueueStats::default()
        };
        if let redis::Value::Array(groups) = groups {
            for group in groups {
                let fields: std::collections::HashMap<String, redis::Value> =
                    redis::from_redis_value(group).unwrap_or_default();
                let name: Option<String> = fields
                    .get("name")
                    .and_then(|v| redis::from_redis_value_ref(v).ok());
                if name.as_deref() != Some(self.group.as_str()) {
                    continue;
                }
                let int = |key: &str| -> u64 {
                    fields
                        .get(key)
                        .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                        .unwrap_or(0)
                };
                stats.pending = int("pending");
                // Redis cannot tell the lag once entries after the oldest pending one were
                // deleted (as retiring does) and reports nil. Every delivered entry is then
                // pending or deleted, so the rest of the stream is the undelivered part.
                stats.depth = fields
                    .get("lag")
                    .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                    .unwrap_or_else(|| len.saturating_sub(stats.pending));
                stats.consumers = int("consumers");
            }
        }
        Ok(stats)
    }
}
