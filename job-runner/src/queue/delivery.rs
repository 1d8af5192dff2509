//! One delivered entry, and a new job's entry.

use std::time::{SystemTime, UNIX_EPOCH};

use super::entries::{self, RawEntry};
use crate::job::{self, Job, Malformed, NewJob};

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
    pub(super) keep_fields: bool,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new job's id and its stream entry (`job` field).
pub(super) fn new_entry(new: &NewJob) -> (String, String) {
    let job = Job {
        id: uuid::Uuid::now_v7().to_string(),
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

pub(super) fn delivery(entry: RawEntry, max_bytes: usize) -> Delivery {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// UUIDv7: a producer's jobs sort by when they were enqueued, also within one ms.
    #[test]
    fn job_ids_are_uuid_v7_in_enqueue_order() {
        let new = NewJob::new("noop", "r", serde_json::json!({}));
        let ids: Vec<String> = (0..1000).map(|_| new_entry(&new).0).collect();
        let parsed = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not in order");
    }
}
