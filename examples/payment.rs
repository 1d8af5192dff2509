//! The seed article's `processPayment`, written with fencelock: lock
//! `lock:payment:{id}`, check that the order is pending, charge, mark it paid.
//!
//! Two "processes" race to process the same order; the lock makes sure it is charged once.
//! The order lives in a Redis hash on the first node, standing in for the database.
//!
//! `cargo run --example payment`

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fencelock::Redlock;
use redis::AsyncCommands;

/// A payment gateway that counts charges, so the example can show there was one.
#[derive(Default)]
struct Gateway {
    charges: AtomicU32,
}

impl Gateway {
    async fn charge(&self, order_id: u64, amount_cents: u64) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.charges.fetch_add(1, Ordering::SeqCst);
        println!("charged order {order_id}: {amount_cents} cents");
    }
}

#[derive(Debug)]
enum PaymentError {
    AlreadyProcessed(String),
    Lock(fencelock::Error),
    Db(redis::RedisError),
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PaymentError::AlreadyProcessed(status) => {
                write!(f, "order already processed ({status})")
            }
            PaymentError::Lock(e) => write!(f, "lock: {e}"),
            PaymentError::Db(e) => write!(f, "database: {e}"),
        }
    }
}

async fn process_payment(
    locks: &Redlock,
    db: &mut redis::aio::MultiplexedConnection,
    gateway: &Gateway,
    order_id: u64,
) -> Result<(), PaymentError> {
    let lock_key = format!("lock:payment:{order_id}");
    let guard = locks
        .lock(&lock_key, Duration::from_secs(10))
        .await
        .map_err(PaymentError::Lock)?;

    // Critical section: only one process runs it for this order at a time.
    let result = async {
        let order = format!("example:order:{order_id}");
        let status: Option<String> = db.hget(&order, "status").await.map_err(PaymentError::Db)?;
        let status = status.unwrap_or_else(|| "missing".into());
        if status != "pending" {
            return Err(PaymentError::AlreadyProcessed(status));
        }
        let amount: u64 = db
            .hget(&order, "amount_cents")
            .await
            .map_err(PaymentError::Db)?;
        if guard.validity() < Duration::from_secs(1) {
            // Too little time left to charge safely; a retry will take a fresh lock.
            return Err(PaymentError::Lock(fencelock::Error::Lost {
                resource: lock_key.clone(),
                reason: fencelock::LostReason::Expired,
            }));
        }
        gateway.charge(order_id, amount).await;
        let _: () = db
            .hset(&order, "status", "paid")
            .await
            .map_err(PaymentError::Db)?;
        Ok(())
    }
    .await;

    // Unlike a `finally { release }`, a release error never hides the section's own error.
    let released = guard.release().await.map_err(PaymentError::Lock);
    result.and(released)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let urls = common::node_urls();
    let locks = Redlock::builder().nodes(urls.clone()).build().await?;
    let mut db = redis::Client::open(urls[0].as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let order_id = 42;
    let _: () = db
        .hset_multiple(
            format!("example:order:{order_id}"),
            &[("status", "pending"), ("amount_cents", "1999")],
        )
        .await?;

    let gateway = Arc::new(Gateway::default());
    let mut workers = Vec::new();
    for worker in 0..2 {
        let (locks, mut db, gateway) = (locks.clone(), db.clone(), gateway.clone());
        workers.push(tokio::spawn(async move {
            match process_payment(&locks, &mut db, &gateway, order_id).await {
                Ok(()) => println!("worker {worker}: order {order_id} paid"),
                Err(e) => println!("worker {worker}: {e}"),
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let charges = gateway.charges.load(Ordering::SeqCst);
    println!("gateway charges for order {order_id}: {charges}");
    let _: () = db.del(format!("example:order:{order_id}")).await?;
    assert_eq!(charges, 1, "charged exactly once");
    Ok(())
}
