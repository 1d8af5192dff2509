//! The order ledger: the resource the payment handler protects, in an embedded SQLite
//! database.
//!
//! The ledger is where fencing becomes safety. Every write carries the fencing token of
//! the lock it was made under, and the ledger remembers, per order, the highest token it
//! has seen. A write with a lower token comes from a holder whose lock has since passed to
//! someone else (it paused, its lock expired, a newer holder took over) and is rejected,
//! whatever that holder believes. Every charge attempt is logged (order, token, worker,
//! outcome and the interval it ran in), so a checker can prove "charged exactly once".
//!
//! The database runs in WAL mode with a busy timeout, so several runner processes on one
//! machine can share the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

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

/// How one charge attempt ended, as the attempt log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The order was marked paid by this attempt: the one accepted charge.
    Charged,
    /// The order was already paid; nothing was charged or written.
    AlreadyPaid,
    /// The attempt's fencing token was older than one the ledger had already seen for the
    /// order: the write was rejected.
    StaleRejected,
    /// The payment gateway failed; nothing was written.
    GatewayFailed,
    /// The attempt was cancelled (its lock lost, its job timed out, or its runner
    /// stopping) while the gateway call was in flight; nothing was written. Whether the
    /// gateway charged is unknown here: the retry's charge carries the same idempotency
    /// key, so the gateway charges at most once.
    Cancelled,
}

impl Outcome {
    /// The name stored in the attempt log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Charged => "charged",
            Outcome::AlreadyPaid => "already_paid",
            Outcome::StaleRejected => "stale_rejected",
            Outcome::GatewayFailed => "gateway_failed",
            Outcome::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "charged" => Outcome::Charged,
            "already_paid" => Outcome::AlreadyPaid,
            "stale_rejected" => Outcome::StaleRejected,
            "gateway_failed" => Outcome::GatewayFailed,
            "cancelled" => Outcome::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ledger failure: the database could not be opened or written, or a request
/// contradicts what the ledger holds.
#[derive(Debug)]
#[non_exhaustive]
pub enum LedgerError {
    /// SQLite failed. Busy and locked errors are transient.
    Sqlite(rusqlite::Error),
    /// The order exists with another amount than the job asks for.
    AmountMismatch {
        /// The order.
        order_id: i64,
        /// What the ledger holds.
        recorded: i64,
        /// What the job asked for.
        requested: i64,
    },
}

impl LedgerError {
    /// Whether trying again may succeed (a busy or locked database).
    pub fn is_retryable(&self) -> bool {
        match self {
            LedgerError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            LedgerError::Sqlite(_) => false,
            LedgerError::AmountMismatch { .. } => false,
        }
    }
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::Sqlite(_) => f.write_str("ledger database error"),
            LedgerError::AmountMismatch {
                order_id,
                recorded,
                requested,
            } => write!(
                f,
                "order {order_id} is recorded with amount {recorded} cents, the job asks for {requested}"
            ),
        }
    }
}

impl std::error::Error for LedgerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LedgerError::Sqlite(e) => Some(e),
            LedgerError::AmountMismatch { .. } => None,
        }
    }
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Sqlite(e)
    }
}

/// Where an order stands when a holder starts working on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// Pending: go on and charge.
    Pending,
    /// Already paid: nothing to do.
    AlreadyPaid,
    /// A newer holder has been here: this holder's token is stale.
    Stale {
        /// The highest token the ledger has seen for the order.
        fence: u64,
    },
}

/// What the final write of a charge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The order is now paid, by this write.
    Charged,
    /// The order was paid already; nothing was written but the attempt.
    AlreadyPaid,
    /// Rejected: the token is older than one the ledger has seen for the order.
    Stale {
        /// The highest token the ledger has seen for the order.
        fence: u64,
    },
}

/// One order as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The order id.
    pub order_id: i64,
    /// The amount.
    pub amount_cents: i64,
    /// `pending` or `paid`.
    pub paid: bool,
    /// The highest fencing token seen for the order.
    pub fence: u64,
    /// The token of the write that paid it.
    pub paid_token: Option<u64>,
    /// The worker that paid it.
    pub paid_by: Option<String>,
    /// The gateway's charge id.
    pub charge_id: Option<String>,
}

/// One line of the attempt log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The order.
    pub order_id: i64,
    /// The fencing token the attempt ran under.
    pub token: u64,
    /// The worker (consumer) that made it.
    pub worker: String,
    /// The job it ran for.
    pub job_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// When the holder began working on the order, in µs since the Unix epoch.
    pub started_us: i64,
    /// When the attempt's final write happened, in µs since the Unix epoch.
    pub finished_us: i64,
}

/// Who made a write, for the attempt log.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    /// The fencing token of the lock the write is made under.
    pub token: u64,
    /// The worker's name.
    pub worker: &'a str,
    /// The job's id.
    pub job_id: &'a str,
    /// When the holder began working on the order (µs since the epoch; see [`now_us`]).
    pub started_us: i64,
}

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

    /// Starts a holder's work on `order_id`: creates the order as pending if it is new,
    /// says so when it is already paid (logging the attempt), whatever the token (a paid
    /// order is done, and a duplicate of its job succeeds rather than retrying as
    /// stale); otherwise rejects a token older than the fence and raises the fence to the
    /// token. Raising the fence at the start means that a holder that paused cannot commit
    /// even if the newer holder has not committed yet.
    ///
    /// # Errors
    ///
    /// On a database error, or when the order exists with another amount.
    pub fn begin(
        &self,
        order_id: i64,
        amount_cents: i64,
        writer: Writer<'_>,
    ) -> Result<Begin, LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_order(&tx, order_id, amount_cents)?;
        let (status, fence): (String, i64) = tx.query_row(
            "SELECT status, fence FROM orders WHERE order_id = ?1",
            params![order_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let token = writer.token as i64;
        let stale = self.inner.fencing && token < fence;
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
        if token > fence {
            tx.execute(
                "UPDATE orders SET fence = ?2 WHERE order_id = ?1",
                params![order_id, token],
            )?;
        }
        tx.commit()?;
        Ok(Begin::Pending)
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

/// What the attempt log proves, order by order. Built by [`Ledger::audit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Orders in the ledger.
    pub orders: usize,
    /// Orders marked paid.
    pub paid: usize,
    /// Attempts logged, and how many of each outcome.
    pub attempts: usize,
    /// Accepted charges (outcome `charged`).
    pub charged: usize,
    /// Stale writes the fence rejected.
    pub stale_rejected: usize,
    /// Orders charged more than once: `(order, accepted charges)`.
    pub double_charged: Vec<(i64, usize)>,
    /// Orders paid without an accepted charge in the log, or with a charge but not paid.
    pub inconsistent: Vec<i64>,
    /// Two accepted writes (charged or already-paid) for one order whose holders'
    /// intervals overlap: `(order, earlier token, later token)`.
    pub overlapping: Vec<(i64, u64, u64)>,
    /// An accepted write that carried a lower token than an earlier accepted write for the
    /// same order: a stale write that got through. `(order, token, fence before it)`.
    pub stale_accepted: Vec<(i64, u64, u64)>,
}

impl Audit {
    /// Audits `orders` against `attempts`.
    pub fn of(orders: &[Order], attempts: &[Attempt]) -> Audit {
        let mut audit = Audit {
            orders: orders.len(),
            paid: orders.iter().filter(|o| o.paid).count(),
            attempts: attempts.len(),
            ..Audit::default()
        };
        let mut by_order: std::collections::BTreeMap<i64, Vec<&Attempt>> = Default::default();
        for a in attempts {
            by_order.entry(a.order_id).or_default().push(a);
            match a.outcome {
                Outcome::Charged => audit.charged += 1,
                Outcome::StaleRejected => audit.stale_rejected += 1,
                _ => {}
            }
        }
        for order in orders {
            let log = by_order.remove(&order.order_id).unwrap_or_default();
            let charges = log.iter().filter(|a| a.outcome == Outcome::Charged).count();
            if charges > 1 {
                audit.double_charged.push((order.order_id, charges));
            }
            if order.paid != (charges >= 1) {
                audit.inconsistent.push(order.order_id);
            }
            // Accepted writes, in the order they were made.
            let mut accepted: Vec<&&Attempt> = log
                .iter()
                .filter(|a| matches!(a.outcome, Outcome::Charged | Outcome::AlreadyPaid))
                .collect();
            accepted.sort_by_key(|a| a.finished_us);
            let mut fence = 0u64;
            for a in &accepted {
                if a.token < fence {
                    audit.stale_accepted.push((order.order_id, a.token, fence));
                }
                fence = fence.max(a.token);
            }
            for (i, a) in accepted.iter().enumerate() {
                for b in &accepted[i + 1..] {
                    if a.token != b.token
                        && a.started_us < b.finished_us
                        && b.started_us < a.finished_us
                    {
                        let (lo, hi) = (a.token.min(b.token), a.token.max(b.token));
                        audit.overlapping.push((order.order_id, lo, hi));
                    }
                }
            }
        }
        // Attempts for orders the ledger does not hold cannot happen; count them as
        // inconsistent all the same.
        audit.inconsistent.extend(by_order.keys());
        audit
    }

    /// The number of violations of "charged exactly once by non-overlapping holders".
    pub fn violations(&self) -> usize {
        self.double_charged.len()
            + self.inconsistent.len()
            + self.overlapping.len()
            + self.stale_accepted.len()
    }
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} orders, {} paid, {} attempts, {} charged, {} stale writes rejected; \
             violations: {} double-charged, {} inconsistent, {} overlapping, {} stale accepted",
            self.orders,
            self.paid,
            self.attempts,
            self.charged,
            self.stale_rejected,
            self.double_charged.len(),
            self.inconsistent.len(),
            self.overlapping.len(),
            self.stale_accepted.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(token: u64, started_us: i64) -> Writer<'static> {
        Writer {
            token,
            worker: "w",
            job_id: "j",
            started_us,
        }
    }

    fn temp_ledger(fencing: bool) -> (Ledger, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "ledger-unit-{}-{}.db",
            std::process::id(),
            rand::random::<u64>()
        ));
        (Ledger::open_with(&path, fencing).unwrap(), path)
    }

    #[test]
    fn runners_opening_a_new_ledger_at_once_all_start() {
        for round in 0..20 {
            let path = std::env::temp_dir().join(format!(
                "ledger-open-{}-{round}-{}.db",
                std::process::id(),
                rand::random::<u64>()
            ));
            let start = Arc::new(std::sync::Barrier::new(8));
            let opened: Vec<_> = (0..8)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        Ledger::open(&path).map(drop)
                    })
                })
                .collect();
            for open in opened {
                if let Err(e) = open.join().unwrap() {
                    panic!("round {round}: {e}: {:?}", std::error::Error::source(&e));
                }
            }
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }

    #[test]
    fn a_stale_token_is_rejected_at_commit() {
        let (ledger, path) = temp_ledger(true);
        assert_eq!(ledger.begin(1, 500, writer(5, 1)).unwrap(), Begin::Pending);
        // A newer holder starts and pays.
        assert_eq!(ledger.begin(1, 500, writer(6, 2)).unwrap(), Begin::Pending);
        assert_eq!(
            ledger.commit(1, "ch_1", writer(6, 2)).unwrap(),
            Commit::Charged
        );
        // The paused holder wakes up and tries to commit: the order is paid, so it is
        // done, and its attempt is logged as stale.
        assert_eq!(
            ledger.commit(1, "ch_1", writer(5, 1)).unwrap(),
            Commit::AlreadyPaid
        );
        // So is a stale holder's begin.
        assert_eq!(
            ledger.begin(1, 500, writer(4, 3)).unwrap(),
            Begin::AlreadyPaid
        );
        let order = ledger.order(1).unwrap().unwrap();
        assert!(order.paid);
        assert_eq!(order.paid_token, Some(6));
        let audit = ledger.audit().unwrap();
        assert_eq!(audit.charged, 1);
        assert_eq!(audit.stale_rejected, 2);
        assert_eq!(audit.violations(), 0, "{audit}");
        std::fs::remove_file(path).ok();
    }

    /// A `paid` commit is on disk before its job is acknowledged: in WAL mode only
    /// `synchronous = FULL` (2) syncs each commit.
    #[test]
    fn commits_are_synced_before_they_return() {
        let (ledger, path) = temp_ledger(true);
        let level: i64 = ledger
            .conn()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(level, 2, "synchronous is {level}, not FULL (2)");
        std::fs::remove_file(path).ok();
    }

    /// A duplicate job whose token is below the fence of an order that is paid (its
    /// tokens came from a lock whose counter is behind) is done, not retried as stale
    /// until it is dead-lettered.
    #[test]
    fn a_paid_order_reports_already_paid_before_stale() {
        let (ledger, path) = temp_ledger(true);
        ledger.begin(7, 700, writer(271, 1)).unwrap();
        assert_eq!(
            ledger.commit(7, "c", writer(271, 1)).unwrap(),
            Commit::Charged
        );
        for token in [1, 10, 19] {
            assert_eq!(
                ledger.begin(7, 700, writer(token, 2)).unwrap(),
                Begin::AlreadyPaid,
                "token {token}"
            );
            assert_eq!(
                ledger.commit(7, "c", writer(token, 2)).unwrap(),
                Commit::AlreadyPaid,
                "token {token}"
            );
        }
        let audit = ledger.audit().unwrap();
        assert_eq!((audit.charged, audit.violations()), (1, 0), "{audit}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn a_begun_newer_holder_fences_out_an_older_one_before_either_commits() {
        let (ledger, path) = temp_ledger(true);
        ledger.begin(2, 100, writer(5, 1)).unwrap();
        ledger.begin(2, 100, writer(6, 2)).unwrap();
        assert_eq!(
            ledger.commit(2, "c", writer(5, 1)).unwrap(),
            Commit::Stale { fence: 6 }
        );
        assert_eq!(
            ledger.commit(2, "c", writer(6, 2)).unwrap(),
            Commit::Charged
        );
        assert_eq!(
            ledger.commit(2, "c", writer(7, 3)).unwrap(),
            Commit::AlreadyPaid
        );
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn without_the_fence_the_audit_sees_the_damage() {
        let (ledger, path) = temp_ledger(false);
        // Holder 5 pauses; holder 6 begins; holder 5 wakes and commits: accepted, since
        // the check is off. Holder 6 then finds it paid.
        ledger.begin(3, 100, writer(5, 10)).unwrap();
        ledger.begin(3, 100, writer(6, 20)).unwrap();
        assert_eq!(
            ledger.commit(3, "c", writer(5, 10)).unwrap(),
            Commit::Charged
        );
        assert_eq!(
            ledger.commit(3, "c", writer(6, 20)).unwrap(),
            Commit::AlreadyPaid
        );
        let audit = ledger.audit().unwrap();
        assert_eq!(audit.overlapping.len(), 1, "{audit}");
        assert!(audit.violations() > 0);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn amounts_must_agree() {
        let (ledger, path) = temp_ledger(true);
        ledger.create_order(4, 100).unwrap();
        let err = ledger.begin(4, 200, writer(1, 1)).unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "order 4 is recorded with amount 100 cents, the job asks for 200"
        );
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn audit_counts_double_charges() {
        let orders = vec![Order {
            order_id: 1,
            amount_cents: 1,
            paid: true,
            fence: 2,
            paid_token: Some(2),
            paid_by: None,
            charge_id: None,
        }];
        let attempt = |token, s, e| Attempt {
            order_id: 1,
            token,
            worker: "w".into(),
            job_id: "j".into(),
            outcome: Outcome::Charged,
            started_us: s,
            finished_us: e,
        };
        let audit = Audit::of(&orders, &[attempt(1, 0, 10), attempt(2, 20, 30)]);
        assert_eq!(audit.double_charged, vec![(1, 2)]);
        assert!(audit.overlapping.is_empty());
        let audit = Audit::of(&orders, &[attempt(2, 0, 10), attempt(1, 5, 30)]);
        assert_eq!(audit.overlapping, vec![(1, 1, 2)]);
        assert_eq!(audit.stale_accepted, vec![(1, 1, 2)]);
    }
}
