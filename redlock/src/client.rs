//! The public client: its settings and nodes behind one handle, the lock calls, and the
//! retry loop around the acquisition rounds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::clock;
use crate::error::Error;
use crate::guard::LockGuard;
use crate::local::LocalTurn;
use crate::node::{Node, NodeHealth};
use crate::retry::RetryPolicy;
use crate::scripts;
use crate::shared::Shared;

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
    inner: Arc<Shared>,
}

impl fmt::Debug for Redlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redlock")
            .field("nodes", &self.inner.fanout.nodes())
            .field("quorum", &self.inner.quorum())
            .field("node_timeout", &self.inner.fanout.node_timeout())
            .field("drift_factor", &self.inner.drift_factor)
            .field("retry", &self.inner.retry)
            .field("fencing", &self.inner.fencing)
            .field("quarantine", &self.inner.quarantine)
            .finish()
    }
}

impl Redlock {
    pub(crate) fn from_shared(inner: Arc<Shared>) -> Self {
        Redlock { inner }
    }

    /// Whether acquisitions return fencing tokens.
    pub fn fencing(&self) -> bool {
        self.inner.fencing
    }

    /// How many nodes must agree: `n / 2 + 1`.
    pub fn quorum(&self) -> usize {
        self.inner.quorum()
    }

    /// The nodes' addresses (`host:port`, without credentials), in configuration order.
    pub fn nodes(&self) -> Vec<&str> {
        self.inner.fanout.nodes().iter().map(Node::addr).collect()
    }

    /// Each node's health, in configuration order: whether it is up, and how often it was
    /// marked down and up again.
    ///
    /// A node that refuses a connection, or leaves two rounds in a row without an answer,
    /// is marked down: its calls fail at once (they count as that node's failure in every
    /// quorum) instead of costing each call a node timeout, and a background probe sends
    /// it a `PING`, backing off from 50 ms to 1 s, until it answers and is marked up. A
    /// node that answers late is not down. Each transition is logged once.
    pub fn node_health(&self) -> Vec<NodeHealth> {
        self.inner.fanout.nodes().iter().map(Node::health).collect()
    }

    /// The retry policy `lock` uses.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry
    }

    /// The clock drift allowed for a lock of `ttl`: `ttl * drift_factor + 2 ms`.
    pub fn drift(&self, ttl: Duration) -> Duration {
        self.inner.drift(ttl)
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
        self.inner.check_ttl(ttl)?;
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
            let mut turn = LocalTurn::wait(&self.inner, &keys, policy).await?;
            let mut baton = turn.take_baton().await;
            if let Some(granted) = baton.as_ref().and_then(|b| self.inner.pass_on(b, ttl)) {
                tracing::Span::current().record("attempts", 0);
                return Ok(LockGuard::new(self.inner.clone(), keys, ttl, granted, Some(turn)));
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
                match self.inner.round(&keys, ttl, attempt, from.as_ref(), &mut turn).await {
                    Ok(granted) => {
                        tracing::Span::current().record("attempts", attempt);
                        return Ok(LockGuard::new(self.inner.clone(), keys, ttl, granted, turn));
                    }
                    // The baton had expired; both values are released, so go from scratch.
                    Err(_) if handing_off => {}
                    // Nodes came up empty (or the cluster is new): seed them and go again at
                    // once, without spending an attempt.
                    Err((_, true)) if !seeded_once && self.inner.seed_nodes().await => {
                        seeded_once = true;
                        attempt -= 1;
                    }
                    Err((e, _)) if e.is_retryable() && attempt <= policy.retries() => {
                        let wait = self.inner.retry_delay(policy);
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(client.inner.check_ttl(Duration::from_millis(2)).is_err());
        assert!(client.inner.check_ttl(Duration::ZERO).is_err());
        assert!(client.inner.check_ttl(Duration::from_millis(3)).is_ok());
        let e = client
            .inner
            .check_ttl(Duration::from_millis(2))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid `ttl`: 2 ms leaves no validity after a clock drift allowance of 2020 us"
        );
    }
}
