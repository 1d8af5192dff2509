//! "Charged exactly once", checked over the attempt log.

use std::fmt;

use super::records::{Attempt, Order, Outcome};

/// What the attempt log proves, order by order. Built by [`Ledger::audit`](super::Ledger::audit).
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
