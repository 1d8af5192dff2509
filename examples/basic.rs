//! Lock a resource, do the critical section while validity is left, release.
//!
//! `cargo run --example basic` (nodes from `FENCELOCK_NODES`, see `scripts/demo.sh`).

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fencelock::Redlock;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let locks = Redlock::builder()
        .nodes(common::node_urls())
        .build()
        .await?;
    println!("nodes {:?}, quorum {}", locks.nodes(), locks.quorum());

    let guard = locks
        .lock("example:report", Duration::from_secs(10))
        .await?;
    println!(
        "locked `{}` for {:?} (value {})",
        guard.resource(),
        guard.validity(),
        guard.value()
    );
    // ... the critical section: check guard.validity() before each side effect ...
    tokio::time::sleep(Duration::from_millis(100)).await;
    guard.release().await?;
    println!("released");
    Ok(())
}
