//! Noticing that the queue node lost data, and warning when it would.

use redis::aio::ConnectionManager;

/// What this process has seen of the queue node, to notice that it lost data.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// The queue's epoch: a random value written when the queue is created, which an
    /// empty node no longer has.
    pub(super) epoch: Option<String>,
    /// The newest entry id this process enqueued or was handed. A node whose stream ends
    /// before it came back with older data.
    pub(super) high_water: (u64, u64),
}

/// How a queue node lost data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Loss {
    /// Its epoch is gone or another (restarted empty, or restored from before the queue
    /// existed); or its consumer group is gone.
    Wiped,
    /// Its stream ends before entries this process saw (restored from an older snapshot,
    /// or the tail of its append-only file was lost).
    RolledBack,
}

/// Warns when the queue node would lose acknowledged or enqueued jobs on a restart: with
/// anything but an append-only file synced on every write, a restart loses the newest
/// writes or all of them. Managed Redis often refuses `CONFIG`; that is only noted.
pub(super) async fn check_persistence(conn: &mut ConnectionManager) {
    let reply: Result<(Vec<String>, Vec<String>), _> = redis::pipe()
        .cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async(conn)
        .await;
    match reply {
        Ok((appendonly, appendfsync)) => {
            let appendonly = appendonly.get(1).map_or("?", String::as_str);
            let appendfsync = appendfsync.get(1).map_or("?", String::as_str);
            if appendonly != "yes" || appendfsync != "always" {
                tracing::warn!(
                    appendonly,
                    appendfsync,
                    "the queue node does not sync every write to an append-only file: a \
                     restart loses the newest writes or all of them (jobs enqueued, jobs \
                     finished); run it with --appendonly yes --appendfsync always"
                );
            }
        }
        Err(e) => tracing::info!(error = %e, "could not check the queue node's persistence"),
    }
}
