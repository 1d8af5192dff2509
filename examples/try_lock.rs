//! `try_lock` makes one round and tells contention apart from unreachable nodes.
//!
//! `cargo run --example try_lock`

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fencelock::{ErrorKind, Redlock};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let worker_a = Redlock::builder()
        .nodes(common::node_urls())
        .build()
        .await?;
    // A second client stands for another process.
    let worker_b = Redlock::builder()
        .nodes(common::node_urls())
        .build()
        .await?;

    let held = worker_a
        .lock("example:nightly-job", Duration::from_secs(5))
        .await?;
    println!("worker A holds the nightly job");

    match worker_b
        .try_lock("example:nightly-job", Duration::from_secs(5))
        .await
    {
        Ok(guard) => {
            println!("worker B got it (unexpected while A holds it)");
            guard.release().await?;
        }
        Err(e) if e.kind() == ErrorKind::Contended => {
            println!("worker B skips: {e}");
        }
        Err(e) if e.kind() == ErrorKind::NoQuorum => {
            println!("worker B cannot reach a quorum, retry later: {e}");
        }
        Err(e) => return Err(e.into()),
    }

    held.release().await?;
    let guard = worker_b
        .try_lock("example:nightly-job", Duration::from_secs(5))
        .await?;
    println!("after A released, worker B runs the job");
    guard.release().await?;
    Ok(())
}
