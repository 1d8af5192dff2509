//! What every layer above the fan-out shares: the settings, the nodes, the in-process
//! slots, and what a holder has ([`Granted`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

use crate::clock;
use crate::error::{Error, LostReason};
use crate::fanout::Fanout;
use crate::retry::RetryPolicy;

/// The longest TTL a lock may be taken or extended for: 24 hours. Hold a lock longer with
/// [`auto_extend`](crate::LockGuard::auto_extend); a TTL this long would also need a
/// restart quarantine as long, which keeps a restarted node out of service all that time.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// One resource's slot in this process: empty, or the lock its last holder left for the
/// next local waiter.
pub(crate) type Slot = Arc<AsyncMutex<Option<Granted>>>;

/// One slot per resource that some task of this process holds or waits for.
pub(crate) type Slots = StdMutex<HashMap<String, Slot>>;

/// A client's state, shared by its clones, its guards and its background work.
pub(crate) struct Shared {
    pub(crate) fanout: Fanout,
    pub(crate) drift_factor: f64,
    pub(crate) retry: RetryPolicy,
    pub(crate) max_local_handoffs: usize,
    pub(crate) fencing: bool,
    pub(crate) quarantine: Duration,
    /// How long a resource's fence counter lives on a node after its last write.
    pub(crate) fence_window: Duration,
    /// Set while a seeding of restarted nodes runs, so that one client runs one at a time.
    pub(crate) seeding: AtomicBool,
    /// A simulation's switches and the bugs it planted in this client.
    #[cfg(feature = "sim")]
    pub(crate) sim: crate::sim::ClientSim,
    /// Tasks of this process that want the same resource queue here instead of hammering
    /// the nodes: one of them contends in Redis, the rest wait for a hand-off.
    pub(crate) local: Slots,
    /// With fencing, the last token each recently locked resource was given in this
    /// process, as a hint for its next round (see [`Shared::token_hint`]).
    recent_tokens: StdMutex<HashMap<String, u64>>,
}

/// How many resources' last tokens a client remembers; past that it forgets them all and
/// starts again. The hints only save rounds, so forgetting costs at most one each.
const RECENT_TOKENS: usize = 4096;

/// What a holder has: granted by an acquire round, or handed on without a round by the
/// previous holder in this process (then it waits in the local queue as a baton).
#[derive(Debug, Clone)]
pub(crate) struct Granted {
    /// This acquisition's value first, then the values of the hand-off chain that led to
    /// it (empty for an acquisition from scratch); nodes may hold any of them.
    pub(crate) values: Vec<Arc<str>>,
    /// Until when the holder can count on the lock (extensions move it).
    pub(crate) valid_until: Instant,
    /// With fencing, the token of this acquisition.
    pub(crate) token: Option<u64>,
    /// With fencing, the last token reserved with `token`: the chain may hand out the ones
    /// in between without a round, and every later acquisition's token is larger.
    pub(crate) last_token: u64,
    /// Set when the acquisition is over, so that late grants are taken back. A hand-off
    /// chain shares one: a slow node's grant from an earlier hand-off sets a value the
    /// later holders own too, so it is taken back only once the last of them is done.
    pub(crate) over: Arc<AtomicBool>,
    /// In-process hand-offs since the lock was acquired from free keys.
    pub(crate) handoffs: usize,
}

impl Granted {
    /// Ends a hand-off chain here: late grants from any of its rounds are taken back from
    /// now on.
    pub(crate) fn end(&self) {
        self.over.store(true, Ordering::SeqCst);
    }
}

impl Shared {
    pub(crate) fn new(
        fanout: Fanout,
        drift_factor: f64,
        retry: RetryPolicy,
        max_local_handoffs: usize,
        fencing: bool,
        quarantine: Duration,
        fence_window: Duration,
    ) -> Self {
        Shared {
            fanout,
            drift_factor,
            retry,
            max_local_handoffs,
            fencing,
            quarantine,
            fence_window,
            seeding: AtomicBool::new(false),
            #[cfg(feature = "sim")]
            sim: crate::sim::ClientSim::default(),
            local: Slots::default(),
            recent_tokens: StdMutex::default(),
        }
    }

    /// The last token this process was given for any of `keys`, or 0: a round passes it to
    /// the nodes, which answer more than it. A node that missed this process's last
    /// acquisition of a resource then answers what the others do, and no write-back round
    /// is needed. Any hint is safe: a larger answer never breaks the tokens' order.
    pub(crate) fn token_hint(&self, keys: &[String]) -> u64 {
        let recent = self.recent_tokens.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .filter_map(|k| recent.get(k).copied())
            .max()
            .unwrap_or(0)
    }

    /// Remembers `last`, the last token a round reserved, for `keys`.
    pub(crate) fn remember_token(&self, keys: &[String], last: u64) {
        let mut recent = self.recent_tokens.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() + keys.len() > RECENT_TOKENS {
            recent.clear();
        }
        for k in keys {
            // The key is copied only for a resource not yet remembered: locking one again
            // is the steady state.
            match recent.get_mut(k) {
                Some(e) => *e = (*e).max(last),
                None => {
                    recent.insert(k.clone(), last);
                }
            }
        }
    }

    /// How many nodes must agree: `n / 2 + 1`.
    pub(crate) fn quorum(&self) -> usize {
        self.fanout.quorum()
    }

    /// The clock drift allowed for a lock of `ttl`: `ttl * drift_factor + 2 ms`.
    pub(crate) fn drift(&self, ttl: Duration) -> Duration {
        if planted!(self, NoDrift) {
            return Duration::ZERO;
        }
        ttl.mul_f64(self.drift_factor) + Duration::from_millis(2)
    }

    /// Whether a simulation planted `bug` in this client.
    #[cfg(feature = "sim")]
    pub(crate) fn planted(&self, bug: crate::sim::Bug) -> bool {
        self.sim.planted.contains(bug)
    }

    /// Refuses a TTL that cannot be held safely: below 1 ms, above [`MAX_TTL`], eaten by
    /// the drift allowance, or longer than the restart quarantine (a node that restarted
    /// empty would then vote again while a lock it had granted was still valid).
    pub(crate) fn check_ttl(&self, ttl: Duration) -> Result<(), Error> {
        if ttl < Duration::from_millis(1) {
            return Err(Error::config("ttl", "must be at least 1 ms"));
        }
        if ttl > MAX_TTL {
            return Err(Error::config(
                "ttl",
                format!(
                    "{ttl:?} is longer than the maximum of {MAX_TTL:?}; hold longer with `auto_extend`"
                ),
            ));
        }
        if ttl > self.quarantine && !planted!(self, TtlAboveQuarantine) {
            return Err(Error::config(
                "ttl",
                format!(
                    "{ttl:?} is longer than the restart quarantine of {:?}: a lock node that restarts without its data could let a second holder in before this lock expires; raise `restart_quarantine` to at least the longest TTL any client uses",
                    self.quarantine
                ),
            ));
        }
        let drift = self.drift(ttl);
        if ttl <= drift {
            return Err(Error::config(
                "ttl",
                format!(
                    "{} ms leaves no validity after a clock drift allowance of {} us",
                    ttl.as_millis(),
                    drift.as_micros()
                ),
            ));
        }
        Ok(())
    }

    /// The wait before the next acquisition round. Jitter needs no CSPRNG; a fresh
    /// `SmallRng` per wait keeps the acquire future `Send`.
    pub(crate) fn retry_delay(&self, policy: RetryPolicy) -> Duration {
        #[cfg(feature = "sim")]
        if let Some(wait) = self.sim.retry_delay(policy) {
            return wait;
        }
        policy.next_delay(&mut SmallRng::from_os_rng())
    }

    /// The quarantine, as the scripts take it.
    pub(crate) fn quarantine_ms(&self) -> u64 {
        if planted!(self, NoQuarantine) {
            return 0;
        }
        clock::millis_ceil(self.quarantine)
    }

    pub(crate) fn lost(&self, keys: &[String], reason: LostReason) -> Error {
        Error::Lost {
            resource: keys[0].clone(),
            reason,
        }
    }
}
