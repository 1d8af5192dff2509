//! Building a [`Redlock`] client: every setting has a documented default, and `build()`
//! rejects what cannot work before any lock is taken.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::client::Redlock;
use crate::error::Error;
use crate::fanout::Fanout;
use crate::node::Node;
use crate::ops::NodePolicy;
use crate::quorum::quorum;
use crate::retry::RetryPolicy;
use crate::shared::{MAX_TTL, Shared};

/// The default per-node timeout: 50 ms.
///
/// A healthy node in the same datacenter answers in well under a millisecond, so 50 ms only
/// ever fires for a node that is down, paused or partitioned, and it is small next to any
/// sensible TTL (seconds). Raise it for nodes across regions.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(50);

/// The default clock drift factor: 0.01 (1% of the TTL, plus 2 ms), as in the Redlock spec.
pub const DEFAULT_DRIFT_FACTOR: f64 = 0.01;

/// The default connect timeout: 1 s. Reconnects happen in the background.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default restart quarantine: 30 s. See [`RedlockBuilder::restart_quarantine`].
pub const DEFAULT_RESTART_QUARANTINE: Duration = Duration::from_secs(30);

/// The default fence window: 5 minutes. See [`RedlockBuilder::fence_window`].
pub const DEFAULT_FENCE_WINDOW: Duration = Duration::from_secs(300);

/// The longest fence window: 30 days. A longer one would keep nodes' memory growing for
/// as long, which is what the window is there to prevent.
pub const MAX_FENCE_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// The default bound on in-process hand-offs in a row: 8. See
/// [`RedlockBuilder::max_local_handoffs`].
pub const DEFAULT_MAX_LOCAL_HANDOFFS: usize = 8;

impl Redlock {
    /// Starts configuring a client; see [`RedlockBuilder`] for the settings and defaults.
    pub fn builder() -> RedlockBuilder {
        RedlockBuilder::default()
    }
}

/// Configures and builds a [`Redlock`] client.
///
/// | setting | default |
/// |---|---|
/// | [`nodes`](Self::nodes) | none: at least one is required (3 or 5 to survive failures) |
/// | [`node_timeout`](Self::node_timeout) | [`DEFAULT_NODE_TIMEOUT`], 50 ms |
/// | [`drift_factor`](Self::drift_factor) | [`DEFAULT_DRIFT_FACTOR`], 0.01 |
/// | [`retry`](Self::retry) | [`RetryPolicy::default`]: 10 retries, 200 ms + up to 200 ms jitter |
/// | [`connect_timeout`](Self::connect_timeout) | [`DEFAULT_CONNECT_TIMEOUT`], 1 s |
/// | [`max_local_handoffs`](Self::max_local_handoffs) | [`DEFAULT_MAX_LOCAL_HANDOFFS`], 8 |
/// | [`fencing`](Self::fencing) | off |
/// | [`fence_window`](Self::fence_window) | [`DEFAULT_FENCE_WINDOW`], 5 min |
/// | [`restart_quarantine`](Self::restart_quarantine) | [`DEFAULT_RESTART_QUARANTINE`], 30 s |
/// | [`allow_eviction`](Self::allow_eviction) | false: nodes that may evict keys are refused |
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build()` is awaited"]
pub struct RedlockBuilder {
    nodes: Vec<String>,
    node_timeout: Duration,
    drift_factor: f64,
    retry: RetryPolicy,
    connect_timeout: Duration,
    max_local_handoffs: usize,
    fencing: bool,
    fence_window: Duration,
    quarantine: Duration,
    allow_eviction: bool,
}

impl Default for RedlockBuilder {
    fn default() -> Self {
        RedlockBuilder {
            nodes: Vec::new(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
            drift_factor: DEFAULT_DRIFT_FACTOR,
            retry: RetryPolicy::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_local_handoffs: DEFAULT_MAX_LOCAL_HANDOFFS,
            fencing: false,
            fence_window: DEFAULT_FENCE_WINDOW,
            quarantine: DEFAULT_RESTART_QUARANTINE,
            allow_eviction: false,
        }
    }
}

impl RedlockBuilder {
    /// Adds lock nodes by URL: `redis://host:port[/db]`, `redis://user:pass@host` for AUTH,
    /// `rediss://` for TLS (with the `tls` feature). Each must be an independent master.
    pub fn nodes<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Adds one lock node by URL; see [`nodes`](Self::nodes).
    pub fn node(mut self, url: impl Into<String>) -> Self {
        self.nodes.push(url.into());
        self
    }

    /// The longest one node may take to answer one command (default 50 ms). Each command
    /// also gives up when the lock's remaining validity runs out, whichever comes first.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// The clock drift allowance as a fraction of the TTL (default 0.01). The validity of a
    /// lock is `ttl - elapsed - (ttl * drift_factor + 2 ms)`. Must be in `[0, 0.5)`.
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// How [`Redlock::lock`] retries (default: 10 retries, 200 ms + up to 200 ms jitter).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long opening a connection to a node may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times in a row a lock may pass directly from one task of this process to
    /// another that waits for it (default 8; 0 turns hand-offs off).
    ///
    /// A hand-off replaces a release followed by an acquire, and the keys are never free in
    /// between. While the lock's validity is at least what a fresh round could give (the
    /// TTL less drift and the node timeout, and at least half of it), the next task takes
    /// the lock over as it is: the same value and deadline, with no Redis round at all.
    /// With fencing it gets the next of the tokens that the lock's last round reserved
    /// (this many, at most 64): every later acquisition's token outranks them. Otherwise
    /// one round swaps the value for a fresh one and renews the TTL (and, with fencing,
    /// the reserved tokens). After this many hand-offs in a row the lock is released for
    /// real, so that other processes get their chance at it.
    pub fn max_local_handoffs(mut self, n: usize) -> Self {
        self.max_local_handoffs = n;
        self
    }

    /// Whether every acquisition returns a fencing token (default off): a `u64` strictly
    /// greater than the token of every earlier holder of the same resources, for the
    /// resource you protect to check (see `docs/fencing.md`).
    ///
    /// The price: each node keeps one counter per resource locked within the
    /// [`fence_window`](Self::fence_window), plus two keys of its own; the acquire script
    /// reads and bumps the counter; and when the quorum's answers disagree (after a node
    /// missed acquisitions, or for a resource whose counters have expired), one more
    /// parallel round writes the token back before `lock` returns. A resource locked again
    /// within the window, on nodes that saw its last acquisition, costs no extra round.
    pub fn fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
    }

    /// How long a node keeps a resource's fence counter after its last acquisition (default
    /// [`DEFAULT_FENCE_WINDOW`], 5 minutes). Must be between 1 ms and
    /// [`MAX_FENCE_WINDOW`].
    ///
    /// The window bounds the nodes' memory (one small key per resource locked within it)
    /// and never the tokens' order: a resource whose counter expired gets a token above the
    /// node's high-water mark, larger than every token the node stored. It only decides
    /// the price: a resource locked again within the window costs no extra round, one
    /// locked after it usually costs one (see `docs/fencing.md`).
    ///
    /// While clients of a version that keeps counters forever use the same nodes (a
    /// rolling upgrade), give the new clients a window longer than the upgrade takes: an
    /// older client reads a counter that expired as 0.
    pub fn fence_window(mut self, window: Duration) -> Self {
        self.fence_window = window;
        self
    }

    /// How long a node that restarted without all of its data stays out of every quorum
    /// (default 30 s): a lock the node granted before it lost its data has expired by then
    /// everywhere. A lock or extension with a TTL longer than this is refused with a
    /// [`Config`](crate::ErrorKind::Config) error. Must be between 1 ms and [`MAX_TTL`].
    ///
    /// The nodes record the quarantine of the client that first finds them restarted, so
    /// every client of the same nodes must use a quarantine at least as long as the
    /// longest TTL *any* of them uses: give them all the same setting. Nodes whose
    /// persistence cannot lose an acknowledged write (AOF with `appendfsync always`) keep
    /// their state across a restart and skip the quarantine.
    pub fn restart_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// Whether to use lock nodes whose `maxmemory-policy` may evict keys (default false).
    ///
    /// An evicting node can drop a lock key, a fence counter or its own restart state while
    /// it runs, with no restart to detect: that can let a second holder in, or repeat a
    /// token. By default such a node is refused: `build()` fails with a
    /// [`Config`](crate::ErrorKind::Config) error naming it and the setting, and a node that
    /// turns out to be so configured later fails every call. Set `maxmemory-policy
    /// noeviction` on the nodes instead; turn this on only if the nodes can never reach
    /// their memory limit.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Validates the settings, sets up one connection per node and opens them in parallel,
    /// then seeds nodes that came up empty (or initialises a new cluster).
    ///
    /// Nodes that cannot be reached now are logged and retried in the background: a client
    /// with a minority of nodes down still locks. Only settings that can never work fail:
    /// no nodes, a URL that does not parse, the same node twice, a drift factor outside
    /// `[0, 0.5)`, a zero timeout, a quarantine outside `[1 ms, MAX_TTL]`, a fence window
    /// outside `[1 ms, MAX_FENCE_WINDOW]`, and a reachable node whose `maxmemory-policy`
    /// may evict keys (see [`allow_eviction`](Self::allow_eviction)). An even number of nodes is allowed with a warning, since
    /// it tolerates no more failures than one node fewer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config), naming the bad setting.
    pub async fn build(self) -> Result<Redlock, Error> {
        let nodes = self.real_nodes()?;
        #[cfg(feature = "sim")]
        let sim = crate::sim::ClientSim::default();
        #[cfg(not(feature = "sim"))]
        let sim = ();
        self.finish(nodes, sim).await
    }

    /// Builds a client on the real nodes with a simulation's switches (feature `sim`), for
    /// tests that need them against real Redis.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    #[cfg(feature = "sim")]
    pub async fn build_with(self, options: crate::sim::SimOptions) -> Result<Redlock, Error> {
        let nodes = self.real_nodes()?;
        let sim = crate::sim::ClientSim::new(crate::sim::Planted::default(), options);
        self.finish(nodes, sim).await
    }

    /// The configured nodes, each with its driver started.
    fn real_nodes(&self) -> Result<Vec<Node>, Error> {
        if self.nodes.is_empty() {
            return Err(Error::config(
                "nodes",
                "no nodes given; a lock needs at least one Redis node (3 or 5 to survive failures)",
            ));
        }
        self.check_settings()?;
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut seen: HashMap<_, usize> = HashMap::new();
        for (i, url) in self.nodes.iter().enumerate() {
            let field = node_field(i);
            let (node, identity) = Node::new(field, url, self.connect_timeout, self.policy())?;
            if let Some(first) = seen.insert(identity, i) {
                return Err(Error::config(
                    field,
                    format!(
                        "{} is the same node as nodes[{first}]; one node must not vote twice",
                        node.addr()
                    ),
                ));
            }
            nodes.push(node);
        }
        Ok(nodes)
    }

    /// Builds a client on simulated nodes (feature `sim`), with the same settings and
    /// checks as [`build`](Self::build), for deterministic simulation tests.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build), for the settings.
    #[cfg(feature = "sim")]
    pub async fn build_simulated(self, cluster: &crate::sim::SimCluster) -> Result<Redlock, Error> {
        self.build_simulated_with(cluster, crate::sim::SimOptions::default())
            .await
    }

    /// [`build_simulated`](Self::build_simulated) with a simulation's switches.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build), for the settings.
    #[cfg(feature = "sim")]
    pub async fn build_simulated_with(
        self,
        cluster: &crate::sim::SimCluster,
        options: crate::sim::SimOptions,
    ) -> Result<Redlock, Error> {
        if cluster.is_empty() {
            return Err(Error::config("nodes", "the simulated cluster has no nodes"));
        }
        self.check_settings()?;
        let policy = self.policy();
        let nodes = cluster
            .shared()
            .iter()
            .map(|node| Node::simulated(crate::sim::SimConn::new(node.clone(), policy)))
            .collect();
        let sim = crate::sim::ClientSim::new(cluster.planted(), options);
        self.finish(nodes, sim).await
    }

    fn policy(&self) -> NodePolicy {
        NodePolicy {
            quarantine_ms: crate::clock::millis_ceil(self.quarantine),
            allow_eviction: self.allow_eviction,
        }
    }

    fn check_settings(&self) -> Result<(), Error> {
        if !(self.drift_factor >= 0.0 && self.drift_factor < 0.5) {
            return Err(Error::config(
                "drift_factor",
                format!("{} is outside [0, 0.5)", self.drift_factor),
            ));
        }
        if self.node_timeout.is_zero() {
            return Err(Error::config("node_timeout", "must be greater than zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config(
                "connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.quarantine < Duration::from_millis(1) || self.quarantine > MAX_TTL {
            return Err(Error::config(
                "restart_quarantine",
                format!(
                    "{:?} is outside [1ms, {MAX_TTL:?}]; it must cover the longest TTL any client uses",
                    self.quarantine
                ),
            ));
        }
        if self.fence_window < Duration::from_millis(1) || self.fence_window > MAX_FENCE_WINDOW {
            return Err(Error::config(
                "fence_window",
                format!(
                    "{:?} is outside [1ms, {MAX_FENCE_WINDOW:?}]",
                    self.fence_window
                ),
            ));
        }
        Ok(())
    }

    async fn finish(
        self,
        nodes: Vec<Node>,
        #[cfg(feature = "sim")] sim: crate::sim::ClientSim,
        #[cfg(not(feature = "sim"))] _sim: (),
    ) -> Result<Redlock, Error> {
        let n = nodes.len();
        if n.is_multiple_of(2) {
            tracing::warn!(
                nodes = n,
                quorum = quorum(n),
                "an even number of lock nodes tolerates no more failures than {} nodes",
                n - 1
            );
        }

        let results = join_all(nodes.iter().map(|n| n.warm_up(self.connect_timeout))).await;
        let mut unreachable = Vec::new();
        for error in results.into_iter().filter_map(Result::err) {
            if let Error::Config(_) = error {
                return Err(error);
            }
            unreachable.push(error.to_string());
        }
        // Each node's driver logs its own node going down; a client none of whose nodes
        // answers is worth one line more, since nothing can be locked until one does.
        if unreachable.len() == nodes.len() {
            tracing::error!(
                nodes = nodes.len(),
                errors = %unreachable.join("; "),
                "no lock node answered; locks fail until a quorum does"
            );
        }

        #[allow(unused_mut)]
        let mut inner = Shared::new(
            Fanout::new(nodes, self.node_timeout),
            self.drift_factor,
            self.retry,
            self.max_local_handoffs,
            self.fencing,
            self.quarantine,
            self.fence_window,
        );
        #[cfg(feature = "sim")]
        {
            inner.sim = sim;
        }
        // A new cluster is initialised here, and nodes that came up empty are seeded, so
        // that the first lock does not have to.
        inner.seed_nodes().await;
        Ok(Redlock::from_shared(Arc::new(inner)))
    }
}

/// `nodes[i]` as a `'static` field name for the first few nodes, which covers every real
/// deployment; beyond that the message still names the URL.
fn node_field(i: usize) -> &'static str {
    const FIELDS: [&str; 10] = [
        "nodes[0]", "nodes[1]", "nodes[2]", "nodes[3]", "nodes[4]", "nodes[5]", "nodes[6]",
        "nodes[7]", "nodes[8]", "nodes[9]",
    ];
    FIELDS.get(i).copied().unwrap_or("nodes")
}

#[cfg(test)]
mod tests;
