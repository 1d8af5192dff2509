//! What a queue operation's failure says.

use std::fmt;

/// A queue failure: the queue's Redis did not do what was asked.
#[derive(Debug)]
pub struct QueueError {
    operation: &'static str,
    source: redis::RedisError,
}

impl QueueError {
    pub(super) fn on(operation: &'static str) -> impl FnOnce(redis::RedisError) -> QueueError {
        move |source| QueueError { operation, source }
    }

    /// Whether retrying may help (connection trouble, as opposed to a wrong command).
    pub fn is_retryable(&self) -> bool {
        self.source.is_io_error() || self.source.is_connection_dropped() || self.source.is_timeout()
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue {} failed", self.operation)
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
