//! The shared client: the nodes, the settings and the in-process wait queues.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::pin::pin;

use futures_util::StreamExt;
use futures_util::future::{Either, select};
use futures_util::stream::FuturesUnordered;
use rand::SeedableRng;
use rand::TryRngCore;
use rand::rngs::{OsRng, SmallRng};
use redis::Script;
use tracing::Instrument;

use crate::builder::RedlockBuilder;
use crate::error::{Error, LostReason, NodeFailure};
use crate::guard::LockGuard;
use crate::local::{Baton, LocalTurn, Slots};
use crate::node::{Node, ToRedisArgsDyn};
use crate::quorum::{Decision, Tally, quorum};
use crate::retry::RetryPolicy;
use crate::scripts;

/// A Redlock client over N independent Redis nodes.
///
/// Cheap to clone: clones share one multiplexed, self-reconnecting connection per node and
/// one in-process wait queue per resource. Build it with [`Redlock::builder`].
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
    ) -> Self {
        Inner {
            quorum: quorum(nodes.len()),
            nodes,
            node_timeout,
            drift_factor,
            retry,
            max_local_handoffs,
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
            .finish()
    }
}

/// Releases a failed or abandoned acquisition if its future is dropped before it decides.
struct PendingCleanup<'a> {
    client: &'a Redlock,
    keys: &'a Arc<[String]>,
    /// This round's value, then those of the hand-off chain it started from.
    values: &'a [Arc<str>],
    armed: bool,
}

impl Drop for PendingCleanup<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.client
                .spawn_release(self.keys.clone(), self.values.to_vec(), None);
        }
    }
}

/// How a release round went, per node.
#[derive(Debug, Default)]
pub(crate) struct ReleaseOutcome {
    pub(crate) deleted: usize,
    pub(crate) failures: Vec<NodeFailure>,
}

/// What a successful acquire round hands to the guard.
pub(crate) struct Granted {
    /// This acquisition's value first, then the values of the hand-off chain that led to
    /// it (empty for an acquisition from scratch); nodes may hold any of them.
    pub(crate) values: Vec<Arc<str>>,
    pub(crate) valid_until: Instant,
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
        ttl.mul_f64(self.inner.drift_factor) + Duration::from_millis(2)
    }

    /// Locks `resource` for `ttl`, retrying with jitter while it is contended or a quorum
    /// is out of reach, as [`RetryPolicy`] says.
    ///
    /// The Redis key is `resource` itself and the value an opaque random string, as with
    /// node-redlock and redsync, so services in other languages can share these locks.
    /// Tasks of this process that lock the same resource through clones of this client wait
    /// for each other in-process, for at most the retry policy's total wait, before they
    /// contend in Redis.
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
    /// with their TTL), and no guard exists, so nothing is held.
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

    pub(crate) fn check_ttl(&self, ttl: Duration) -> Result<(), Error> {
        if ttl < Duration::from_millis(1) {
            return Err(Error::config("ttl", "must be at least 1 ms"));
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
        self.check_ttl(ttl)?;
        let mut keys: Vec<String> = resources.iter().map(|r| (*r).to_owned()).collect();
        keys.sort();
        keys.dedup();
        let keys: Arc<[String]> = keys.into();

        let span = tracing::info_span!(
            "fencelock.acquire",
            resource = %keys[0],
            resources = keys.len(),
            ttl_ms = ttl.as_millis() as u64,
            attempts = tracing::field::Empty,
        );
        async move {
            let mut turn = LocalTurn::wait(self, &keys, policy).await?;
            let mut baton = turn.take_baton().await;
            let mut attempt = 0u32;
            loop {
                let from = baton.take();
                let handing_off = from.is_some();
                if !handing_off {
                    attempt += 1;
                }
                match self.round(&keys, ttl, attempt, from.as_ref()).await {
                    Ok(granted) => {
                        tracing::Span::current().record("attempts", attempt);
                        return Ok(LockGuard::new(self.clone(), keys, ttl, granted, turn));
                    }
                    // The baton had expired; both values are released, so go from scratch.
                    Err(_) if handing_off => {}
                    Err(e) if e.is_retryable() && attempt <= policy.retries() => {
                        // Jitter needs no CSPRNG; a fresh SmallRng per wait keeps the future Send.
                        let wait = policy.next_delay(&mut SmallRng::from_os_rng());
                        tracing::debug!(attempt, error = %e, wait_ms = wait.as_millis() as u64, "acquire round failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        tracing::Span::current().record("attempts", attempt);
                        return Err(e);
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One acquire round on all nodes in parallel, decided as soon as it is certain. With
    /// `from`, the round swaps a baton's value for a fresh one instead of setting free keys.
    async fn round(
        &self,
        keys: &Arc<[String]>,
        ttl: Duration,
        attempt: u32,
        from: Option<&Baton>,
    ) -> Result<Granted, Error> {
        let previous: &[Arc<str>] = from.map_or(&[], |b| &b.values);
        let mut values: Vec<Arc<str>> = Vec::with_capacity(previous.len() + 1);
        values.push(new_value().into());
        values.extend_from_slice(previous);
        let start = Instant::now();
        let valid_until = start + ttl - self.drift(ttl);
        let ttl_ms = ttl.as_millis() as u64;
        let mut cleanup = PendingCleanup {
            client: self,
            keys,
            values: &values,
            armed: true,
        };
        // ACQUIRE takes [value, ttl]; HANDOFF takes [value, ttl, previous values...].
        let value: &str = &values[0];
        let mut args: Vec<&dyn ToRedisArgsDyn> = vec![&value, &ttl_ms];
        let previous_strs: Vec<&str> = previous.iter().map(|v| &**v).collect();
        args.extend(previous_strs.iter().map(|v| v as &dyn ToRedisArgsDyn));
        let script = if previous.is_empty() {
            &*scripts::ACQUIRE
        } else {
            &*scripts::HANDOFF
        };

        let deadline = self.round_deadline(start, valid_until);
        // Replies still in flight when the round is decided are dropped; a SET that lands
        // late is removed by the release below or by the guard's release, which go to every
        // node and wait for all of them.
        let (tally, failures) = self
            .broadcast("acquire", script, keys, &args, deadline, true)
            .await;

        let elapsed = start.elapsed();
        tracing::debug!(
            attempt,
            granted = tally.ok,
            held = tally.refused,
            failed = tally.failed,
            quorum_margin = tally.margin(),
            elapsed_us = elapsed.as_micros() as u64,
            "acquire round"
        );
        let error = match tally.decision() {
            Decision::Reached if Instant::now() < valid_until => {
                cleanup.armed = false;
                return Ok(Granted {
                    values: values.clone(),
                    valid_until,
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
        self.release_all(keys, &values).await;
        cleanup.armed = false;
        Err(error)
    }

    /// When a round started at `start` gives up on the nodes that have not answered: after
    /// the node timeout, but never past the lock's validity.
    pub(crate) fn round_deadline(&self, start: Instant, valid_until: Instant) -> Instant {
        valid_until.min(start + self.inner.node_timeout)
    }

    /// Runs `script` on every node at once and counts the replies: a positive integer is
    /// a success, zero a refusal. One deadline bounds the whole round (a timer per node
    /// costs more than the round itself on a fast network); nodes that have not answered
    /// by then count as timed out. With `until_decided`, returns as soon as the tally is
    /// decided, dropping the replies still in flight.
    pub(crate) async fn broadcast(
        &self,
        operation: &'static str,
        script: &Script,
        keys: &[String],
        args: &[&dyn ToRedisArgsDyn],
        deadline: Instant,
        until_decided: bool,
    ) -> (Tally, Vec<NodeFailure>) {
        let start = Instant::now();
        let nodes = &self.inner.nodes;
        let mut tally = Tally::new(nodes.len());
        let mut failures = Vec::new();
        let mut answered = vec![false; nodes.len()];
        let mut replies: FuturesUnordered<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| async move { (i, node.eval::<i64>(script, keys, args).await) })
            .collect();
        let mut expiry = pin!(tokio::time::sleep_until(deadline.into()));
        loop {
            match select(replies.next(), expiry.as_mut()).await {
                Either::Left((Some((i, reply)), _)) => {
                    answered[i] = true;
                    let outcome = match reply {
                        Ok(n) if n > 0 => {
                            tally.ok += 1;
                            "ok"
                        }
                        Ok(_) => {
                            tally.refused += 1;
                            "refused"
                        }
                        Err(failure) => {
                            tally.failed += 1;
                            failures.push(failure);
                            "failed"
                        }
                    };
                    tracing::trace!(
                        operation,
                        node = nodes[i].addr(),
                        outcome,
                        latency_us = start.elapsed().as_micros() as u64,
                        "node reply"
                    );
                    if until_decided && tally.decision() != Decision::Pending {
                        break;
                    }
                }
                Either::Left((None, _)) => break,
                Either::Right(((), _)) => {
                    for (node, _) in nodes.iter().zip(&answered).filter(|(_, a)| !**a) {
                        tally.failed += 1;
                        failures.push(NodeFailure::Timeout {
                            node: node.addr().to_owned(),
                            after: deadline.saturating_duration_since(start),
                        });
                    }
                    break;
                }
            }
        }
        (tally, failures)
    }

    /// Compare-and-delete on every node, in parallel, bounded by the node timeout.
    ///
    /// Waits for every node rather than a quorum: a command handed to a connection is not
    /// yet written to its socket, and a process that exits right after `release` (a CLI,
    /// a short job) would otherwise leave keys behind until their TTL.
    pub(crate) async fn release_all(&self, keys: &[String], values: &[Arc<str>]) -> ReleaseOutcome {
        let values: Vec<&str> = values.iter().map(|v| &**v).collect();
        let args: Vec<&dyn ToRedisArgsDyn> =
            values.iter().map(|v| v as &dyn ToRedisArgsDyn).collect();
        let deadline = Instant::now() + self.inner.node_timeout;
        let (tally, failures) = self
            .broadcast("release", &scripts::RELEASE, keys, &args, deadline, false)
            .await;
        ReleaseOutcome {
            deleted: tally.ok,
            failures,
        }
    }

    /// Compare-and-PEXPIRE on every node, decided at quorum, bounded by the node timeout
    /// and the current validity. Never deletes anything.
    pub(crate) async fn extend_all(
        &self,
        keys: &[String],
        value: &str,
        ttl: Duration,
        valid_until: Instant,
    ) -> (Tally, Vec<NodeFailure>) {
        let ttl_ms = ttl.as_millis() as u64;
        let deadline = self.round_deadline(Instant::now(), valid_until);
        self.broadcast(
            "extend",
            &scripts::EXTEND,
            keys,
            &[&value, &ttl_ms],
            deadline,
            true,
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
                    let outcome = client.release_all(&keys, &values).await;
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

/// 128 bits from the operating system's CSPRNG, hex-encoded: unique per acquisition and
/// opaque, like node-redlock's and redsync's values.
fn new_value() -> String {
    let bits: u128 = OsRng
        .try_next_u64()
        .and_then(|hi| Ok((u128::from(hi) << 64) | u128::from(OsRng.try_next_u64()?)))
        .expect("the operating system's random number generator failed");
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
}
