//! What a job is.

use serde::{Deserialize, Serialize};

/// A job as it travels through the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Unique id, assigned at enqueue: a UUIDv7, so that ids sort by enqueue time.
    pub id: String,
    /// Which handler runs it, e.g. `payment`.
    pub kind: String,
    /// The lock key its critical section runs under, e.g. `order:42`.
    pub resource: String,
    /// The handler's input.
    pub payload: serde_json::Value,
    /// How many times it has been tried before this delivery.
    pub attempt: u32,
    /// When it was first enqueued, in ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// How many times in a row it was put back because its lock was held elsewhere: each
    /// time it waits longer before it tries again. Back to 0 once it gets its lock.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requeues: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Which handler runs it.
    pub kind: String,
    /// The lock key its critical section runs under.
    pub resource: String,
    /// The handler's input.
    pub payload: serde_json::Value,
}

impl NewJob {
    /// A job of `kind` on `resource` with `payload`.
    pub fn new(
        kind: impl Into<String>,
        resource: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        NewJob {
            kind: kind.into(),
            resource: resource.into(),
            payload,
        }
    }
}

/// Why a stream entry is not a job a worker can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// What is wrong with it, for the dead-letter entry.
    pub reason: String,
}

/// Parses a stream entry's `job` field, checking what a worker relies on.
pub fn parse(raw: Option<&str>) -> Result<Job, Malformed> {
    let raw = raw.ok_or_else(|| Malformed {
        reason: "entry has no `job` field".into(),
    })?;
    let job: Job = serde_json::from_str(raw).map_err(|e| Malformed {
        reason: format!("not a job: {e}"),
    })?;
    if job.kind.is_empty() {
        return Err(Malformed {
            reason: "job has an empty `kind`".into(),
        });
    }
    if job.resource.is_empty() {
        return Err(Malformed {
            reason: "job has an empty `resource`".into(),
        });
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_entries_say_why() {
        assert_eq!(parse(None).unwrap_err().reason, "entry has no `job` field");
        assert!(
            parse(Some("{"))
                .unwrap_err()
                .reason
                .starts_with("not a job:")
        );
        let no_resource = r#"{"id":"a","kind":"payment","resource":"","payload":{},"attempt":0,"enqueued_at_ms":1}"#;
        assert_eq!(
            parse(Some(no_resource)).unwrap_err().reason,
            "job has an empty `resource`"
        );
        let ok = r#"{"id":"a","kind":"payment","resource":"order:1","payload":{"x":1},"attempt":2,"enqueued_at_ms":1}"#;
        let job = parse(Some(ok)).unwrap();
        assert_eq!(job.attempt, 2);
        assert_eq!(job.payload["x"], 1);
    }
}
