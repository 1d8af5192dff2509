//! Quorum arithmetic, and the tally that decides a round as soon as its outcome is certain.
//!
//! With `n` nodes the quorum is `n / 2 + 1`: the smallest number such that any two quorums
//! share at least one node, which is what makes two simultaneous holders impossible. A round
//! can tolerate `n - quorum` nodes that fail or refuse. An even `n` buys nothing over `n - 1`:
//! 4 nodes need 3 and tolerate 1 failure, like 3 nodes do; it only adds a node that can fail.

/// The quorum for `n` nodes: `n / 2 + 1`.
pub(crate) const fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// How a round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Not decided yet: neither enough successes nor enough failures.
    Pending,
    /// A quorum succeeded.
    Reached,
    /// So many nodes refused or failed that a quorum is out of reach.
    Impossible,
}

/// Counts per-node outcomes of one round.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tally {
    nodes: usize,
    quorum: usize,
    /// Nodes that did what we asked.
    pub(crate) ok: usize,
    /// Nodes that answered "no": held by another owner, or not ours any more.
    pub(crate) refused: usize,
    /// Nodes that failed or timed out.
    pub(crate) failed: usize,
}

impl Tally {
    pub(crate) fn new(nodes: usize) -> Self {
        Tally {
            nodes,
            quorum: quorum(nodes),
            ok: 0,
            refused: 0,
            failed: 0,
        }
    }

    pub(crate) fn quorum(&self) -> usize {
        self.quorum
    }

    /// Successes beyond the quorum; negative when short of it. Recorded in traces.
    pub(crate) fn margin(&self) -> i64 {
        self.ok as i64 - self.quorum as i64
    }

    /// Whether the outcome is certain. Decides at the first moment it can: a quorum of
    /// successes, or more refusals and failures than the nodes can spare.
    pub(crate) fn decision(&self) -> Decision {
        if self.ok >= self.quorum {
            Decision::Reached
        } else if self.refused + self.failed > self.nodes - self.quorum {
            Decision::Impossible
        } else {
            Decision::Pending
        }
    }

    /// Whether the nodes that failed alone (not those that refused) rule out a quorum: then
    /// the problem is reachability, not contention.
    pub(crate) fn failures_alone_prevent_quorum(&self) -> bool {
        self.failed > self.nodes - self.quorum
    }

    /// Whether the refusals alone rule out a quorum: then fewer than a quorum of nodes can
    /// still hold our value, whatever the failed nodes would have said.
    pub(crate) fn refusals_alone_prevent_quorum(&self) -> bool {
        self.refused > self.nodes - self.quorum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_is_a_strict_majority() {
        for (n, q) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)] {
            assert_eq!(quorum(n), q, "n = {n}");
            // Two quorums always intersect.
            assert!(2 * quorum(n) > n);
            // And a quorum is the smallest such number.
            assert!(2 * (quorum(n) - 1) <= n);
        }
    }

    #[test]
    fn decides_as_soon_as_quorum_is_reached() {
        let mut t = Tally::new(5);
        t.ok = 2;
        assert_eq!(t.decision(), Decision::Pending);
        t.ok = 3;
        assert_eq!(t.decision(), Decision::Reached);
        assert_eq!(t.margin(), 0);
    }

    #[test]
    fn decides_as_soon_as_quorum_is_impossible() {
        let mut t = Tally::new(5);
        t.refused = 1;
        t.failed = 1;
        assert_eq!(t.decision(), Decision::Pending, "2 of 5 may still fail");
        t.failed = 2;
        assert_eq!(t.decision(), Decision::Impossible, "3 of 5 gone");
        assert!(!t.failures_alone_prevent_quorum());
        assert!(!t.refusals_alone_prevent_quorum());
        t.refused = 0;
        t.failed = 3;
        assert!(t.failures_alone_prevent_quorum());
        let mut t = Tally::new(5);
        t.refused = 3;
        assert!(t.refusals_alone_prevent_quorum());
    }

    #[test]
    fn even_counts_tolerate_no_more_than_the_odd_count_below() {
        for n in [2usize, 4, 6] {
            assert_eq!(n - quorum(n), (n - 1) - quorum(n - 1));
        }
    }

    #[test]
    fn single_node_needs_itself() {
        let mut t = Tally::new(1);
        assert_eq!(t.decision(), Decision::Pending);
        t.failed = 1;
        assert_eq!(t.decision(), Decision::Impossible);
        let mut t = Tally::new(1);
        t.ok = 1;
        assert_eq!(t.decision(), Decision::Reached);
    }
}
