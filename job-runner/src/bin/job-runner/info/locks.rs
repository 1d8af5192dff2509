//! Counting the locks a lock node holds: keys that are fencelock locks (a lock value
//! with a TTL), apart from fencelock's own bookkeeping and from anything else kept there.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// How long counting one node may take: a node with millions of keys is reported as
/// "at least N" rather than holding `info` up.
const BUDGET: Duration = Duration::from_secs(2);

/// Keys one `SCAN` call asks for.
const PAGE: u64 = 1000;

/// What a scan of one lock node found.
#[derive(Debug, Default)]
pub(crate) struct NodeKeys {
    /// Keys that are locks.
    locks: u64,
    /// Keys that are neither locks nor fencelock's own.
    others: u64,
    /// One of those, to name in the warning.
    other_example: Option<String>,
    /// Whether the scan got through the whole keyspace within the budget.
    complete: bool,
    /// Keys looked at, and the node's key count when the scan began.
    scanned: u64,
    total: u64,
}

impl NodeKeys {
    /// A warning when the node holds keys that are not locks, naming how many and one.
    pub(crate) fn warning(&self, node: &str) -> Option<String> {
        let example = self.other_example.as_deref()?;
        let at_least = if self.complete { "" } else { "at least " };
        let keys = if self.others == 1 {
            "key that is not a lock"
        } else {
            "keys that are not locks"
        };
        Some(format!(
            "warning: lock node {node} holds {at_least}{} {keys} \
             (e.g. `{example}`): keep other data (the queue included) off lock nodes, where \
             it competes with locks for memory and a key named like a resource blocks that \
             resource's lock",
            self.others
        ))
    }
}

/// The lock count, as `info` prints it.
impl fmt::Display for NodeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.complete {
            write!(f, "{}", self.locks)
        } else {
            write!(
                f,
                "at least {} (the count stopped at its {}s budget after {} of {} keys)",
                self.locks,
                BUDGET.as_secs(),
                self.scanned,
                self.total
            )
        }
    }
}

/// Scans the lock node at `url` for locks, within [`BUDGET`].
pub(crate) async fn scan(url: &str) -> Result<NodeKeys, String> {
    let deadline = Instant::now() + BUDGET;
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let no_answer = || format!("no answer within {}s", BUDGET.as_secs());
    let mut conn = tokio::time::timeout_at(deadline, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| no_answer())?
        .map_err(|e| e.to_string())?;
    let total: u64 = tokio::time::timeout_at(deadline, redis::cmd("DBSIZE").query_async(&mut conn))
        .await
        .map_err(|_| no_answer())?
        .map_err(|e| e.to_string())?;
    let mut found = NodeKeys {
        total,
        ..NodeKeys::default()
    };
    let mut cursor = 0u64;
    loop {
        let page = tokio::time::timeout_at(deadline, next_page(&mut conn, cursor, &mut found));
        match page.await {
            Ok(Ok(0)) => {
                found.complete = true;
                return Ok(found);
            }
            Ok(Ok(next)) => cursor = next,
            Ok(Err(e)) => return Err(e.to_string()),
            // A partial count is still worth showing: what was seen holds.
            Err(_) => return Ok(found),
        }
    }
}

/// Reads one `SCAN` page from `cursor` into `found`, and returns the next cursor.
async fn next_page(
    conn: &mut redis::aio::MultiplexedConnection,
    cursor: u64,
    found: &mut NodeKeys,
) -> redis::RedisResult<u64> {
    let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
        .arg(cursor)
        .arg("COUNT")
        .arg(PAGE)
        .query_async(conn)
        .await?;
    let seen = keys.len() as u64;
    let keys: Vec<Vec<u8>> = keys
        .into_iter()
        .filter(|k| !fencelock::is_internal_key(k))
        .collect();
    if !keys.is_empty() {
        // MGET answers nil for a key that is not a string; PTTL -2 for one gone since the
        // SCAN (not counted either way), -1 for one without a TTL (never a lock).
        let mut pipe = redis::pipe();
        pipe.cmd("MGET").arg(&keys);
        for key in &keys {
            pipe.cmd("PTTL").arg(key);
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
        let ttls: Vec<i64> = replies
            .split_off(1)
            .iter()
            .map(redis::from_redis_value_ref)
            .collect::<Result<_, _>>()?;
        let values: Vec<Option<Vec<u8>>> = redis::from_redis_value(replies.remove(0))?;
        for ((key, value), ttl) in keys.iter().zip(values).zip(ttls) {
            match (value, ttl) {
                (_, -2) => {}
                (Some(v), ttl) if ttl >= 0 && fencelock::is_lock_value(&v) => found.locks += 1,
                _ => {
                    found.others += 1;
                    found
                        .other_example
                        .get_or_insert_with(|| String::from_utf8_lossy(key).into_owned());
                }
            }
        }
    }
    found.scanned += seen;
    Ok(next)
}
