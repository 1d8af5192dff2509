//! One lock node as the layers above see it: its address, its driver's queue (or a model
//! node), and the calls it takes. The driver itself is in `driver`, its connection in `link`.

mod driver;
mod health;
mod link;
mod reads;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::{AsyncConnectionConfig, ErrorKind, IntoConnectionInfo, RedisError, Value};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, NodeFailure};
use crate::ops::{NodePolicy, Op, Outcome};

use driver::{Call, DriverProbe, Queued, ReplyState, drive, driver_gone};
pub(crate) use driver::{LateGrants, Payload, Reply};
use health::Health;
pub use health::NodeHealth;
use link::Link;

/// The most calls that may wait for a node's driver. A node that stops answering holds
/// up its driver until the driver's reply grace; meanwhile further calls fail at once, as if the
/// node were down, rather than pile up in memory.
const MAX_BACKLOG: usize = 16_384;

/// A lock node. All tasks of a process share its one multiplexed connection and its one
/// driver, which is what lets 64 concurrent lockers cost one command per node rather than
/// 64 commands or 64 connections.
#[derive(Clone)]
pub(crate) struct Node {
    /// `host:port` for logs and errors; never contains credentials.
    addr: Arc<str>,
    /// The setting that named it (`nodes[i]`), for configuration errors.
    field: &'static str,
    backend: Backend,
    /// Up or down: a node that is down fails its calls at once (see `health`).
    health: Arc<Health>,
}

#[derive(Clone)]
enum Backend {
    Redis {
        /// The node's driver: every call goes through it, in the order of the calls.
        ops: mpsc::UnboundedSender<Queued>,
        /// Calls queued for the driver and not yet taken: bounded by [`MAX_BACKLOG`].
        backlog: Arc<AtomicUsize>,
    },
    /// An in-process model of a node, for the deterministic simulation.
    #[cfg(feature = "sim")]
    Sim(Arc<crate::sim::SimConn>),
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// What makes two URLs the same node: address and database. Used to reject duplicates,
/// which would let one machine cast two votes.
pub(crate) type NodeIdentity = (String, i64);

impl Node {
    /// Parses `url` and starts the node's driver on the current tokio runtime. Nothing is
    /// sent until the first call, so an unreachable node does not stop the client from
    /// being built; every connection the driver opens is checked and verified (see
    /// `verify.lua`) before anything else is sent on it.
    pub(crate) fn new(
        field: &'static str,
        url: &str,
        connect_timeout: Duration,
        policy: NodePolicy,
    ) -> Result<(Node, NodeIdentity), Error> {
        let invalid =
            |e: RedisError| Error::config(field, format!("cannot use `{}`: {e}", redact(url)));
        // A lock round is a handful of small writes that each wait for their reply: no
        // Nagle delay on any of them (redis-rs leaves it on by default).
        let info = url
            .into_connection_info()
            .map_err(invalid)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).map_err(invalid)?;
        let info = client.get_connection_info();
        let addr: Arc<str> = info.addr().to_string().into();
        let identity = (addr.to_string(), info.redis_settings().db());
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            // Every round carries its own deadline; a second timer per command would only
            // cost time.
            .set_response_timeout(None);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::config(field, "the client must be built inside a tokio runtime"))?;
        let (ops, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::default());
        let link = Link::new(
            addr.clone(),
            client,
            config,
            connect_timeout,
            policy,
            health.clone(),
            Box::new({
                let (addr, health) = (addr.clone(), health.clone());
                let probe = DriverProbe::new(&ops, &backlog);
                move || health::spawn_probe(addr.clone(), health.clone(), probe.clone())
            }),
        );
        runtime.spawn(drive(link, rx, ops.downgrade(), backlog.clone()));
        Ok((
            Node {
                addr,
                field,
                backend: Backend::Redis { ops, backlog },
                health,
            },
            identity,
        ))
    }

    #[cfg(feature = "sim")]
    pub(crate) fn simulated(conn: crate::sim::SimConn) -> Node {
        Node {
            addr: conn.name().into(),
            field: "nodes",
            backend: Backend::Sim(Arc::new(conn)),
            health: Arc::default(),
        }
    }

    /// Whether calls whose replies a round stops waiting for must still be polled to
    /// completion (and their late grants taken back) by the caller. A Redis node's driver
    /// does both by itself.
    #[cfg(feature = "sim")]
    pub(crate) fn needs_drain(&self) -> bool {
        match &self.backend {
            Backend::Redis { .. } => false,
            #[cfg(feature = "sim")]
            Backend::Sim(_) => true,
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The node's health now.
    pub(crate) fn health(&self) -> NodeHealth {
        self.health.report(&self.addr)
    }

    /// A round gave up waiting for this node: enough of those in a row mark it down.
    pub(crate) fn missed(&self) {
        #[cfg(feature = "sim")]
        if let Backend::Sim(sim) = &self.backend
            && sim.planted(crate::sim::Bug::NodeNeverDown)
        {
            return;
        }
        if self.health.missed() {
            tracing::warn!(node = %self.addr, misses = health::DOWN_AFTER_MISSES, "lock node left rounds in a row unanswered; marked down: its calls fail at once until it answers a probe");
            self.probe();
        }
    }

    /// Starts the probe that marks the node up once it answers.
    fn probe(&self) {
        match &self.backend {
            Backend::Redis { ops, backlog } => health::spawn_probe(
                self.addr.clone(),
                self.health.clone(),
                DriverProbe::new(ops, backlog),
            ),
            #[cfg(feature = "sim")]
            Backend::Sim(sim) => health::spawn_probe(
                self.addr.clone(),
                self.health.clone(),
                SimProbe(Arc::downgrade(sim)),
            ),
        }
    }

    fn down(&self) -> NodeFailure {
        NodeFailure::Down {
            node: self.addr.to_string(),
        }
    }

    /// Runs `op`; every script returns an integer, which `op` reads. The caller bounds the
    /// time it may take.
    ///
    /// The call is queued on the node's driver before this returns, and runs whether or
    /// not the returned future is polled or dropped: calls to a node run in the order they
    /// were made, so a release can never overtake the acquisition it undoes. With `late`,
    /// a grant that arrives once that acquisition is over is released by the driver, and a
    /// call still queued by then is not sent at all.
    pub(crate) fn eval(&self, op: Op, late: Option<&LateGrants>) -> Reply {
        // A model node's call runs in its own task, so that it too runs whether or not
        // its reply is awaited. (A round's calls are polled by the round and drained after
        // it instead, so that each starts exactly when its round does.)
        #[cfg(feature = "sim")]
        if let Backend::Sim(sim) = &self.backend {
            if self.health.is_down() {
                return Reply {
                    node: self.addr.clone(),
                    state: ReplyState::Down,
                };
            }
            let (tx, rx) = oneshot::channel();
            let sim = sim.clone();
            tokio::spawn(async move {
                let reply = sim.eval(&op).await;
                let _ = tx.send(reply.map(Value::Int));
            });
            return Reply {
                node: self.addr.clone(),
                state: ReplyState::Queued(rx),
            };
        }
        self.eval_shared(&Payload::new(op), late)
    }

    /// [`eval`](Self::eval) with its reply read by `op`; queued as the call is made.
    pub(crate) fn run(&self, op: Op) -> impl Future<Output = Result<Outcome, NodeFailure>> + use<> {
        let reader = op.clone();
        let reply = self.eval(op, None);
        let node = self.addr.clone();
        async move {
            let reply = reply.await?;
            reader.decode(reply).map_err(|error| NodeFailure::Redis {
                node: node.to_string(),
                error,
            })
        }
    }

    /// [`eval`](Self::eval) of a call encoded once for every node of a round.
    ///
    /// A node that is down is not asked: the reply is its failure, at once. A release is
    /// still queued for it, unawaited, so that a node that comes back (a paused one, or
    /// one whose network healed) drops our keys before their TTL.
    pub(crate) fn eval_shared(&self, payload: &Arc<Payload>, late: Option<&LateGrants>) -> Reply {
        if self.health.is_down() {
            if matches!(payload.op, Op::Release(_))
                && let Backend::Redis { .. } = &self.backend
            {
                let _ = self.enqueue(Call::Script(payload.clone()), None);
            }
            return Reply {
                node: self.addr.clone(),
                state: ReplyState::Down,
            };
        }
        let state = match &self.backend {
            Backend::Redis { .. } => match self.enqueue(Call::Script(payload.clone()), late) {
                Ok(rx) => ReplyState::Queued(rx),
                Err(e) => ReplyState::Refused(Some(e)),
            },
            #[cfg(feature = "sim")]
            Backend::Sim(sim) => {
                let _ = late;
                let (sim, payload) = (sim.clone(), payload.clone());
                // Starts when first polled, like the model node's own future.
                ReplyState::Sim(Box::pin(async move { sim.eval(&payload.op).await }))
            }
        };
        Reply {
            node: self.addr.clone(),
            state,
        }
    }

    /// Queues `call` on the node's driver.
    fn enqueue(
        &self,
        call: Call,
        late: Option<&LateGrants>,
    ) -> Result<oneshot::Receiver<Result<Value, RedisError>>, RedisError> {
        let (ops, backlog) = match &self.backend {
            Backend::Redis { ops, backlog } => (ops, backlog),
            #[cfg(feature = "sim")]
            Backend::Sim(_) => {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "a model node has no driver",
                )));
            }
        };
        if backlog.fetch_add(1, Ordering::Relaxed) >= MAX_BACKLOG {
            backlog.fetch_sub(1, Ordering::Relaxed);
            return Err(RedisError::from((
                ErrorKind::Io,
                "too many calls waiting for this node (it has stopped answering)",
            )));
        }
        let (reply, rx) = oneshot::channel();
        let op = Queued {
            call,
            reply,
            late: late.cloned(),
        };
        match ops.send(op) {
            Ok(()) => Ok(rx),
            Err(_) => {
                backlog.fetch_sub(1, Ordering::Relaxed);
                Err(driver_gone())
            }
        }
    }

    fn failure(&self, error: RedisError) -> NodeFailure {
        NodeFailure::Redis {
            node: self.addr.to_string(),
            error,
        }
    }

    /// Opens, checks and verifies the connection now rather than on the first lock. A
    /// node whose configuration is refused (see `NodePolicy`) is a configuration error;
    /// any other failure is the node's, to retry in the background.
    pub(crate) async fn warm_up(&self, timeout: Duration) -> Result<(), Error> {
        #[cfg(feature = "sim")]
        if self.needs_drain() {
            // A model node has no connection to open.
            return Ok(());
        }
        let rx = self
            .enqueue(Call::Connect, None)
            .map_err(|e| Error::Redis(self.failure(e)))?;
        let outcome = self
            .bounded(timeout, async {
                rx.await.unwrap_or_else(|_| Err(driver_gone())).map(drop)
            })
            .await;
        match outcome {
            Err(NodeFailure::Redis { error, .. })
                if error.kind() == ErrorKind::InvalidClientConfig =>
            {
                Err(Error::config(
                    self.field,
                    format!(
                        "lock node {} is refused: {}",
                        self.addr,
                        error.detail().unwrap_or("misconfigured")
                    ),
                ))
            }
            Err(failure) => Err(Error::Redis(failure)),
            Ok(()) => Ok(()),
        }
    }
}

/// A model node's side of a health probe.
#[cfg(feature = "sim")]
struct SimProbe(std::sync::Weak<crate::sim::SimConn>);

#[cfg(feature = "sim")]
impl health::Probe for SimProbe {
    async fn ping(&self) -> Result<(), RedisError> {
        if let Some(conn) = self.0.upgrade() {
            conn.ping().await;
        }
        Ok(())
    }

    fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// `url` with any password replaced, for error messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
