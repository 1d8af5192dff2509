//! What a simulation changes in a client or a node: the bugs it plants and the switches a
//! real client never has.

use std::sync::Mutex;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::retry::RetryPolicy;

/// A bug to plant, to show that a simulation's checker catches it. Each one undoes a fix
/// (or a safeguard) of the client or of the scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Bug {
    /// The fencing write-back round is skipped: tokens may repeat or go down.
    NoFenceWriteBack,
    /// A failed extension keeps the previous deadline even when it was a shortening whose
    /// shorter TTL may have landed on the nodes.
    ExtendKeepsLongerDeadline,
    /// The nodes apply a seeding decided from a state they no longer have (no nonce check):
    /// a late seeding lifts a newer quarantine.
    StaleSeed,
    /// The client takes locks with a TTL longer than its restart quarantine.
    TtlAboveQuarantine,
    /// A restart that kept part of the data goes unnoticed: no check on reconnect.
    NoRestartDetection,
    /// A [`LockHealth`](crate::LockHealth) keeps its last state after its watchdog stopped.
    HealthNeverEnds,
    /// The watchdog's first extension is at ttl/3 from its start, whatever the validity
    /// left, and it reports at risk only after a failed extension.
    WatchdogIgnoresValidity,
    /// Validity leaves no allowance for clock drift.
    NoDrift,
    /// A node that restarted without its data votes again as soon as it is seeded.
    NoQuarantine,
    /// The nodes read a resource whose fence counter expired as never locked (0), instead
    /// of by their high-water mark: the per-resource counters of old, without keeping them.
    NoHighWater,
    /// The nodes' floor is ignored: a counter restored from an older copy of a node's data
    /// counts for what it says, below tokens handed out since, even after the seeding.
    NoFloor,
    /// The model of `release.lua` deletes a key whatever value it holds: a difference
    /// between the model and the script, for the differential test to find.
    ModelReleaseIgnoresValue,
    /// A node that stops answering is never marked down: every release waits a whole node
    /// timeout for it.
    NodeNeverDown,
}

/// The bugs planted in a client or a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Planted(pub(super) u32);

impl Planted {
    pub(crate) fn contains(self, bug: Bug) -> bool {
        self.0 & (1 << bug as u32) != 0
    }
}

/// What a simulated client does that a real one never does, for tests that need it:
/// handed to [`RedlockBuilder::build_simulated_with`](crate::RedlockBuilder::build_simulated_with)
/// (or, for real nodes, [`RedlockBuilder::build_with`](crate::RedlockBuilder::build_with)).
#[derive(Debug, Clone, Copy, Default)]
pub struct SimOptions {
    jitter_seed: Option<u64>,
    swap_every_hand_off: bool,
}

impl SimOptions {
    /// Draws retry jitter from a generator seeded with `seed`, so that a simulation
    /// replays exactly.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }

    /// Makes every in-process hand-off a swap round, as if validity were always short:
    /// for tests of what happens around those rounds.
    pub fn swap_every_hand_off(mut self) -> Self {
        self.swap_every_hand_off = true;
        self
    }
}

/// A client's simulation switches and planted bugs, as its rounds read them.
#[derive(Debug, Default)]
pub(crate) struct ClientSim {
    pub(crate) planted: Planted,
    jitter: Option<Mutex<SmallRng>>,
    pub(crate) swap_every_hand_off: bool,
}

impl ClientSim {
    pub(crate) fn new(planted: Planted, options: SimOptions) -> Self {
        ClientSim {
            planted,
            jitter: options
                .jitter_seed
                .map(|seed| Mutex::new(SmallRng::seed_from_u64(seed))),
            swap_every_hand_off: options.swap_every_hand_off,
        }
    }

    /// The wait before the next retry, from the seeded generator; `None` without one.
    pub(crate) fn retry_delay(&self, policy: RetryPolicy) -> Option<Duration> {
        let rng = self.jitter.as_ref()?;
        Some(policy.next_delay(&mut *rng.lock().unwrap_or_else(|p| p.into_inner())))
    }
}
