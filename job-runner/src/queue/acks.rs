//! Acknowledgements, sent in batches: those made while one `XACK` is in flight go
//! together in the next.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../scripts/ack.lua")));

/// One entry to acknowledge, and who waits for it.
pub(super) struct Ack {
    pub(super) entry_id: String,
    pub(super) done: oneshot::Sender<Result<bool, redis::RedisError>>,
}

/// The most entries one `XACK` carries.
const MAX_ACK_BATCH: usize = 512;

/// Sends the acks: at once when idle, and those made while one is in flight as one
/// script call after it (group commit). Ends when every clone of the queue is gone.
pub(super) async fn ack_batches(
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
