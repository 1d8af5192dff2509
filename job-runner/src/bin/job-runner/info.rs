//! `job-runner info`: the queue's counts, and each lock node's health and the locks it
//! holds.

use std::time::Duration;

use crate::connect;
use crate::exit::Exit;
use crate::settings::{Settings, redact};

/// Prints the queue's counts and the locks each lock node holds.
pub(crate) async fn info(settings: &Settings) -> Result<(), Exit> {
    let queue = connect::queue(settings, "cli").await?;
    let st = queue.stats().await.map_err(|e| Exit::failed(&e))?;
    say!(
        "queue     {} ({})",
        settings.queue_name,
        redact(&settings.queue)
    );
    say!("depth     {}", st.depth);
    say!("pending   {}", st.pending);
    say!("delayed   {}", st.delayed);
    say!("dead      {}", st.dead);
    say!("consumers {}", st.consumers);
    for node in &settings.lock_nodes {
        match locks_held(node).await {
            Ok(n) => say!("lock node {}: up, {n} locks held", redact(node)),
            Err(e) => say!("lock node {}: down ({e})", redact(node)),
        }
    }
    Ok(())
}

/// Lock keys on one node: every key but the lock crate's own bookkeeping.
async fn locks_held(url: &str) -> Result<u64, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let count = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut iter: redis::AsyncIter<'_, String> = redis::AsyncCommands::scan(&mut conn).await?;
        let mut n = 0u64;
        while let Some(key) = iter.next_item().await {
            if !fencelock::is_internal_key(key?.as_bytes()) {
                n += 1;
            }
        }
        Ok::<_, redis::RedisError>(n)
    };
    match tokio::time::timeout(Duration::from_secs(2), count).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 2s".into()),
    }
}
