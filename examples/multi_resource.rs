//! Lock two accounts at once for a transfer: on every node both keys are set or neither.
//!
//! `cargo run --example multi_resource`

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fencelock::Redlock;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let locks = Redlock::builder()
        .nodes(common::node_urls())
        .build()
        .await?;
    let guard = locks
        .lock_many(
            &["example:account:alice", "example:account:bob"],
            Duration::from_secs(5),
        )
        .await?;
    println!("holding {:?} for {:?}", guard.resources(), guard.validity());

    // Anyone wanting either account alone has to wait.
    let other = Redlock::builder()
        .nodes(common::node_urls())
        .build()
        .await?;
    let err = other
        .try_lock("example:account:bob", Duration::from_secs(5))
        .await
        .expect_err("bob's account is part of the held set");
    println!("a second transfer touching bob is refused: {err}");

    // ... move the money ...
    guard.release().await?;
    println!("released both");
    Ok(())
}
