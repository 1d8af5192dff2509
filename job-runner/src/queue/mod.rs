//! The job queue: a Redis Stream with a consumer group, a delayed set for retries, and a
//! dead-letter stream.
//!
//! Delivery is at least once: `XREADGROUP` hands an entry to one consumer, `XACK` retires
//! it after the job is done, and `XAUTOCLAIM` hands entries idle longer than the visibility
//! timeout (their consumer died or stalled) to another. Retrying and dead-lettering are
//! scripts that write the job's next home and acknowledge the entry in one step.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::counter;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use crate::telemetry::names;

mod acks;
pub mod dead;
mod delivery;
mod entries;
mod error;
mod loss;
mod ops;
pub mod stats;

use acks::{Ack, ack_batches};
pub use delivery::{Delivery, Reclaimed};
pub use entries::decode_dead_fields;
pub use error::QueueError;
use loss::{Loss, Seen, check_persistence};

/// The largest job entry [`Queue::enqueue`] writes and a fetch parses, by default.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// The most dead letters a queue keeps, by default.
pub const DEFAULT_MAX_DEAD: u64 = 100_000;

/// The longest [`Queue::fetch`] blocks; its connection's response timeout is set above it.
pub const MAX_FETCH_BLOCK: Duration = Duration::from_secs(5);
/// The response timeout of the queue's ordinary commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// A queue on one Redis, shared by every worker of a process (cheap to clone).
///
/// It holds two self-reconnecting connections: one for the blocking `XREADGROUP`, which
/// would otherwise hold up every ack queued behind it on a shared connection, and one for
/// everything else. Acks go through a task that sends those made while one `XACK` is in
/// flight as the next `XACK`, so a busy runner acks a batch of entries per round trip.
#[derive(Clone)]
pub struct Queue {
    conn: ConnectionManager,
    blocking: ConnectionManager,
    acks: mpsc::UnboundedSender<Ack>,
    stream: String,
    delayed: String,
    dead: String,
    epoch_key: String,
    group: String,
    consumer: String,
    seen: Arc<Mutex<Seen>>,
    max_entry_bytes: usize,
    max_dead: u64,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Connects to the queue `name` on the Redis at `url` as `consumer` (unique per
    /// process), creating the stream and the consumer group if they do not exist.
    ///
    /// Keys: `{name}:jobs` (stream), `{name}:delayed` (sorted set), `{name}:dead` (stream);
    /// the group is `{name}-workers`.
    ///
    /// # Errors
    ///
    /// When the Redis cannot be reached or refuses to create the group.
    pub async fn connect(url: &str, name: &str, consumer: &str) -> Result<Queue, QueueError> {
        let client = redis::Client::open(url).map_err(QueueError::on("connect"))?;
        // Fail fast at startup (the caller reports it); reconnect by itself later on.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let mut conn = ConnectionManager::new_with_config(
            client.clone(),
            config.clone().set_response_timeout(Some(COMMAND_TIMEOUT)),
        )
        .await
        .map_err(QueueError::on("connect"))?;
        let blocking = ConnectionManager::new_with_config(
            client,
            config.set_response_timeout(Some(MAX_FETCH_BLOCK + COMMAND_TIMEOUT)),
        )
        .await
        .map_err(QueueError::on("connect"))?;
        let stream = format!("{name}:jobs");
        let group = format!("{name}-workers");
        check_persistence(&mut conn).await;
        let (acks, rx) = mpsc::unbounded_channel();
        tokio::spawn(ack_batches(
            conn.clone(),
            stream.clone(),
            group.clone(),
            consumer.to_owned(),
            rx,
        ));
        let queue = Queue {
            conn,
            blocking,
            acks,
            delayed: format!("{name}:delayed"),
            dead: format!("{name}:dead"),
            epoch_key: format!("{name}:epoch"),
            stream,
            group,
            consumer: consumer.to_owned(),
            seen: Arc::default(),
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            max_dead: DEFAULT_MAX_DEAD,
        };
        queue.create().await?;
        Ok(queue)
    }

    /// The largest job entry to write or parse (default [`DEFAULT_MAX_ENTRY_BYTES`]): an
    /// enqueue of a larger job fails, and a larger entry found in the stream is
    /// dead-lettered unparsed, with a bounded summary of its fields instead of a copy.
    #[must_use]
    pub fn max_entry_bytes(mut self, bytes: usize) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// The most dead letters kept (default [`DEFAULT_MAX_DEAD`], at least 1): writing
    /// one more drops the oldest, counted in `job_runner_dead_letters_dropped_total` and
    /// logged, so that a flood of bad jobs cannot fill the queue node's memory.
    #[must_use]
    pub fn max_dead(mut self, n: u64) -> Self {
        self.max_dead = n.max(1);
        self
    }

    fn check_size(&self, raw: &str) -> Result<(), QueueError> {
        if raw.len() <= self.max_entry_bytes {
            return Ok(());
        }
        Err(QueueError::on("enqueue")(redis::RedisError::from((
            redis::ErrorKind::Client,
            "job too large",
            format!(
                "{} bytes, more than the limit of {} (max_payload_bytes)",
                raw.len(),
                self.max_entry_bytes
            ),
        ))))
    }

    /// Creates the stream and the group (from the stream's start) if they are missing,
    /// and the epoch if it is missing; adopts the epoch in place.
    async fn create(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let created: Result<(), _> = conn
            .xgroup_create_mkstream(&self.stream, &self.group, "0")
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(QueueError::on("create group")(e));
        }
        let fresh = format!("{:032x}", SmallRng::from_os_rng().random::<u128>());
        let (epoch,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(&self.epoch_key)
            .arg(fresh)
            .arg("NX")
            .ignore()
            .get(&self.epoch_key)
            .query_async(&mut conn)
            .await
            .map_err(QueueError::on("create epoch"))?;
        self.seen.lock().expect("never poisoned").epoch = Some(epoch);
        Ok(())
    }

    /// Reports a loss of queue data loudly (an error line and
    /// `job_runner_queue_data_lost_total{what}`), and recreates what the queue needs.
    async fn lost(&self, loss: Loss, detail: String) -> Result<(), QueueError> {
        let what = match loss {
            Loss::Wiped => "wiped",
            Loss::RolledBack => "rolled_back",
        };
        counter!(names::QUEUE_DATA_LOST, "what" => what).increment(1);
        tracing::error!(
            queue = %self.stream,
            what,
            "the queue node lost data: {detail}; check its persistence (appendonly yes, appendfsync always)"
        );
        if loss == Loss::Wiped {
            self.seen.lock().expect("never poisoned").high_water = (0, 0);
        }
        self.create().await
    }

    /// Compares what the queue node holds with what this process saw, and reports a loss.
    async fn observe(
        &self,
        epoch: Option<String>,
        last_id: Option<String>,
    ) -> Result<(), QueueError> {
        let last = last_id
            .as_deref()
            .and_then(entries::parse_id)
            .unwrap_or((0, 0));
        let (loss, detail) = {
            let mut seen = self.seen.lock().expect("never poisoned");
            if epoch != seen.epoch {
                (
                    Loss::Wiped,
                    "its queue epoch is gone or changed (it restarted empty, or was restored \
                     from before the queue existed): every job that waited, was delayed or \
                     ran there before is gone, dead letters too; the consumer group is \
                     recreated from the start of the stream"
                        .to_owned(),
                )
            } else if last < seen.high_water {
                let (hm, hs) = seen.high_water;
                seen.high_water = last;
                (
                    Loss::RolledBack,
                    format!(
                        "its stream ends at {}-{} but this process saw entries up to {hm}-{hs} \
                         (it came back with older data): jobs enqueued after {}-{} are lost, \
                         and jobs finished since then may run again",
                        last.0, last.1, last.0, last.1
                    ),
                )
            } else {
                return Ok(());
            }
        };
        self.lost(loss, detail).await
    }

    /// Notes an entry id this process enqueued or was handed.
    fn saw(&self, id: &str) {
        if let Some(id) = entries::parse_id(id) {
            let mut seen = self.seen.lock().expect("never poisoned");
            seen.high_water = seen.high_water.max(id);
        }
    }

    /// The group is missing: the node lost its data (or someone deleted it).
    async fn group_missing(&self, operation: &str) -> Result<(), QueueError> {
        self.lost(
            Loss::Wiped,
            format!(
                "{operation} found no consumer group (the node restarted empty, or the group \
                 was deleted): every job that waited, was delayed or ran there before is \
                 gone, dead letters too; the group is recreated from the start of the stream"
            ),
        )
        .await
    }
}
