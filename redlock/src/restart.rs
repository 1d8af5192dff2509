//! Restart awareness: bringing nodes that came up empty back into service.
//!
//! The acquire script keeps a node that lost its data out of every quorum (it answers
//! "unseeded", then "in quarantine"). A client that meets such a node seeds it: it reads the
//! fencing state (high-water marks and counters) of a quorum of seeded nodes, raises the
//! node's high-water mark and floor to the largest number read, and marks the node seeded.
//! The quarantine then runs out on the node's own clock. When a quorum of nodes is unseeded
//! and none is seeded, the cluster is new: nothing was ever locked, so the nodes are marked
//! seeded and the quarantine is lifted. When fewer than a quorum are seeded but every node
//! answers (a majority lost its data, or empty nodes were added), the remaining state is the
//! best there is: it is used, the quarantine stays, and an error is logged, since tokens may
//! then repeat.
//!
//! The decision is made from the states read, and the seeding calls may reach a node late,
//! after it restarted again. Each call therefore carries the `nonce` of the node state it
//! was decided from, and `seed.lua` refuses it once that state is gone: a stale decision
//! never lifts a newer quarantine. A node read without any state first gets one (in
//! quarantine, unseeded), so that there is a nonce to carry. Opening a new cluster takes
//! two steps (`genesis.lua`), so that reads that went stale before the decision was
//! applied cannot open a node either.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;

use crate::node::Node;
use crate::ops::{Genesis, GenesisStep, NodeState, Op, Outcome, Seed, new_value};
use crate::shared::Shared;

/// Seeding reads every counter of a node; it gets more time than a lock round.
const SEED_TIMEOUT: Duration = Duration::from_secs(2);

/// Clears the client's seeding flag however the seeding ends, cancellation included.
struct SeedingFlag<'a>(&'a Shared);

impl Drop for SeedingFlag<'_> {
    fn drop(&mut self) {
        self.0.seeding.store(false, Ordering::SeqCst);
    }
}

impl Shared {
    /// Seeds every reachable node that came up empty. Returns whether any node was seeded.
    ///
    /// Idempotent and safe to run from several clients at once: seeding only raises the
    /// nodes' high-water marks and floors. One client runs one seeding at a time.
    pub(crate) async fn seed_nodes(&self) -> bool {
        if self.seeding.swap(true, Ordering::SeqCst) {
            return false;
        }
        let _flag = SeedingFlag(self);
        let nodes = self.fanout.nodes();
        let quorum = self.quorum();
        let quarantine_ms = self.quarantine_ms();
        let states = join_all(
            nodes
                .iter()
                .map(|n| n.restart_state(quarantine_ms, SEED_TIMEOUT)),
        )
        .await;
        let (mut seeded, mut unseeded) = (Vec::new(), Vec::new());
        for (node, state) in nodes.iter().zip(states) {
            match state {
                Ok(state) if state.seeded => seeded.push(node),
                Ok(NodeState {
                    nonce: Some(nonce), ..
                }) => unseeded.push((node, nonce)),
                // `init.lua` gives every state a nonce; only a concurrent restart can hide it.
                Ok(_) => tracing::debug!(node = node.addr(), "node state has no nonce yet"),
                Err(failure) => tracing::debug!(%failure, "node state unknown; not seeding it now"),
            }
        }
        if unseeded.is_empty() {
            return false;
        }
        let all_answered = seeded.len() + unseeded.len() == nodes.len();
        if seeded.is_empty() && unseeded.len() >= quorum && all_answered {
            return self.open_new_cluster(&unseeded).await;
        }
        let high = if seeded.is_empty() && unseeded.len() >= quorum {
            // A new cluster with nodes down, or a majority that lost its data while the
            // others are out of reach: the two look alike from here. Seed with what there
            // is (nothing) and keep the quarantine, which is only slow if the cluster is new.
            tracing::warn!(
                unseeded = unseeded.len(),
                unanswered = nodes.len() - unseeded.len(),
                "a quorum of lock nodes has no state and the others do not answer: a new cluster with nodes down, or a majority that lost its data; they vote after their quarantine, and fencing tokens may start again"
            );
            0
        } else if seeded.len() >= quorum {
            match read_high(&seeded, quorum).await {
                Some(high) => high,
                None => return false,
            }
        } else if all_answered && !seeded.is_empty() {
            // Fewer than a quorum remember anything: a majority lost its data, or empty
            // nodes were added to a smaller deployment. Waiting would never end; seed from
            // what is left and keep the quarantine, and say loudly what that means.
            tracing::error!(
                seeded = seeded.len(),
                unseeded = unseeded.len(),
                quorum,
                "fewer than a quorum of lock nodes kept their data; seeding from the rest: fencing tokens issued before may repeat (run the lock nodes with AOF)"
            );
            match read_high(&seeded, seeded.len()).await {
                Some(high) => high,
                None => return false,
            }
        } else {
            tracing::warn!(
                seeded = seeded.len(),
                quorum,
                "nodes came up empty, but fewer than a quorum of seeded nodes answer; cannot seed them yet"
            );
            return false;
        };
        let mut any = false;
        for (node, nonce) in unseeded {
            let seed = node.run(Op::Seed(Seed {
                quarantine_ms,
                nonce,
                high,
            }));
            match tokio::time::timeout(SEED_TIMEOUT, seed).await {
                Ok(Ok(Outcome::Seeded(false))) => tracing::info!(
                    node = node.addr(),
                    "seeding refused: the node's state changed since it was read (it restarted again)"
                ),
                Ok(Ok(_)) => {
                    any = true;
                    tracing::info!(node = node.addr(), high, "seeded a node that came up empty");
                }
                Ok(Err(failure)) => tracing::warn!(%failure, "could not seed node"),
                Err(_) => tracing::warn!(node = node.addr(), "seeding timed out"),
            }
        }
        any
    }

    /// Opens a new cluster (a quorum read unseeded, none seeded) without a quarantine, by
    /// `genesis.lua`'s two steps: claim every node read for this decision, and open them
    /// only if a quorum was claimed. The reads may be stale by then (another client opened
    /// the cluster, a node restarted since): a node that changed refuses the claim, so a
    /// stale decision claims no quorum and opens nothing.
    async fn open_new_cluster(&self, unseeded: &[(&Node, String)]) -> bool {
        let decision = new_value();
        let step = |step: GenesisStep, nodes: Vec<&(&Node, String)>| {
            join_all(nodes.into_iter().map(|(node, nonce)| {
                let call = node.run(Op::Genesis(Genesis {
                    step,
                    nonce: nonce.clone(),
                    decision: decision.clone(),
                }));
                async move {
                    matches!(
                        tokio::time::timeout(SEED_TIMEOUT, call).await,
                        Ok(Ok(Outcome::Genesis(true)))
                    )
                }
            }))
        };
        let claimed: Vec<&(&Node, String)> = unseeded
            .iter()
            .zip(step(GenesisStep::Claim, unseeded.iter().collect()).await)
            .filter_map(|(node, claimed)| claimed.then_some(node))
            .collect();
        let claims = claimed.len();
        if claims < self.quorum() {
            tracing::info!(
                claims,
                "not opening a new cluster: its nodes changed since they were read (another client opened it, or one restarted); seeding them as usual instead"
            );
            return false;
        }
        let opened = step(GenesisStep::Open, claimed)
            .await
            .into_iter()
            .filter(|o| *o)
            .count();
        tracing::info!(nodes = opened, "new cluster: its nodes are open");
        opened > 0
    }

    /// Seeds in the background, for an acquisition that succeeded without the empty nodes.
    pub(crate) fn spawn_seed(self: &Arc<Self>) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = self.clone();
            handle.spawn(async move {
                shared.seed_nodes().await;
            });
        }
    }
}

/// The largest fencing number on the seeded nodes: their high-water marks, and every
/// counter too (a counter written by an older client, which keeps no high-water mark, may
/// be above it), or `None` when fewer than a quorum of them could be read. A quorum
/// suffices: any token ever handed out is known to a quorum, and two quorums share a node.
async fn read_high(seeded: &[&Node], quorum: usize) -> Option<u64> {
    let reads = join_all(seeded.iter().map(|n| n.fence_counters(SEED_TIMEOUT))).await;
    let mut high = 0;
    let mut ok = 0;
    for read in reads {
        match read {
            Ok(counters) => {
                ok += 1;
                for (_, v) in counters {
                    high = high.max(u64::try_from(v).unwrap_or(0));
                }
            }
            Err(failure) => tracing::warn!(%failure, "could not read fence counters"),
        }
    }
    (ok >= quorum).then_some(high)
}
