//! A lock-guarded job runner built on [`fencelock`].
//!
//! Work in progress. What exists: the [`job`] model and the [`queue`] on a Redis Stream
//! with a consumer group (at-least-once delivery, reclaim of stalled entries, a delayed set
//! for retries, a dead-letter stream written before the ack). The workers, handlers,
//! ledger and binary come next.

pub mod job;
pub mod queue;

pub use fencelock;
pub use job::{Job, NewJob};
pub use queue::{Delivery, Queue, QueueError};
