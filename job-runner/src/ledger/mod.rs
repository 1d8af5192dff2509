//! The order ledger: the resource the payment handler protects, in an embedded SQLite
//! database.
//!
//! The ledger is where fencing becomes safety. Every write carries the fencing token of
//! the lock it was made under, and the ledger remembers, per order, the highest token it
//! has seen. A write with a lower token comes from a holder whose lock has since passed to
//! someone else (it paused, its lock expired, a newer holder took over) and is rejected,
//! whatever that holder believes. Every charge attempt is logged (order, token, worker,
//! outcome, and the interval from its begin to its last write), so a checker can prove
//! "charged exactly once".
//!
//! The database runs in WAL mode with a busy timeout, so several runner processes on one
//! machine can share the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

mod audit;
mod records;
#[cfg(test)]
mod tests;

pub use audit::Audit;
pub use records::{Attempt, Begin, Commit, Holder, LedgerError, Order, Outcome, Writer};

/// How long a ledger call waits for other processes' writes.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id     INTEGER PRIMARY KEY,
    amount_cents INTEGER NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('pending', 'paid')),
    -- The highest fencing token any writer has presented for this order.
    fence        INTEGER NOT NULL DEFAULT 0,
    paid_token   INTEGER,
    paid_by      TEXT,
    charge_id    TEXT,
    paid_at_us   INTEGER
);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id    INTEGER NOT NULL,
    token       INTEGER NOT NULL,
    worker      TEXT    NOT NULL,
    job_id      TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    started_us  INTEGER NOT NULL,
    finished_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_order ON attempts (order_id, started_us);
";

/// The ledger. A cheap `Clone`; every clone shares one connection. Calls block on SQLite,
/// so async code calls them through `tokio::task::spawn_blocking`.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    path: PathBuf,
    fencing: bool,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.path)
            .field("fencing", &self.inner.fencing)
            .finish_non_exhaustive()
    }
}

/// Microseconds since the Unix epoch, the ledger's timestamps.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path`, with the fencing check on.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or the schema cannot be created.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        Ledger::open_with(path, true)
    }

    /// Opens the ledger with the fencing check on or off. Off is for demonstrating what
    /// fencing prevents: stale writes are then accepted. Never turn it off in production.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or the schema cannot be created.
    pub fn open_with(path: impl AsRef<Path>, fencing: bool) -> Result<Ledger, LedgerError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path)?;
        // Several runner processes share the file: WAL lets readers and one writer work
        // at once, and the busy timeout waits out the other writers instead of failing.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Switching a new file to WAL can fail with SQLITE_BUSY without the busy handler
        // ever being asked (SQLite does that where waiting could deadlock), which two
        // runners starting at once on a new ledger hit: retry it for as long.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            let setup = conn
                .pragma_update(None, "journal_mode", "WAL")
                // FULL: in WAL mode NORMAL may lose the last commits on a power loss, and
                // a lost `paid` commit whose job was acknowledged is a lost payment (or a
                // second charge, by a later duplicate). It costs one fsync per commit.
                .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
                .and_then(|()| conn.execute_batch(SCHEMA));
            match setup {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other?,
            }
        }
        Ok(Ledger {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                path,
                fencing,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the fencing check is on.
    pub fn fencing(&self) -> bool {
        self.inner.fencing
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done transaction behind (SQLite
        // rolls back), so a poisoned mutex is still usable.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates `order_id` as pending with `amount_cents` if it does not exist.
    ///
    /// # Errors
    ///
    /// On a database error, or when the order exists with another amount.
    pub fn create_order(&self, order_id: i64, amount_cents: i64) -> Result<(), LedgerError> {
        let conn = self.conn();
        ensure_order(&conn, order_id, amount_cents)
    }

    /// Starts a holder's work on `order_id`: creates the order as pending if it is new, and
    /// raises the fence to the holder's token whatever the order's state, so that every
    /// older holder is stale from now on, even at an order that is paid. Then says so when
    /// the order is already paid (logging the attempt), whatever the token (a paid order
    /// is done, and a duplicate of its job succeeds rather than retrying as stale), or
    /// rejects a token older than the fence. Raising the fence at the start means that a
    /// holder that paused cannot commit even if the newer holder has not committed yet.
    ///
    /// # Errors
    ///
    /// On a database error, or when the order exists with another amount.
    pub fn begin(
        &self,
        order_id: i64,
        amount_cents: i64,
        holder: Holder<'_>,
    ) -> Result<Begin, LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let started_us = now_us();
        ensure_order(&tx, order_id, amount_cents)?;
        let (status, fence): (String, i64) = tx.query_row(
            "SELECT status, fence FROM orders WHERE order_id = ?1",
            params![order_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let token = holder.token as i64;
        let stale = self.inner.fencing && token < fence;
        if token > fence {
            tx.execute(
                "UPDATE orders SET fence = ?2 WHERE order_id = ?1",
                params![order_id, token],
            )?;
        }
        let writer = holder.writer(started_us);
        if status == "paid" {
            // A duplicate: logged, so the audit sees every holder that touched the order
            // (as stale when its token is, since it was not the order's newest holder).
            let logged = if stale {
                Outcome::StaleRejected
            } else {
                Outcome::AlreadyPaid
            };
            log_attempt(&tx, order_id, writer, logged)?;
            tx.commit()?;
            return Ok(Begin::AlreadyPaid);
        }
        if stale {
            log_attempt(&tx, order_id, writer, Outcome::StaleRejected)?;
            tx.commit()?;
            return Ok(Begin::Stale {
                fence: fence as u64,
            });
        }
        tx.commit()?;
        Ok(Begin::Pending { started_us })
    }

    /// The final write of a charge, in one transaction: an order already paid stays as it
    /// is (logged as a stale attempt if the token is older than the fence); otherwise a
    /// token older than the fence is rejected, or the order is marked paid with the
    /// token, the worker and the gateway's charge id. The attempt is logged either way. This transaction is synced to disk before it returns (`synchronous =
    /// FULL`), since its job is acknowledged next: a power loss must not undo a payment
    /// whose job is gone.
    ///
    /// # Errors
    ///
    /// On a database error.
    pub fn commit(
        &self,
        order_id: i64,
        charge_id: &str,
        writer: Writer<'_>,
    ) -> Result<Commit, LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (status, fence): (String, i64) = tx.query_row(
            "SELECT status, fence FROM orders WHERE order_id = ?1",
            params![order_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let token = writer.token as i64;
        let outcome = if status == "paid" {
            Commit::AlreadyPaid
        } else if self.inner.fencing && token < fence {
            Commit::Stale {
                fence: fence as u64,
            }
        } else {
            tx.execute(
                "UPDATE orders SET status = 'paid', fence = max(fence, ?2), paid_token = ?2,
                        paid_by = ?3, charge_id = ?4, paid_at_us = ?5
                 WHERE order_id = ?1",
                params![order_id, token, writer.worker, charge_id, now_us()],
            )?;
            Commit::Charged
        };
        let logged = match outcome {
            Commit::Charged => Outcome::Charged,
            Commit::AlreadyPaid if self.inner.fencing && token < fence => Outcome::StaleRejected,
            Commit::AlreadyPaid => Outcome::AlreadyPaid,
            Commit::Stale { .. } => Outcome::StaleRejected,
        };
        log_attempt(&tx, order_id, writer, logged)?;
        tx.commit()?;
        Ok(outcome)
    }

    /// Logs an attempt that wrote nothing else (a gateway failure).
    ///
    /// # Errors
    ///
    /// On a database error.
    pub fn record(
        &self,
        order_id: i64,
        writer: Writer<'_>,
        outcome: Outcome,
    ) -> Result<(), LedgerError> {
        let conn = self.conn();
        log_attempt(&conn, order_id, writer, outcome)
    }

    /// One order, if it exists.
    ///
    /// # Errors
    ///
    /// On a database error.
    pub fn order(&self, order_id: i64) -> Result<Option<Order>, LedgerError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT order_id, amount_cents, status, fence, paid_token, paid_by, charge_id
                 FROM orders WHERE order_id = ?1",
                params![order_id],
                read_order,
            )
            .optional()?)
    }

    /// Every order, by id.
    ///
    /// # Errors
    ///
    /// On a database error.
    pub fn orders(&self) -> Result<Vec<Order>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT order_id, amount_cents, status, fence, paid_token, paid_by, charge_id
             FROM orders ORDER BY order_id",
        )?;
        let rows = stmt.query_map([], read_order)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The whole attempt log, in the order the attempts started.
    ///
    /// # Errors
    ///
    /// On a database error.
    pub fn attempts(&self) -> Result<Vec<Attempt>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT order_id, token, worker, job_id, outcome, started_us, finished_us
             FROM attempts ORDER BY order_id, started_us, id",
        )?;
        let rows = stmt.query_map([], |r| {
            let outcome: String = r.get(4)?;
            Ok(Attempt {
                order_id: r.get(0)?,
                token: r.get::<_, i64>(1)? as u64,
                worker: r.get(2)?,
                job_id: r.get(3)?,
                outcome: Outcome::parse(&outcome).unwrap_or(Outcome::GatewayFailed),
                started_us: r.get(5)?,
                finished_us: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Checks the ledger against what "charged exactly once" means; see [`Audit`].
    ///
    /// # Errors
    ///
    /// On a database error.
    pub fn audit(&self) -> Result<Audit, LedgerError> {
        Ok(Audit::of(&self.orders()?, &self.attempts()?))
    }
}

fn ensure_order(conn: &Connection, order_id: i64, amount_cents: i64) -> Result<(), LedgerError> {
    conn.execute(
        "INSERT OR IGNORE INTO orders (order_id, amount_cents, status) VALUES (?1, ?2, 'pending')",
        params![order_id, amount_cents],
    )?;
    let recorded: i64 = conn.query_row(
        "SELECT amount_cents FROM orders WHERE order_id = ?1",
        params![order_id],
        |r| r.get(0),
    )?;
    if recorded != amount_cents {
        return Err(LedgerError::AmountMismatch {
            order_id,
            recorded,
            requested: amount_cents,
        });
    }
    Ok(())
}

fn log_attempt(
    conn: &Connection,
    order_id: i64,
    writer: Writer<'_>,
    outcome: Outcome,
) -> Result<(), LedgerError> {
    conn.execute(
        "INSERT INTO attempts (order_id, token, worker, job_id, outcome, started_us, finished_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            order_id,
            writer.token as i64,
            writer.worker,
            writer.job_id,
            outcome.as_str(),
            writer.started_us,
            now_us()
        ],
    )?;
    Ok(())
}

fn read_order(r: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    let status: String = r.get(2)?;
    Ok(Order {
        order_id: r.get(0)?,
        amount_cents: r.get(1)?,
        paid: status == "paid",
        fence: r.get::<_, i64>(3)? as u64,
        paid_token: r.get::<_, Option<i64>>(4)?.map(|t| t as u64),
        paid_by: r.get(5)?,
        charge_id: r.get(6)?,
    })
}
