//! The job queue: a Redis Stream with a consumer group, a delayed set for retries, and a
//! dead-letter stream.
//!
//! Delivery is at least once: `XREADGROUP` hands an entry to one consumer, `XACK` retires
//! it after the job is done, and `XAUTOCLAIM` hands entries idle longer than the visibility
//! timeout (their consumer died or stalled) to another. Retrying and dead-lettering are
//! scripts that write the job's next home and acknowledge the entry in one step.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::counter;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamPendingCountReply;
use redis::{AsyncCommands, Script};
use tokio::sync::{mpsc, oneshot};

use crate::job::{self, Job, Malformed, NewJob};
use crate::telemetry::names;

mod entries;

use entries::RawEntry;
pub use entries::decode_dead_fields;

static DEAD_LETTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/dead_letter.lua")));
static RETRY_LATER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/retry_later.lua")));
static PROMOTE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/promote.lua")));
static DEAD_RETRY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/dead_retry.lua")));
static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/ack.lua")));
static TOUCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/touch.lua")));

/// The largest job entry [`Queue::enqueue`] writes and a fetch parses, by default.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// The most dead letters a queue keeps, by default.
pub const DEFAULT_MAX_DEAD: u64 = 100_000;

/// The longest [`Queue::fetch`] blocks; its connection's response timeout is set above it.
pub const MAX_FETCH_BLOCK: Duration = Duration::from_secs(5);
/// The response timeout of the queue's ordinary commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// A queue failure: the queue's Redis did not do what was asked.
#[derive(Debug)]
pub struct QueueError {
    operation: &'static str,
    source: redis::RedisError,
}

impl QueueError {
    fn on(operation: &'static str) -> impl FnOnce(redis::RedisError) -> QueueError {
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

/// One delivered entry: a job, or the reason it is not one.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The stream entry id, for ack, retry and dead-letter.
    pub entry_id: String,
    /// The entry's raw `job` field, kept for the dead-letter stream. An entry without a
    /// UTF-8 `job` field has a readable summary of all its fields here instead (a JSON
    /// object, lossily decoded, each field cut to 1 KiB); its dead letter also keeps the
    /// exact bytes (see [`decode_dead_fields`]).
    pub raw: String,
    /// The parsed job.
    pub job: Result<Job, Malformed>,
    /// How many times the group has handed this entry out, this time included: 1 for a
    /// fresh fetch, more when it was reclaimed from consumers that crashed or stalled.
    pub deliveries: u64,
    /// Whether its dead letter keeps the entry's exact fields: for an entry that is not a
    /// job, unless it is over the size limit (then only its bounded summary is kept).
    keep_fields: bool,
}

/// What one [`Queue::reclaim`] took over.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Reclaimed {
    /// The entries, now pending for this consumer.
    pub entries: Vec<Delivery>,
    /// Where the next call should start scanning the pending list (`0-0` once the scan
    /// has gone round).
    pub cursor: String,
}

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

/// What this process has seen of the queue node, to notice that it lost data.
#[derive(Debug, Default)]
struct Seen {
    /// The queue's epoch: a random value written when the queue is created, which an
    /// empty node no longer has.
    epoch: Option<String>,
    /// The newest entry id this process enqueued or was handed. A node whose stream ends
    /// before it came back with older data.
    high_water: (u64, u64),
}

/// How a queue node lost data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Its epoch is gone or another (restarted empty, or restored from before the queue
    /// existed); or its consumer group is gone.
    Wiped,
    /// Its stream ends before entries this process saw (restored from an older snapshot,
    /// or the tail of its append-only file was lost).
    RolledBack,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

    /// Adds a job; returns its id.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn enqueue(&self, new: &NewJob) -> Result<String, QueueError> {
        let (id, raw) = new_entry(new);
        self.check_size(&raw)?;
        let mut conn = self.conn.clone();
        let entry: String = conn
            .xadd(&self.stream, "*", &[("job", raw)])
            .await
            .map_err(QueueError::on("enqueue"))?;
        self.saw(&entry);
        Ok(id)
    }

    /// The consumer name this queue reads as.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Adds many jobs in one round trip; returns their ids.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails; then none or some of them were added.
    pub async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<String>, QueueError> {
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(jobs.len());
        for new in jobs {
            let (id, raw) = new_entry(new);
            self.check_size(&raw)?;
            pipe.xadd(&self.stream, "*", &[("job", raw)]);
            ids.push(id);
        }
        let mut conn = self.conn.clone();
        let entries: Vec<String> = pipe
            .query_async(&mut conn)
            .await
            .map_err(QueueError::on("enqueue"))?;
        if let Some(last) = entries.last() {
            self.saw(last);
        }
        Ok(ids)
    }

    /// Waits up to `block` (at most [`MAX_FETCH_BLOCK`]) for new entries for this
    /// consumer, at most `count`.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if the future is dropped after Redis handed out entries, they stay
    /// pending for this consumer until another consumer reclaims them after the visibility
    /// timeout. Nothing is lost, but they are late.
    pub async fn fetch(&self, count: usize, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut conn = self.blocking.clone();
        // Read as bytes: whatever an entry holds must not make the reply undecodable.
        let reply: Result<redis::Value, _> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.min(MAX_FETCH_BLOCK).as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.group_missing("a fetch").await?;
                return Ok(Vec::new());
            }
            other => other.map_err(QueueError::on("fetch"))?,
        };
        let entries = entries::read_reply(reply).map_err(QueueError::on("fetch"))?;
        if let Some(last) = entries.last() {
            self.saw(&last.id);
        }
        Ok(entries
            .into_iter()
            .map(|e| delivery(e, self.max_entry_bytes))
            .collect())
    }

    /// Takes over entries that have been pending longer than `visibility` (their consumer
    /// crashed or stalled), at most `count`, scanning the pending list from `cursor`
    /// (`"0-0"` for its start). Pass the returned [`Reclaimed::cursor`] to the next call:
    /// Redis scans at most ten times `count` pending entries per call, so restarting from
    /// the start every time would leave stalled entries behind a long run of busy ones.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn reclaim(
        &self,
        visibility: Duration,
        count: usize,
        cursor: &str,
    ) -> Result<Reclaimed, QueueError> {
        let mut conn = self.conn.clone();
        let reply: Result<redis::Value, _> = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(visibility.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.group_missing("a reclaim").await?;
                return Ok(Reclaimed {
                    entries: Vec::new(),
                    cursor: "0-0".into(),
                });
            }
            other => other.map_err(QueueError::on("reclaim"))?,
        };
        let reply = entries::autoclaim_reply(reply).map_err(QueueError::on("reclaim"))?;
        let mut entries: Vec<Delivery> = reply
            .entries
            .into_iter()
            .map(|e| delivery(e, self.max_entry_bytes))
            .collect();
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            // XAUTOCLAIM does not say how often an entry was handed out; the pending list
            // does. The claimed entries are in id order, so one range covers them all.
            let pending: StreamPendingCountReply = conn
                .xpending_consumer_count(
                    &self.stream,
                    &self.group,
                    &first.entry_id,
                    &last.entry_id,
                    entries.len(),
                    &self.consumer,
                )
                .await
                .map_err(QueueError::on("reclaim"))?;
            let times: HashMap<&str, usize> = pending
                .ids
                .iter()
                .map(|p| (p.id.as_str(), p.times_delivered))
                .collect();
            for e in &mut entries {
                // An entry missing from the range was retired meanwhile; it counts as
                // handed out at least twice (once before, and by this claim).
                e.deliveries = times.get(e.entry_id.as_str()).map_or(2, |&n| n as u64);
            }
        }
        Ok(Reclaimed {
            entries,
            cursor: reply.cursor,
        })
    }

    /// Resets the idle time of entries this consumer is still working on, so that
    /// [`reclaim`](Self::reclaim) elsewhere does not take them over while the job runs.
    /// Returns the ids that are no longer this consumer's: another consumer reclaimed
    /// them while this one stalled longer than the visibility timeout, or they were
    /// retired. Those are left with their new owner.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn touch(&self, entry_ids: &[&str]) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        TOUCH
            .key(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(entry_ids)
            .invoke_async(&mut conn)
            .await
            .map_err(QueueError::on("touch"))
    }

    /// Retires a done entry, if it is still this consumer's. Returns false, having done
    /// nothing, when it is not: another consumer reclaimed it while this one stalled, and
    /// the entry is that one's to retire (it may have scheduled a copy of the job already,
    /// which a plain `XACK` from here would not undo). Acks made while one is in flight go
    /// out together as one script call.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails; the entry then stays pending and is reclaimed later.
    ///
    /// # Cancel safety
    ///
    /// The ack is queued when the future is first polled and is sent whether or not the
    /// future is then dropped.
    pub async fn ack(&self, entry_id: &str) -> Result<bool, QueueError> {
        let (done, rx) = oneshot::channel();
        let sent = self.acks.send(Ack {
            entry_id: entry_id.to_owned(),
            done,
        });
        let stopped = || {
            QueueError::on("ack")(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the ack task has stopped (its runtime shut down)",
            )))
        };
        if sent.is_err() {
            return Err(stopped());
        }
        match rx.await {
            Ok(result) => result.map_err(QueueError::on("ack")),
            Err(_) => Err(stopped()),
        }
    }

    /// Schedules `job` to run again after `delay` and retires the entry, in one step.
    ///
    /// Returns false, having written nothing, when the entry is no longer pending for this
    /// consumer: another consumer reclaimed it while this one stalled (the job is that
    /// one's now), or it was already retired.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails; the entry then stays pending and is reclaimed later.
    pub async fn retry_later(
        &self,
        entry_id: &str,
        job: &Job,
        delay: Duration,
    ) -> Result<bool, QueueError> {
        let raw = serde_json::to_string(job).expect("a job serializes");
        let mut conn = self.conn.clone();
        let moved: i64 = RETRY_LATER
            .key(&self.stream)
            .key(&self.delayed)
            .arg(&self.group)
            .arg(entry_id)
            .arg(raw)
            .arg(delay.as_millis() as u64)
            .arg(&self.consumer)
            .invoke_async(&mut conn)
            .await
            .map_err(QueueError::on("retry"))?;
        Ok(moved == 1)
    }

    /// Writes the entry to the dead-letter stream with `reason`, then retires it. An entry
    /// that is not a job keeps its exact fields in the dead letter's `fields` (see
    /// [`decode_dead_fields`]).
    ///
    /// Returns false, having written nothing, when the entry is no longer pending for this
    /// consumer: another consumer reclaimed it while this one stalled, or it was already
    /// retired.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails; the entry then stays pending and is reclaimed later.
    pub async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        let written: Option<(String, u64)> = DEAD_LETTER
            .key(&self.stream)
            .key(&self.dead)
            .arg(&self.group)
            .arg(&delivery.entry_id)
            .arg(&delivery.raw)
            .arg(reason)
            .arg(&self.consumer)
            .arg(if delivery.keep_fields { "1" } else { "0" })
            .arg(self.max_dead)
            .invoke_async(&mut conn)
            .await
            .map_err(QueueError::on("dead-letter"))?;
        if let Some((_, dropped)) = written
            && dropped > 0
        {
            counter!(names::DEAD_DROPPED).increment(dropped);
            tracing::warn!(
                dropped,
                max = self.max_dead,
                "the dead-letter stream is full: its oldest entries were dropped"
            );
        }
        Ok(written.is_some())
    }

    /// Moves delayed jobs that are due, by the queue node's clock, into the stream;
    /// returns how many.
    ///
    /// It also checks that the queue node has not lost data since this process last
    /// looked: a node that restarted empty (its queue epoch is gone) or came back with
    /// older data (its stream ends before entries this process enqueued or was handed)
    /// is reported loudly, as an error line and `job_runner_queue_data_lost_total{what}`,
    /// and the consumer group is recreated if it is missing.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn promote_due(&self, max: usize) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        let (moved, epoch, last_id): (usize, Option<String>, Option<String>) = PROMOTE
            .key(&self.stream)
            .key(&self.delayed)
            .key(&self.epoch_key)
            .arg(max)
            .invoke_async(&mut conn)
            .await
            .map_err(QueueError::on("promote"))?;
        self.observe(epoch, last_id).await?;
        Ok(moved)
    }

    /// Entries delivered and not yet acknowledged, across all consumers.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn pending(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamPendingReply = conn
            .xpending(&self.stream, &self.group)
            .await
            .map_err(QueueError::on("pending"))?;
        Ok(reply.count() as u64)
    }

    /// Jobs waiting in the delayed set.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn delayed(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        conn.zcard(&self.delayed)
            .await
            .map_err(QueueError::on("delayed"))
    }

    /// Entries in the dead-letter stream.
    ///
    /// # Errors
    ///
    /// When the queue's Redis fails.
    pub async fn dead(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        conn.xlen(&self.dead).await.map_err(QueueError::on("dead"))
    }
}

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

/// A new job's id and its stream entry (`job` field).
fn new_entry(new: &NewJob) -> (String, String) {
    let job = Job {
        id: format!("{:032x}", SmallRng::from_os_rng().random::<u128>()),
        kind: new.kind.clone(),
        resource: new.resource.clone(),
        payload: new.payload.clone(),
        attempt: 0,
        enqueued_at_ms: now_ms(),
        requeues: 0,
    };
    let raw = serde_json::to_string(&job).expect("a job serializes");
    (job.id, raw)
}

fn delivery(entry: RawEntry, max_bytes: usize) -> Delivery {
    let size: usize = entry.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > max_bytes {
        return Delivery {
            job: Err(Malformed {
                reason: format!(
                    "the entry is {size} bytes, more than the limit of {max_bytes} \
                     (max_payload_bytes); only a summary of it is kept"
                ),
            }),
            raw: entries::summary(&entry.fields),
            entry_id: entry.id,
            deliveries: 1,
            keep_fields: false,
        };
    }
    let job_field = entry
        .fields
        .iter()
        .find(|(name, _)| name.as_slice() == b"job")
        .map(|(_, value)| value);
    let (raw, job) = match job_field.map(|v| std::str::from_utf8(v)) {
        Some(Ok(text)) => (text.to_owned(), job::parse(Some(text))),
        Some(Err(_)) => (
            entries::summary(&entry.fields),
            Err(Malformed {
                reason: "the entry's `job` field is not UTF-8 text".into(),
            }),
        ),
        None => (entries::summary(&entry.fields), job::parse(None)),
    };
    Delivery {
        keep_fields: job.is_err(),
        job,
        raw,
        entry_id: entry.id,
        deliveries: 1,
    }
}

/// Warns when the queue node would lose acknowledged or enqueued jobs on a restart: with
/// anything but an append-only file synced on every write, a restart loses the newest
/// writes or all of them. Managed Redis often refuses `CONFIG`; that is only noted.
async fn check_persistence(conn: &mut ConnectionManager) {
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

/// One entry to acknowledge, and who waits for it.
struct Ack {
    entry_id: String,
    done: oneshot::Sender<Result<bool, redis::RedisError>>,
}

/// The most entries one `XACK` carries.
const MAX_ACK_BATCH: usize = 512;

/// Sends the acks: at once when idle, and those made while one is in flight as one
/// script call after it (group commit). Ends when every clone of the queue is gone.
async fn ack_batches(
    mut conn: ConnectionManager,
    stream: String,
    group: String,
    consumer: String,
    mut rx: mpsc::UnboundedReceiver<Ack>,
) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_ACK_BATCH).await > 0 {
        let ids: Vec<&str> = batch.iter().map(|a| a.entry_id.as_str()).collect();
        let result: Result<Vec<i64>, _> = ACK
            .key(&stream)
            .arg(&group)
            .arg(&consumer)
            .arg(&ids)
            .invoke_async(&mut conn)
            .await;
        for (i, ack) in batch.drain(..).enumerate() {
            let outcome = match &result {
                Ok(done) => Ok(done.get(i) == Some(&1)),
                Err(e) => Err(e.clone()),
            };
            let _ = ack.done.send(outcome);
        }
    }
}
