//! The shared client: the nodes, the settings and the in-process wait queues.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::time::Instant;

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use futures_util::future::{Either, join_all};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use redis::Script;
use tracing::Instrument;

use crate::builder::{MAX_TTL, RedlockBuilder};
use crate::clock;
use crate::error::{Error, LostReason, NodeFailure};
use crate::guard::LockGuard;
use crate::local::{Baton, LocalTurn, Slots};
use crate::node::{Node, Payload, Reply, ToRedisArgsDyn};
use crate::quorum::{Decision, Tally, quorum};
use crate::retry::RetryPolicy;
use crate::scripts;

/// A Redlock client over N independent Redis nodes.
///
/// Cheap to clone: clones share one multiplexed, self-reconnecting connection per node and
/// one in-process wait queue per resource. Build it with [`Redlock::builder`].
///
/// Each node has a driver task, spawned on the runtime that builds the client: it sends
/// one call at once when the node is idle, and the calls that arrive while a command is in
/// flight as one batch script after it, in the order they were made. Under load, 64 tasks
/// locking at once cost each node one command rather than 64. Use the client on the
/// runtime that built it; once that runtime shuts down, calls fail with a Redis error.
///
/// # Guarantees
///
/// While a [`LockGuard`] reports validity left ([`LockGuard::validity`] is non-zero), no
/// other client holds the same resource on a quorum of nodes, provided that nodes do not
/// lose their data while a lock is held and clocks advance at rates within the drift factor.
#[derive(Clone)]
pub struct Redlock {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    nodes: Vec<Node>,
    quorum: usize,
    node_timeout: Duration,
    drift_factor: f64,
    retry: RetryPolicy,
    max_local_handoffs: usize,
    fencing: bool,
    quarantine: Duration,
    /// Set while a seeding of restarted nodes runs, so that one client runs one at a time.
    pub(crate) seeding: AtomicBool,
    /// A seeded source of retry jitter, for reproducible simulations; `None` draws from the
    /// operating system.
    pub(crate) jitter: Option<StdMutex<SmallRng>>,
    /// The bugs a simulation planted in this client, to show that its checker catches them.
    #[cfg(feature = "sim")]
    pub(crate) planted: crate::sim::Planted,
    /// Off only in tests that need every hand-off to be a swap round.
    pub(crate) pass_on: bool,
    /// Tasks of this process that want the same resource queue here instead of hammering
    /// the nodes: one of them contends in Redis, the rest wait for a hand-off.
    local: Slots,
}

impl Inner {
    pub(crate) fn new(
        nodes: Vec<Node>,
        node_timeout: Duration,
        drift_factor: f64,
        retry: RetryPolicy,
        max_local_handoffs: usize,
        fencing: bool,
        quarantine: Duration,
    ) -> Self {
        Inner {
            quorum: quorum(nodes.len()),
            nodes,
            node_timeout,
            drift_factor,
            retry,
            max_local_handoffs,
            fencing,
            quarantine,
            seeding: AtomicBool::new(false),
            jitter: None,
            #[cfg(feature = "sim")]
            planted: crate::sim::Planted::default(),
            pass_on: true,
            local: Slots::default(),
        }
    }
}

impl fmt::Debug for Redlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redlock")
            .field("nodes", &self.inner.nodes)
            .field("quorum", &self.inner.quorum)
            .field("node_timeout", &self.inner.node_timeout)
            .field("drift_factor", &self.inner.drift_factor)
            .field("retry", &self.inner.retry)
            .field("fencing", &self.inner.fencing)
            .field("quarantine", &self.inner.quarantine)
            .finish()
    }
}

/// Releases a failed or abandoned acquisition if its future is dropped before it decides.
struct PendingCleanup<'a> {
    client: &'a Redlock,
    keys: &'a Arc<[String]>,
    /// This round's value, then those of the hand-off chain it started from.
    values: &'a [Arc<str>],
    over: &'a Arc<AtomicBool>,
    /// The acquisition's local turn. The spawned release takes it along, so the next task
    /// of this process that waits for these keys starts once they are gone from the nodes,
    /// not while our keys are still there to refuse its first round.
    turn: &'a mut Option<LocalTurn>,
    armed: bool,
}

impl Drop for PendingCleanup<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.over.store(true, Ordering::SeqCst);
            self.client
                .spawn_release(self.keys.clone(), self.values.to_vec(), self.turn.take());
        }
    }
}

/// For an acquire round: whose keys a grant that arrives after the round belongs to, and
/// whether that acquisition is already over (released or failed; a hand-off carries it
/// on), in which case the late grant is released on its node at once.
#[derive(Clone)]
pub(crate) struct LateGrants {
    pub(crate) over: Arc<AtomicBool>,
    pub(crate) keys: Arc<[String]>,
    /// Shared, since every node's queued call holds a copy.
    pub(crate) values: Arc<[Arc<str>]>,
}

/// When a round stops waiting for replies (before its deadline).
pub(crate) enum Until {
    /// When every node has answered: cleanup should reach every node.
    AllReplied,
    /// As soon as the quorum is certain, one way or the other; with what to do about a
    /// grant that arrives later.
    Decided(Option<LateGrants>),
}

/// The most fencing tokens one acquisition reserves for hand-offs without a round (it
/// reserves `max_local_handoffs`, up to this): a large `max_local_handoffs` does not use
/// up the counters, and a longer chain takes a fresh run in a swap round.
const MAX_RESERVED_TOKENS: usize = 64;

/// How long calls a round no longer waits for may still finish in the background.
const STRAGGLER_GRACE: Duration = Duration::from_secs(30);

/// One node's call in a round.
enum Slot<F: Future> {
    /// Not answered yet.
    Out(F),
    /// Answered, not yet counted.
    In(F::Output),
    /// Counted.
    Counted,
}

/// Polls every call still out, then hands over the first answer not yet counted, with its
/// node's index; `None` once every answer is counted. Every call is polled each time, so a
/// model node's call (which starts when first polled) starts with its round even when
/// another answers at once. A round has one call per node, so scanning them all costs less
/// than the per-call allocations a `FuturesUnordered` makes.
fn next_reply<F: Future + Unpin>(
    slots: &mut [Slot<F>],
    cx: &mut Context<'_>,
) -> Poll<Option<(usize, F::Output)>> {
    for slot in slots.iter_mut() {
        if let Slot::Out(call) = slot
            && let Poll::Ready(reply) = Pin::new(call).poll(cx)
        {
            *slot = Slot::In(reply);
        }
    }
    let mut out = false;
    for (i, slot) in slots.iter_mut().enumerate() {
        match std::mem::replace(slot, Slot::Counted) {
            Slot::In(reply) => return Poll::Ready(Some((i, reply))),
            Slot::Out(call) => {
                *slot = Slot::Out(call);
                out = true;
            }
            Slot::Counted => {}
        }
    }
    if out {
        Poll::Pending
    } else {
        Poll::Ready(None)
    }
}

/// The replies of one round.
#[derive(Debug)]
pub(crate) struct Replies {
    pub(crate) tally: Tally,
    pub(crate) failures: Vec<NodeFailure>,
    /// The largest and smallest successful reply: with fencing, the tokens.
    pub(crate) highest: i64,
    pub(crate) lowest: i64,
    /// How many nodes said they came up empty and have not been seeded.
    pub(crate) unseeded: usize,
    /// The nodes (by index) whose connection broke under the command.
    pub(crate) broken: Vec<usize>,
}

/// How a release round went, per node.
#[derive(Debug, Default)]
pub(crate) struct ReleaseOutcome {
    pub(crate) deleted: usize,
    pub(crate) failures: Vec<NodeFailure>,
}

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

impl Redlock {
    /// Starts configuring a client; see [`RedlockBuilder`] for the settings and defaults.
    pub fn builder() -> RedlockBuilder {
        RedlockBuilder::default()
    }

    pub(crate) fn from_inner(inner: Inner) -> Self {
        Redlock {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn slots(&self) -> &Slots {
        &self.inner.local
    }

    pub(crate) fn inner_nodes(&self) -> &[Node] {
        &self.inner.nodes
    }

    pub(crate) fn seeding_flag(&self) -> &AtomicBool {
        &self.inner.seeding
    }

    /// Whether acquisitions return fencing tokens.
    pub fn fencing(&self) -> bool {
        self.inner.fencing
    }

    pub(crate) fn max_local_handoffs(&self) -> usize {
        self.inner.max_local_handoffs
    }

    /// How many nodes must agree: `n / 2 + 1`.
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }

    /// The nodes' addresses (`host:port`, without credentials), in configuration order.
    pub fn nodes(&self) -> Vec<&str> {
        self.inner.nodes.iter().map(Node::addr).collect()
    }

    /// The retry policy `lock` uses.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry
    }

    /// The clock drift allowed for a lock of `ttl`: `ttl * drift_factor + 2 ms`.
    pub fn drift(&self, ttl: Duration) -> Duration {
        if planted!(self, NoDrift) {
            return Duration::ZERO;
        }
        ttl.mul_f64(self.inner.drift_factor) + Duration::from_millis(2)
    }

    /// Whether a simulation planted `bug` in this client.
    #[cfg(feature = "sim")]
    pub(crate) fn planted(&self, bug: crate::sim::Bug) -> bool {
        self.inner.planted.contains(bug)
    }

    /// Locks `resource` for `ttl`, retrying with jitter while it is contended or a quorum
    /// is out of reach, as [`RetryPolicy`] says.
    ///
    /// The Redis key is `resource` itself and the value an opaque random string, as with
    /// node-redlock and redsync, so services in other languages can share these locks.
    /// Tasks of this process that lock the same resource through clones of this client wait
    /// for each other in-process, for at most the retry policy's total wait, before they
    /// contend in Redis. A guard held in this process blocks them until it is released or
    /// dropped, even past its validity: release guards promptly. The holder's release hands
    /// the lock to the next of them (see
    /// [`max_local_handoffs`](crate::RedlockBuilder::max_local_handoffs)): while the lock's
    /// validity is still about what a fresh round would give, the guard then carries the
    /// holder's value and deadline (and with fencing the next token), with no round at all.
    ///
    /// # Errors
    ///
    /// [`Contended`](crate::ErrorKind::Contended) or
    /// [`NoQuorum`](crate::ErrorKind::NoQuorum) once retries run out;
    /// [`Config`](crate::ErrorKind::Config) for an empty resource or a TTL that leaves no
    /// validity after the drift.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. If the future is dropped mid-flight, a release of whatever this attempt
    /// may have set is spawned on the current runtime (without a runtime the keys expire
    /// with their TTL), and no guard exists, so nothing is held. The next task of this
    /// process waiting for the resource starts once that release is done, so our partial
    /// keys do not refuse its first round.
    pub async fn lock(&self, resource: &str, ttl: Duration) -> Result<LockGuard, Error> {
        self.acquire(&[resource], ttl, self.inner.retry).await
    }

    /// Makes one attempt to lock `resource` for `ttl`: one round to all nodes, no retry.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock), after a single round. A holder in this process makes it fail
    /// with [`Contended`](crate::ErrorKind::Contended) without asking the nodes.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock`](Self::lock).
    pub async fn try_lock(&self, resource: &str, ttl: Duration) -> Result<LockGuard, Error> {
        self.acquire(&[resource], ttl, RetryPolicy::never()).await
    }

    /// Locks several resources at once, retrying like [`lock`](Self::lock). On each node one
    /// script sets every key or none, so a node never holds half of the set.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock); also [`Config`](crate::ErrorKind::Config) for an empty list.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock`](Self::lock).
    pub async fn lock_many(&self, resources: &[&str], ttl: Duration) -> Result<LockGuard, Error> {
        self.acquire(resources, ttl, self.inner.retry).await
    }

    /// One attempt at [`lock_many`](Self::lock_many).
    ///
    /// # Errors
    ///
    /// As [`lock_many`](Self::lock_many), after a single round.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock`](Self::lock).
    pub async fn try_lock_many(
        &self,
        resources: &[&str],
        ttl: Duration,
    ) -> Result<LockGuard, Error> {
        self.acquire(resources, ttl, RetryPolicy::never()).await
    }

    /// Locks with an explicit retry policy instead of the client's.
    ///
    /// # Errors
    ///
    /// As [`lock_many`](Self::lock_many).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock`](Self::lock).
    pub async fn lock_with_retry(
        &self,
        resources: &[&str],
        ttl: Duration,
        policy: RetryPolicy,
    ) -> Result<LockGuard, Error> {
        self.acquire(resources, ttl, policy).await
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
        if ttl > self.inner.quarantine && !planted!(self, TtlAboveQuarantine) {
            return Err(Error::config(
                "ttl",
                format!(
                    "{ttl:?} is longer than the restart quarantine of {:?}: a lock node that restarts without its data could let a second holder in before this lock expires; raise `restart_quarantine` to at least the longest TTL any client uses",
                    self.inner.quarantine
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

    async fn acquire(
        &self,
        resources: &[&str],
        ttl: Duration,
        policy: RetryPolicy,
    ) -> Result<LockGuard, Error> {
        if resources.is_empty() {
            return Err(Error::config("resources", "no resource given"));
        }
        if let Some(i) = resources.iter().position(|r| r.is_empty()) {
            return Err(Error::config(
                "resources",
                format!("resource {i} is the empty string"),
            ));
        }
        if let Some(r) = resources
            .iter()
            .find(|r| r.starts_with(scripts::RESERVED_PREFIX))
        {
            return Err(Error::config(
                "resources",
                format!(
                    "`{r}` starts with `{}`, which fencelock keeps for its own keys on the nodes",
                    scripts::RESERVED_PREFIX
                ),
            ));
        }
        self.check_ttl(ttl)?;
        let mut keys: Vec<String> = resources.iter().map(|r| (*r).to_owned()).collect();
        keys.sort();
        keys.dedup();
        let keys: Arc<[String]> = keys.into();

        let span = tracing::info_span!(
            "fencelock.acquire",
            resource = %keys[0],
            resources = keys.len(),
            ttl_ms = clock::millis_ceil(ttl),
            attempts = tracing::field::Empty,
        );
        async move {
            let mut turn = LocalTurn::wait(self, &keys, policy).await?;
            let mut baton = turn.take_baton().await;
            if let Some(granted) = baton.as_ref().and_then(|b| self.pass_on(b, ttl)) {
                tracing::Span::current().record("attempts", 0);
                return Ok(LockGuard::new(self.clone(), keys, ttl, granted, Some(turn)));
            }
            // An Option so that a round dropped mid-flight can hand it to its cleanup.
            let mut turn = Some(turn);
            let mut attempt = 0u32;
            let mut seeded_once = false;
            loop {
                let from = baton.take();
                let handing_off = from.is_some();
                if !handing_off {
                    attempt += 1;
                }
                match self.round(&keys, ttl, attempt, from.as_ref(), &mut turn).await {
                    Ok(granted) => {
                        tracing::Span::current().record("attempts", attempt);
                        return Ok(LockGuard::new(self.clone(), keys, ttl, granted, turn));
                    }
                    // The baton had expired; both values are released, so go from scratch.
                    Err(_) if handing_off => {}
                    // Nodes came up empty (or the cluster is new): seed them and go again at
                    // once, without spending an attempt.
                    Err((_, true)) if !seeded_once && self.seed_nodes().await => {
                        seeded_once = true;
                        attempt -= 1;
                    }
                    Err((e, _)) if e.is_retryable() && attempt <= policy.retries() => {
                        // Jitter needs no CSPRNG; a fresh SmallRng per wait keeps the future Send.
                        let wait = match &self.inner.jitter {
                            Some(rng) => policy
                                .next_delay(&mut *rng.lock().unwrap_or_else(|p| p.into_inner())),
                            None => policy.next_delay(&mut SmallRng::from_os_rng()),
                        };
                        tracing::debug!(attempt, error = %e, wait_ms = wait.as_millis() as u64, "acquire round failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err((e, _)) => {
                        tracing::Span::current().record("attempts", attempt);
                        return Err(e);
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Takes over a lock that the previous holder in this process handed on, as it is: no
    /// round, the same value and the validity the chain already has, and with fencing the
    /// next of the tokens reserved in the chain's last round. Only while that validity is at
    /// least what a fresh round could leave after using its whole node timeout (and at least
    /// half of what `ttl` gives), so that a waiter never gets noticeably less than it asked
    /// for, and with fencing only while reserved tokens are left.
    fn pass_on(&self, baton: &Baton, ttl: Duration) -> Option<Granted> {
        if !self.inner.pass_on {
            return None;
        }
        let token = match baton.token {
            // The next of the tokens reserved with the chain's last round.
            Some(t) if t < baton.last_token => Some(t + 1),
            Some(_) => return None,
            None => None,
        };
        let full = ttl - self.drift(ttl);
        let floor = full.saturating_sub(self.inner.node_timeout).max(full / 2);
        (baton.valid_until >= clock::after(Instant::now(), floor)).then(|| Granted {
            token,
            handoffs: baton.handoffs + 1,
            ..baton.clone()
        })
    }

    /// One acquire round on all nodes in parallel, decided as soon as it is certain. With
    /// `from`, the round swaps a baton's value for a fresh one instead of setting free keys.
    /// With fencing, a second round writes the token back to a quorum unless the first
    /// already left it there. Errors come with whether a node reported itself unseeded.
    async fn round(
        &self,
        keys: &Arc<[String]>,
        ttl: Duration,
        attempt: u32,
        from: Option<&Baton>,
        turn: &mut Option<LocalTurn>,
    ) -> Result<Granted, (Error, bool)> {
        let fenced = self.inner.fencing;
        let previous: &[Arc<str>] = from.map_or(&[], |b| &b.values);
        let mut values: Vec<Arc<str>> = Vec::with_capacity(previous.len() + 1);
        values.push(new_value().into());
        values.extend_from_slice(previous);
        let start = Instant::now();
        let valid_until = clock::after(start, ttl - self.drift(ttl));
        let ttl_ms = clock::millis_ceil(ttl);
        let quarantine_ms = self.quarantine_ms();
        let fenced_arg = u8::from(fenced);
        let reserved = if fenced {
            self.inner.max_local_handoffs.min(MAX_RESERVED_TOKENS) as u64
        } else {
            0
        };
        // A hand-off continues its chain, so its late grants are the chain's to take back.
        let over = from.map_or_else(|| Arc::new(AtomicBool::new(false)), |b| b.over.clone());
        let mut cleanup = PendingCleanup {
            client: self,
            keys,
            values: &values,
            over: &over,
            turn,
            armed: true,
        };
        // Lock keys, then with fencing their counters, then for ACQUIRE the node key.
        let mut script_keys: Vec<String> = keys.to_vec();
        if fenced {
            script_keys.extend(keys.iter().map(|k| scripts::fence_key(k)));
        }
        let value: &str = &values[0];
        let previous_strs: Vec<&str> = previous.iter().map(|v| &**v).collect();
        let (script, args): (&'static Script, Vec<&dyn ToRedisArgsDyn>) = if previous.is_empty() {
            script_keys.push(scripts::NODE_KEY.to_owned());
            (
                &scripts::ACQUIRE,
                vec![&value, &ttl_ms, &quarantine_ms, &fenced_arg, &reserved],
            )
        } else {
            let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&value, &ttl_ms, &fenced_arg, &reserved];
            args.extend(previous_strs.iter().map(|v| v as &dyn ToRedisArgsDyn));
            (&scripts::HANDOFF, args)
        };

        let deadline = self.round_deadline(start, valid_until);
        // Replies still in flight when the round is decided are dropped; a SET that lands
        // late is removed by the release below or by the guard's release, which go to every
        // node and wait for all of them.
        let replies = self
            .broadcast(
                "acquire",
                script,
                &script_keys,
                &args,
                deadline,
                Until::Decided(Some(LateGrants {
                    over: over.clone(),
                    keys: keys.clone(),
                    values: values.as_slice().into(),
                })),
            )
            .await;
        let tally = replies.tally;
        let unseeded = replies.unseeded > 0;
        let mut failures = replies.failures;

        // With fencing the token is the largest counter the quorum issued. If the quorum
        // did not all issue that one, raise their counters to it and the tokens reserved
        // after it before handing it out.
        let mut fence_failed = false;
        if fenced
            && !planted!(self, NoFenceWriteBack)
            && tally.decision() == Decision::Reached
            && replies.highest != replies.lowest
        {
            let fence_keys = &script_keys[..2 * keys.len()];
            let last_token = replies.highest + reserved as i64;
            let write_back = self
                .broadcast(
                    "fence",
                    &scripts::FENCE,
                    fence_keys,
                    &[&value, &last_token],
                    self.round_deadline(Instant::now(), valid_until),
                    Until::Decided(None),
                )
                .await;
            if write_back.tally.decision() != Decision::Reached {
                fence_failed = true;
                failures = write_back.failures;
            }
        }

        let elapsed = start.elapsed();
        tracing::debug!(
            attempt,
            granted = tally.ok,
            held = tally.refused,
            failed = tally.failed,
            quorum_margin = tally.margin(),
            token = replies.highest,
            elapsed_us = elapsed.as_micros() as u64,
            "acquire round"
        );
        let error = match tally.decision() {
            Decision::Reached if fence_failed => Error::NoQuorum {
                resource: keys[0].clone(),
                operation: "fence write-back",
                quorum: tally.quorum(),
                succeeded: 0,
                failures,
            },
            Decision::Reached if Instant::now() < valid_until => {
                cleanup.armed = false;
                if unseeded {
                    self.spawn_seed();
                }
                return Ok(Granted {
                    values: values.clone(),
                    valid_until,
                    token: fenced.then_some(replies.highest as u64),
                    last_token: replies.highest as u64 + reserved,
                    over: over.clone(),
                    handoffs: from.map_or(0, |b| b.handoffs + 1),
                });
            }
            Decision::Reached => Error::ExpiredDuringAcquire {
                resource: keys[0].clone(),
                elapsed,
                ttl,
            },
            _ if tally.failures_alone_prevent_quorum() || tally.refused == 0 => Error::NoQuorum {
                resource: keys[0].clone(),
                operation: "acquire",
                quorum: tally.quorum(),
                succeeded: tally.ok,
                failures,
            },
            _ => Error::Contended {
                resource: keys[0].clone(),
                held_elsewhere: tally.refused,
                granted: tally.ok,
                quorum: tally.quorum(),
                attempts: attempt,
            },
        };
        // Release everywhere now, not after the last retry (node-redlock PR #369): our
        // partial keys would otherwise block our own next round.
        over.store(true, Ordering::SeqCst);
        self.release_all(keys, &values, false).await;
        cleanup.armed = false;
        Err((error, unseeded))
    }

    /// When a round started at `start` gives up on the nodes that have not answered: after
    /// the node timeout, but never past the lock's validity.
    pub(crate) fn round_deadline(&self, start: Instant, valid_until: Instant) -> Instant {
        valid_until.min(clock::after(start, self.inner.node_timeout))
    }

    /// The quarantine, as the scripts take it.
    pub(crate) fn quarantine_ms(&self) -> u64 {
        if planted!(self, NoQuarantine) {
            return 0;
        }
        clock::millis_ceil(self.inner.quarantine)
    }

    /// Runs `script` on every node at once and counts the replies: a positive integer is
    /// a success, zero a refusal, -1 and -2 a node that may not vote after a restart. One
    /// deadline bounds the whole round (a timer per node costs more than the round itself on
    /// a fast network); nodes that have not answered by then count as timed out. With
    /// `until_decided`, returns as soon as the tally is decided, dropping the replies still
    /// in flight.
    pub(crate) async fn broadcast(
        &self,
        operation: &'static str,
        script: &'static Script,
        keys: &[String],
        args: &[&dyn ToRedisArgsDyn],
        deadline: Instant,
        until: Until,
    ) -> Replies {
        let (until_decided, late) = match until {
            Until::AllReplied => (false, None),
            Until::Decided(late) => (true, late),
        };
        let start = Instant::now();
        let nodes = &self.inner.nodes;
        let mut out = Replies {
            tally: Tally::new(nodes.len()),
            failures: Vec::new(),
            highest: 0,
            lowest: i64::MAX,
            unseeded: 0,
            broken: Vec::new(),
        };
        let payload = Payload::new(script, keys, args);
        // One slot per node: those still out when the round ends have not answered.
        let mut calls: Vec<Slot<Reply>> = nodes
            .iter()
            .map(|node| Slot::Out(node.eval_shared(&payload, late.as_ref())))
            .collect();
        let mut expiry = pin!(tokio::time::sleep_until(deadline));
        loop {
            // Unconstrained by tokio's cooperative budget, so that a model node's call (which
            // starts when first polled; a Redis node's is queued when made) starts on the
            // first poll: one held back by the budget and started later, from the background
            // drain below, could land after this client's next command to that node (a
            // release overtaken by its own acquisition).
            let next = tokio::task::unconstrained(poll_fn(|cx| match next_reply(&mut calls, cx) {
                Poll::Ready(reply) => Poll::Ready(Either::Left(reply)),
                Poll::Pending => expiry.as_mut().poll(cx).map(Either::Right),
            }));
            match next.await {
                Either::Left(Some((i, reply))) => {
                    let node = nodes[i].addr();
                    let outcome = match reply {
                        Ok(n) if n > 0 => {
                            out.tally.ok += 1;
                            out.highest = out.highest.max(n);
                            out.lowest = out.lowest.min(n);
                            "ok"
                        }
                        Ok(0) => {
                            out.tally.refused += 1;
                            "refused"
                        }
                        Ok(code) => {
                            out.tally.failed += 1;
                            let unseeded = code == -2;
                            out.unseeded += usize::from(unseeded);
                            out.failures.push(NodeFailure::Restarted {
                                node: node.to_owned(),
                                unseeded,
                            });
                            "restarted"
                        }
                        Err(failure) => {
                            if let NodeFailure::Redis { error, .. } = &failure
                                && (error.is_io_error() || error.is_connection_dropped())
                            {
                                out.broken.push(i);
                            }
                            out.tally.failed += 1;
                            out.failures.push(failure);
                            "failed"
                        }
                    };
                    tracing::trace!(
                        operation,
                        node,
                        outcome,
                        latency_us = start.elapsed().as_micros() as u64,
                        "node reply"
                    );
                    if until_decided && out.tally.decision() != Decision::Pending {
                        break;
                    }
                }
                Either::Left(None) => break,
                Either::Right(()) => {
                    let unanswered = nodes
                        .iter()
                        .zip(&calls)
                        .filter(|(_, c)| matches!(c, Slot::Out(_)));
                    for (node, _) in unanswered {
                        out.tally.failed += 1;
                        out.failures.push(NodeFailure::Timeout {
                            node: node.addr().to_owned(),
                            after: deadline.saturating_duration_since(start),
                        });
                    }
                    break;
                }
            }
        }
        // A Redis node's driver runs the calls still unanswered and takes back their late
        // grants by itself. A model node's calls live in their futures: let those finish
        // in the background rather than drop them, so that each keeps its place in the
        // node's order, and a stalled node's calls end with the grace.
        if calls.iter().any(|c| matches!(c, Slot::Out(_)))
            && nodes.iter().any(Node::needs_drain)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let client = self.clone();
            runtime.spawn(tokio::time::timeout_at(
                deadline + STRAGGLER_GRACE,
                async move {
                    while let Some((i, reply)) = poll_fn(|cx| next_reply(&mut calls, cx)).await {
                        if let (Some(late), Ok(granted)) = (&late, reply)
                            && granted > 0
                            && late.over.load(Ordering::SeqCst)
                        {
                            // Granted after the acquisition was over: take it back.
                            let values: Vec<&str> = late.values.iter().map(|v| &**v).collect();
                            let args: Vec<&dyn ToRedisArgsDyn> =
                                values.iter().map(|v| v as &dyn ToRedisArgsDyn).collect();
                            let node = &client.inner.nodes[i];
                            let _ = node.eval(&scripts::RELEASE, &late.keys, &args, None).await;
                        }
                    }
                },
            ));
        }
        out
    }

    /// Compare-and-delete on every node, in parallel, bounded by the node timeout. With
    /// `retry_broken`, nodes whose connection broke get one more try (the guard's release,
    /// and the background release of a dropped guard); cleanup after a failed round skips
    /// that, since its SET cannot have reached a node whose connection was down.
    ///
    /// Waits for every node rather than a quorum: a command handed to a connection is not
    /// yet written to its socket, and a process that exits right after `release` (a CLI,
    /// a short job) would otherwise leave keys behind until their TTL.
    pub(crate) async fn release_all(
        &self,
        keys: &[String],
        values: &[Arc<str>],
        retry_broken: bool,
    ) -> ReleaseOutcome {
        let values: Vec<&str> = values.iter().map(|v| &**v).collect();
        let args: Vec<&dyn ToRedisArgsDyn> =
            values.iter().map(|v| v as &dyn ToRedisArgsDyn).collect();
        let deadline = clock::after(Instant::now(), self.inner.node_timeout);
        let replies = self
            .broadcast(
                "release",
                &scripts::RELEASE,
                keys,
                &args,
                deadline,
                Until::AllReplied,
            )
            .await;
        let mut outcome = ReleaseOutcome {
            deleted: replies.tally.ok,
            failures: replies.failures,
        };
        if !retry_broken || replies.broken.is_empty() {
            return outcome;
        }
        // A node that restarted (or whose connection dropped) is reconnected on demand:
        // one more try there, in parallel, rather than leaving our key behind until its TTL
        // (a node with AOF keeps our key across its restart).
        let retries = join_all(replies.broken.iter().map(|&i| {
            let node = &self.inner.nodes[i];
            let call = node.eval(&scripts::RELEASE, keys, &args, None);
            async move {
                (
                    node,
                    tokio::time::timeout(self.inner.node_timeout, call).await,
                )
            }
        }))
        .await;
        for (node, retry) in retries {
            if let Ok(Ok(n)) = retry {
                outcome.failures.retain(|f| f.node() != node.addr());
                outcome.deleted += usize::from(n > 0);
            }
        }
        outcome
    }

    /// Compare-and-PEXPIRE on every node, decided at quorum, bounded by the node timeout
    /// and the current validity. A node counts when its keys hold any of `values` (the
    /// acquisition's and its hand-off chain's). Never deletes anything.
    pub(crate) async fn extend_all(
        &self,
        keys: &[String],
        values: &[Arc<str>],
        ttl: Duration,
        valid_until: Instant,
    ) -> Replies {
        let ttl_ms = clock::millis_ceil(ttl);
        let values: Vec<&str> = values.iter().map(|v| &**v).collect();
        let mut args: Vec<&dyn ToRedisArgsDyn> = Vec::with_capacity(values.len() + 1);
        args.push(&ttl_ms);
        args.extend(values.iter().map(|v| v as &dyn ToRedisArgsDyn));
        let deadline = self.round_deadline(Instant::now(), valid_until);
        self.broadcast(
            "extend",
            &scripts::EXTEND,
            keys,
            &args,
            deadline,
            Until::Decided(None),
        )
        .await
    }

    /// Releases in the background: the guard's `Drop` and cancelled acquisitions use this.
    /// Never blocks; without a runtime the keys expire with their TTL.
    pub(crate) fn spawn_release(
        &self,
        keys: Arc<[String]>,
        values: Vec<Arc<str>>,
        turn: Option<LocalTurn>,
    ) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let client = self.clone();
                handle.spawn(async move {
                    let outcome = client.release_all(&keys, &values, true).await;
                    if !outcome.failures.is_empty() {
                        tracing::warn!(resource = %keys[0], failed = outcome.failures.len(), "background release could not reach every node; those keys expire with their TTL");
                    }
                    // The next local waiter starts only now that our keys are gone.
                    drop(turn);
                });
            }
            Err(_) => {
                tracing::warn!(resource = %keys[0], "no tokio runtime to release the lock; its keys expire with their TTL");
            }
        }
    }

    pub(crate) fn lost(&self, keys: &[String], reason: LostReason) -> Error {
        Error::Lost {
            resource: keys[0].clone(),
            reason,
        }
    }
}

/// 128 bits from a CSPRNG (rand's thread-local ChaCha, seeded and reseeded from the
/// operating system), hex-encoded: unique per acquisition and opaque, like node-redlock's
/// and redsync's values. Two `getrandom` calls per acquisition cost more than the rest of
/// the client's work for it.
pub(crate) fn new_value() -> String {
    let bits: u128 = rand::rng().random();
    format!("{bits:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_128_bit_and_unique() {
        let a = new_value();
        let b = new_value();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn drift_is_a_fraction_plus_two_ms() {
        let client = Redlock::builder()
            .node("redis://127.0.0.1:1")
            .drift_factor(0.01)
            .connect_timeout(Duration::from_millis(10))
            .build()
            .await
            .unwrap();
        assert_eq!(
            client.drift(Duration::from_secs(10)),
            Duration::from_millis(102)
        );
        assert!(client.check_ttl(Duration::from_millis(2)).is_err());
        assert!(client.check_ttl(Duration::ZERO).is_err());
        assert!(client.check_ttl(Duration::from_millis(3)).is_ok());
        let e = client.check_ttl(Duration::from_millis(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid `ttl`: 2 ms leaves no validity after a clock drift allowance of 2020 us"
        );
    }

    #[tokio::test]
    async fn validity_budget_caps_the_node_timeout() {
        let client = Redlock::builder()
            .node("redis://127.0.0.1:1")
            .node_timeout(Duration::from_millis(50))
            .connect_timeout(Duration::from_millis(10))
            .build()
            .await
            .unwrap();
        let now = Instant::now();
        let soon = now + Duration::from_millis(10);
        assert_eq!(client.round_deadline(now, soon), soon);
        let later = now + Duration::from_secs(10);
        assert_eq!(
            client.round_deadline(now, later),
            now + Duration::from_millis(50)
        );
    }

    /// A call that answers after `polls_left` more polls, counting every poll.
    struct Counted {
        polls: Arc<std::sync::atomic::AtomicUsize>,
        polls_left: usize,
        answer: i64,
    }

    impl Future for Counted {
        type Output = i64;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.polls_left == 0 {
                return Poll::Ready(self.answer);
            }
            self.polls_left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn every_call_starts_with_its_round_and_every_answer_is_counted_once() {
        let polls: Vec<_> = (0..3)
            .map(|_| Arc::new(std::sync::atomic::AtomicUsize::new(0)))
            .collect();
        // Nodes 0 and 2 answer at once, node 1 on its fourth poll.
        let mut slots: Vec<Slot<Counted>> = [0, 3, 0]
            .into_iter()
            .zip(&polls)
            .enumerate()
            .map(|(i, (polls_left, polls))| {
                Slot::Out(Counted {
                    polls: polls.clone(),
                    polls_left,
                    answer: i as i64 * 10,
                })
            })
            .collect();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);

        // Node 0's answer comes first, but nodes 1 and 2 were started too.
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(Some((0, 0))));
        assert!(polls.iter().all(|p| p.load(Ordering::SeqCst) == 1));
        // Node 2 answered in that same pass: handed over without polling it again.
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(Some((2, 20))));
        assert_eq!(polls[2].load(Ordering::SeqCst), 1);
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Pending);
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(Some((1, 10))));
        assert_eq!(polls[1].load(Ordering::SeqCst), 4);
        assert_eq!(next_reply(&mut slots, &mut cx), Poll::Ready(None));
        assert!(slots.iter().all(|s| matches!(s, Slot::Counted)));
    }
}
