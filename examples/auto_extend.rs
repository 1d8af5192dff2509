//! The scoped, auto-extending API: work longer than the TTL runs under a lock that a
//! watchdog keeps alive, checkpoints when the lock is at risk, and is cancelled if the
//! lock is lost.
//!
//! `cargo run --example auto_extend` (nodes from `FENCELOCK_NODES`, see `scripts/demo.sh`).
//! Pause a node majority while it runs (`docker pause`) to watch "at risk", then "lost".

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fencelock::{LockState, Redlock, ScopedError};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let locks = Redlock::builder()
        .nodes(common::node_urls())
        .build()
        .await?;
    let ttl = Duration::from_millis(500);

    // Ten batches of 150 ms: three times the TTL, so the watchdog must extend.
    let result = locks
        .using(&["example:nightly-report"], ttl, |health| async move {
            let mut done = 0;
            for batch in 0..10 {
                match health.state() {
                    LockState::Held => {}
                    LockState::AtRisk => {
                        println!("lock at risk after {batch} batches: checkpointing and stopping");
                        return Ok(done);
                    }
                    // Not reached with the default config: the work is dropped on loss.
                    _ => return Err("lock lost"),
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                done += 1;
            }
            Ok(done)
        })
        .await;

    match result {
        Ok(done) => {
            println!("report finished {done} batches under one lock, well past its {ttl:?} TTL")
        }
        Err(ScopedError::Lost { error, work }) => {
            println!("lock lost, work cancelled: {error} (work error: {work:?})")
        }
        Err(e) => return Err(e.to_string().into()),
    }
    Ok(())
}
