//! What the ledger stores and reports: orders, charge attempts and their outcomes, the
//! steps of a fenced write, and its errors.

use std::fmt;

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

    pub(super) fn parse(s: &str) -> Option<Outcome> {
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
    /// Pending: go on and charge, with the writer [`Holder::writer`] makes of this time.
    Pending {
        /// When the begin ran, in µs since the Unix epoch: the attempt's start in the log.
        started_us: i64,
    },
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
    /// When the attempt's begin ran, in µs since the Unix epoch. What a holder did before
    /// (waiting for its lock, starting its handler) the ledger cannot see, so the audit
    /// orders holders from their first ledger write on, as fencing does.
    pub started_us: i64,
    /// When the attempt's final write happened, in µs since the Unix epoch.
    pub finished_us: i64,
}

/// A lock holder that begins work on an order ([`Ledger::begin`](super::Ledger::begin)).
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The fencing token of the lock the holder works under.
    pub token: u64,
    /// The worker's name.
    pub worker: &'a str,
    /// The job's id.
    pub job_id: &'a str,
}

impl<'a> Holder<'a> {
    /// The holder's later writes, after its begin returned
    /// [`Begin::Pending { started_us }`](Begin::Pending).
    pub fn writer(self, started_us: i64) -> Writer<'a> {
        Writer {
            token: self.token,
            worker: self.worker,
            job_id: self.job_id,
            started_us,
        }
    }
}

/// Who made a write after beginning, for the attempt log.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    /// The fencing token of the lock the write is made under.
    pub token: u64,
    /// The worker's name.
    pub worker: &'a str,
    /// The job's id.
    pub job_id: &'a str,
    /// When the holder's begin ran (µs since the epoch; see [`now_us`](super::now_us)).
    pub started_us: i64,
}
