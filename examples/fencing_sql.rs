//! A fencing token checked by a SQL resource: the pattern from `docs/fencing.md`.
//!
//! Worker A takes the lock on an order, then stalls past its lock's validity (a GC pause,
//! a stopped VM). Worker B takes the lock with a newer token and marks the order paid.
//! When A wakes and tries to write, the `fence < $token` condition rejects it.
//!
//! `cargo run --example fencing_sql` (nodes from `FENCELOCK_NODES`, see `scripts/demo.sh`).

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fencelock::Redlock;
use rusqlite::{Connection, params};

/// Marks the order paid if `token` is newer than every token that wrote before.
/// Returns whether the write was accepted.
fn mark_paid(db: &Connection, order: i64, worker: &str, token: u64) -> rusqlite::Result<bool> {
    let rows = db.execute(
        "UPDATE orders SET status = 'paid', paid_by = ?1, fence = ?2 WHERE id = ?3 AND fence < ?2",
        params![worker, token as i64, order],
    )?;
    Ok(rows == 1)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = Connection::open_in_memory()?;
    db.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL, paid_by TEXT,
                              fence INTEGER NOT NULL DEFAULT 0);
         INSERT INTO orders (id, status) VALUES (42, 'pending');",
    )?;
    // Two clients stand for two worker processes.
    let worker_a = Redlock::builder()
        .nodes(common::node_urls())
        .fencing(true)
        .build()
        .await?;
    let worker_b = Redlock::builder()
        .nodes(common::node_urls())
        .fencing(true)
        .build()
        .await?;

    let a = worker_a
        .lock("example:payment:42", Duration::from_millis(300))
        .await?;
    let a_token = a.fencing_token().expect("fencing is on");
    println!("worker A holds the lock with token {a_token}; now it stalls");
    tokio::time::sleep(Duration::from_millis(400)).await; // past its validity

    let b = worker_b
        .lock("example:payment:42", Duration::from_secs(5))
        .await?;
    let b_token = b.fencing_token().expect("fencing is on");
    println!("worker B took over with token {b_token}");
    assert!(mark_paid(&db, 42, "B", b_token)?, "B's write is the newest");
    println!("worker B: order 42 marked paid");
    b.release().await?;

    // A wakes up, unaware, and writes with its old token.
    let accepted = mark_paid(&db, 42, "A", a_token)?;
    println!(
        "worker A (token {a_token}) tries to write: {}",
        if accepted {
            "accepted (BUG)"
        } else {
            "rejected by the fence"
        }
    );
    assert!(!accepted);
    let err = a.release().await.expect_err("A's lock expired");
    println!("worker A's release reports: {err}");

    let paid_by: String =
        db.query_row("SELECT paid_by FROM orders WHERE id = 42", [], |r| r.get(0))?;
    println!("order 42 was paid by {paid_by}, once");
    Ok(())
}
