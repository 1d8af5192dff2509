//! The stream operations a producer and a runner use: enqueue, fetch, reclaim, touch,
//! ack, retry, dead-letter, promote, and the counts.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use metrics::counter;
use redis::streams::StreamPendingCountReply;
use redis::{AsyncCommands, Script};
use tokio::sync::oneshot;

use super::delivery::{delivery, new_entry};
use super::{Ack, Delivery, MAX_FETCH_BLOCK, Queue, QueueError, Reclaimed, entries};
use crate::job::{Job, NewJob};
use crate::telemetry::names;

static DEAD_LETTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/dead_letter.lua")));
static RETRY_LATER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/retry_later.lua")));
static PROMOTE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/promote.lua")));
static TOUCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/touch.lua")));

impl Queue {
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
    /// consumer, at most `count`; with a zero `block`, takes only those already there.
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
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        // `BLOCK 0` would wait forever: zero means no BLOCK at all.
        let block_ms = block.min(MAX_FETCH_BLOCK).as_millis() as u64;
        if block_ms > 0 {
            cmd.arg("BLOCK").arg(block_ms);
        }
        let reply: Result<redis::Value, _> = cmd
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
