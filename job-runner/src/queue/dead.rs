//! The dead-letter stream's admin: list dead letters and put them back.

use std::fmt;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::{Queue, QueueError};
use crate::job;

static DEAD_RETRY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/dead_retry.lua")));

/// One entry of the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadEntry {
    /// Its id in the dead-letter stream.
    pub id: String,
    /// Why it is there.
    pub reason: String,
    /// The job as it was delivered (possibly malformed).
    pub raw: String,
}

impl Queue {
    /// Up to `count` dead-letter entries, oldest first.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn dead_list(&self, count: usize) -> Result<Vec<DeadEntry>, QueueError> {
        self.dead_page(None, None, count).await
    }

    /// Up to `count` dead-letter entries, oldest first, after the entry `after` (from the
    /// start when `None`) and up to the entry `until` (to the end when `None`): for paging
    /// through the whole stream while entries are being added and removed.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn dead_page(
        &self,
        after: Option<&str>,
        until: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadEntry>, QueueError> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = conn
            .xrange_count(&self.dead, start, until.unwrap_or("+"), count)
            .await
            .map_err(QueueError::on("dead list"))?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| DeadEntry {
                reason: e.get("reason").unwrap_or_default(),
                raw: e.get("job").unwrap_or_default(),
                id: e.id,
            })
            .collect())
    }

    /// The id of the newest dead-letter entry, if there is one.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn dead_last_id(&self) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = conn
            .xrevrange_count(&self.dead, "+", "-", 1)
            .await
            .map_err(QueueError::on("dead list"))?;
        Ok(reply.ids.into_iter().next().map(|e| e.id))
    }

    /// Moves dead-letter entry `id` back into the queue with its attempt count reset.
    /// Returns false when there is no such entry (already retried, or a wrong id).
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails, or with [`DeadRetryError::Malformed`] when the entry
    /// is not a job (it stays where it is).
    pub async fn dead_retry(&self, id: &str) -> Result<bool, DeadRetryError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = conn
            .xrange(&self.dead, id, id)
            .await
            .map_err(QueueError::on("dead retry"))?;
        let Some(entry) = reply.ids.into_iter().next() else {
            return Ok(false);
        };
        let raw: Option<String> = entry.get("job");
        let mut job = job::parse(raw.as_deref()).map_err(|m| DeadRetryError::Malformed {
            id: id.to_owned(),
            reason: m.reason,
        })?;
        job.attempt = 0;
        let raw = serde_json::to_string(&job).expect("a job serializes");
        let moved: i64 = DEAD_RETRY
            .key(&self.stream)
            .key(&self.dead)
            .arg(id)
            .arg(raw)
            .invoke_async(&mut conn)
            .await
            .map_err(QueueError::on("dead retry"))?;
        Ok(moved == 1)
    }
}

/// Why a dead-letter entry could not be retried.
#[derive(Debug)]
#[non_exhaustive]
pub enum DeadRetryError {
    /// The queue's Redis failed.
    Queue(QueueError),
    /// The entry is not a valid job; retrying it would only dead-letter it again.
    Malformed {
        /// The entry.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<QueueError> for DeadRetryError {
    fn from(e: QueueError) -> Self {
        DeadRetryError::Queue(e)
    }
}

impl fmt::Display for DeadRetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadRetryError::Queue(e) => fmt::Display::fmt(e, f),
            DeadRetryError::Malformed { id, reason } => {
                write!(
                    f,
                    "dead-letter entry {id} is not a job ({reason}); left in place"
                )
            }
        }
    }
}

impl std::error::Error for DeadRetryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DeadRetryError::Queue(e) => e.source(),
            DeadRetryError::Malformed { .. } => None,
        }
    }
}
