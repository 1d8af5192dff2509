//! One Redis node: the connection its driver opens, checks and reopens, and the driver that
//! sends it the lock scripts in batches.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind,
    ToRedisArgs, Value,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::client::LateGrants;
use crate::error::{Error, NodeFailure};
use crate::scripts;

/// The most operations one command to a node carries.
const MAX_BATCH: usize = 256;

/// The most calls that may wait for a node's driver. A node that stops answering holds
/// up its driver until [`REPLY_GRACE`]; meanwhile further calls fail at once, as if the
/// node were down, rather than pile up in memory.
const MAX_BACKLOG: usize = 16_384;

/// How long the driver waits for the reply to one command before failing its operations
/// and sending the next. The callers gave up long before (each round has its own deadline);
/// this only bounds what a node that stopped answering can hold up.
const REPLY_GRACE: Duration = Duration::from_secs(30);

/// After a failed connect, calls fail at once for this long before the next attempt, then
/// twice as long after each further failure, up to [`MAX_RECONNECT_BACKOFF`]: a node that
/// refuses connections costs its callers nothing, instead of a connect attempt each.
const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// What the driver of a node holds every connection to before using it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodePolicy {
    /// The quarantine a node found restarted with part of its data starts, in milliseconds.
    pub(crate) quarantine_ms: u64,
    /// Whether a node whose `maxmemory-policy` may evict keys is used anyway.
    pub(crate) allow_eviction: bool,
}

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
}

#[derive(Clone)]
enum Backend {
    Redis {
        /// The node's driver: every call goes through it, in the order of the calls.
        ops: mpsc::UnboundedSender<Op>,
        /// Calls queued for the driver and not yet taken: bounded by [`MAX_BACKLOG`].
        backlog: Arc<AtomicUsize>,
    },
    /// An in-process model of a node, for the deterministic simulation.
    #[cfg(feature = "sim")]
    Sim(Arc<crate::sim::SimConn>),
}

/// A script call, encoded once and shared by the nodes a round sends it to.
pub(crate) struct Payload {
    script: &'static Script,
    /// The script's number in [`scripts::all`].
    number: usize,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Payload {
    pub(crate) fn new(
        script: &'static Script,
        keys: &[String],
        args: &[&dyn ToRedisArgsDyn],
    ) -> Arc<Payload> {
        let mut encoded = Vec::with_capacity(args.len());
        for arg in args {
            arg.push_bytes(&mut encoded);
        }
        Arc::new(Payload {
            script,
            number: scripts::number(script),
            keys: keys.to_vec(),
            args: encoded,
        })
    }
}

impl Payload {
    /// The arguments as text, as a model node reads them.
    #[cfg(feature = "sim")]
    fn text_args(&self) -> Vec<String> {
        self.args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }
}

/// What a caller asks of a node's driver.
enum Call {
    /// One of the lock scripts; consecutive ones go out as one batch.
    Script(Arc<Payload>),
    /// A plain command (the seeding's reads), on its own.
    Command(redis::Cmd),
    /// Nothing but a verified connection: opened, checked and verified if there is none.
    Connect,
}

/// One call queued for a node's driver.
struct Op {
    call: Call,
    reply: oneshot::Sender<Result<Value, RedisError>>,
    /// For a call that can grant a lock: whose grant it is, so that a grant for an
    /// acquisition that is already over is taken back (or never sent).
    late: Option<LateGrants>,
}

impl Op {
    /// The acquisition this call could grant for is over: running it would only set a key
    /// to take back.
    fn moot(&self) -> bool {
        self.late
            .as_ref()
            .is_some_and(|late| late.over.load(Ordering::SeqCst))
    }
}

/// The reply of one script call to one node: a named `Unpin` future that borrows nothing,
/// so a round can keep its calls in a plain `Vec` and poll them in place, with no task
/// allocated per call.
pub(crate) struct Reply {
    node: Arc<str>,
    state: ReplyState,
}

enum ReplyState {
    /// Queued on the node's driver; the channel closes if the driver is gone.
    Queued(oneshot::Receiver<Result<Value, RedisError>>),
    /// Refused before it was queued (taken by the first poll).
    Refused(Option<RedisError>),
    #[cfg(feature = "sim")]
    Sim(std::pin::Pin<Box<dyn Future<Output = Result<i64, RedisError>> + Send>>),
}

impl Future for Reply {
    type Output = Result<i64, NodeFailure>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        let result = match &mut this.state {
            ReplyState::Queued(rx) => match std::pin::Pin::new(rx).poll(cx) {
                Poll::Ready(reply) => reply
                    .unwrap_or_else(|_| Err(driver_gone()))
                    .and_then(integer),
                Poll::Pending => return Poll::Pending,
            },
            ReplyState::Refused(error) => Err(error.take().unwrap_or_else(|| {
                RedisError::from((ErrorKind::Client, "a node reply was polled after it ended"))
            })),
            #[cfg(feature = "sim")]
            ReplyState::Sim(call) => match call.as_mut().poll(cx) {
                Poll::Ready(reply) => reply,
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready(result.map_err(|error| NodeFailure::Redis {
            node: this.node.to_string(),
            error,
        }))
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// What makes two URLs the same node: address and database. Used to reject duplicates,
/// which would let one machine cast two votes.
pub(crate) type NodeIdentity = (String, i64);

/// What a node's restart state says, as the seeding reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeState {
    /// Whether its fence counters were seeded in this life of its state.
    pub(crate) seeded: bool,
    /// The name of this life of its state; a seeding must carry it.
    pub(crate) nonce: Option<String>,
}

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
        let client = redis::Client::open(url)
            .map_err(|e| Error::config(field, format!("cannot use `{}`: {e}", redact(url))))?;
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
        let link = Link {
            addr: addr.clone(),
            client,
            config,
            connect_timeout,
            policy,
            conn: None,
            down: None,
            backoff: MIN_RECONNECT_BACKOFF,
            warned: false,
        };
        runtime.spawn(drive(link, rx, ops.downgrade(), backlog.clone()));
        Ok((
            Node {
                addr,
                field,
                backend: Backend::Redis { ops, backlog },
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
        }
    }

    /// Whether calls whose replies a round stops waiting for must still be polled to
    /// completion (and their late grants taken back) by the caller. A Redis node's driver
    /// does both by itself.
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

    /// Runs `script` with `keys` and `args`; every script returns an integer. The caller
    /// bounds the time it may take.
    ///
    /// The call is queued on the node's driver before this returns, and runs whether or
    /// not the returned future is polled or dropped: calls to a node run in the order they
    /// were made, so a release can never overtake the acquisition it undoes. With `late`,
    /// a grant that arrives once that acquisition is over is released by the driver, and a
    /// call still queued by then is not sent at all.
    pub(crate) fn eval(
        &self,
        script: &'static Script,
        keys: &[String],
        args: &[&dyn ToRedisArgsDyn],
        late: Option<&LateGrants>,
    ) -> Reply {
        let payload = Payload::new(script, keys, args);
        // A model node's call runs in its own task, so that it too runs whether or not
        // its reply is awaited. (A round's calls are polled by the round and drained after
        // it instead, so that each starts exactly when its round does.)
        #[cfg(feature = "sim")]
        if let Backend::Sim(sim) = &self.backend {
            let (tx, rx) = oneshot::channel();
            let (sim, script, keys) = (sim.clone(), payload.script, payload.keys.clone());
            let args = payload.text_args();
            tokio::spawn(async move {
                let reply = sim.eval(script, &keys, &args).await;
                let _ = tx.send(reply.map(Value::Int));
            });
            return Reply {
                node: self.addr.clone(),
                state: ReplyState::Queued(rx),
            };
        }
        self.eval_shared(&payload, late)
    }

    /// [`eval`](Self::eval) of a call encoded once for every node of a round.
    pub(crate) fn eval_shared(&self, payload: &Arc<Payload>, late: Option<&LateGrants>) -> Reply {
        let state = match &self.backend {
            Backend::Redis { .. } => match self.enqueue(Call::Script(payload.clone()), late) {
                Ok(rx) => ReplyState::Queued(rx),
                Err(e) => ReplyState::Refused(Some(e)),
            },
            #[cfg(feature = "sim")]
            Backend::Sim(sim) => {
                let _ = late;
                let (sim, script, keys) = (sim.clone(), payload.script, payload.keys.clone());
                let args = payload.text_args();
                // Starts when first polled, like the model node's own future.
                ReplyState::Sim(Box::pin(
                    async move { sim.eval(script, &keys, &args).await },
                ))
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
        let op = Op {
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

    /// The node's restart state, giving the node one first if it has none (so that there
    /// is a nonce for a seeding to carry).
    pub(crate) async fn restart_state(
        &self,
        quarantine_ms: u64,
        timeout: Duration,
    ) -> Result<NodeState, NodeFailure> {
        #[cfg(feature = "sim")]
        if let Backend::Sim(sim) = &self.backend {
            return self
                .bounded(timeout, async { Ok(sim.restart_state().await) })
                .await;
        }
        let nonce = crate::client::new_value();
        let init = self.eval(
            &scripts::INIT,
            &[scripts::NODE_KEY.to_owned()],
            &[&nonce, &quarantine_ms],
            None,
        );
        self.bounded(timeout, async {
            init.await.map_err(|f| match f {
                NodeFailure::Redis { error, .. } => error,
                other => RedisError::from((ErrorKind::Client, "init failed", other.to_string())),
            })
        })
        .await?;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(scripts::NODE_KEY).arg("seeded").arg("nonce");
        let (seeded, nonce): (Option<String>, Option<String>) = self.query(&cmd, timeout).await?;
        Ok(NodeState {
            seeded: seeded.as_deref() == Some("1"),
            nonce,
        })
    }

    /// Every fence counter on the node.
    pub(crate) async fn fence_counters(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(String, i64)>, NodeFailure> {
        #[cfg(feature = "sim")]
        if let Backend::Sim(sim) = &self.backend {
            return self
                .bounded(timeout, async { Ok(sim.fence_counters().await) })
                .await;
        }
        let pattern = format!("{}*", scripts::FENCE_PREFIX);
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = self.query(&scan, timeout).await?;
            if !keys.is_empty() {
                let mut mget = redis::cmd("MGET");
                mget.arg(&keys);
                let values: Vec<Option<i64>> = self.query(&mget, timeout).await?;
                out.extend(
                    keys.into_iter()
                        .zip(values)
                        .filter_map(|(k, v)| v.map(|v| (k, v))),
                );
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Runs one plain command through the driver, giving up after `timeout`.
    async fn query<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<T, NodeFailure> {
        let rx = self
            .enqueue(Call::Command(cmd.clone()), None)
            .map_err(|error| self.failure(error))?;
        self.bounded(timeout, async {
            let value = rx.await.unwrap_or_else(|_| Err(driver_gone()))?;
            Ok(T::from_redis_value(value)?)
        })
        .await
    }

    /// `call`, as this node's failure if it fails or takes longer than `timeout`.
    async fn bounded<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, NodeFailure> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(self.failure(error)),
            Err(_) => Err(NodeFailure::Timeout {
                node: self.addr.to_string(),
                after: timeout,
            }),
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

/// The driver's connection to its node: opened on demand, checked and verified before it
/// carries anything, and dropped when it breaks.
struct Link {
    addr: Arc<str>,
    client: redis::Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    policy: NodePolicy,
    conn: Option<MultiplexedConnection>,
    /// After a failed connect: when the next attempt may be made, and the error that calls
    /// fail with until then.
    down: Option<(Instant, RedisError)>,
    backoff: Duration,
    /// Whether the warning about lossy persistence was logged.
    warned: bool,
}

impl Link {
    /// The verified connection, opening one if there is none and the backoff allows.
    async fn connected(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            if let Some((retry_at, error)) = &self.down
                && Instant::now() < *retry_at
            {
                return Err(error.clone());
            }
            let opened = match tokio::time::timeout(self.connect_timeout, self.open()).await {
                Ok(opened) => opened,
                Err(_) => Err(RedisError::from((
                    ErrorKind::Io,
                    "connecting to the node timed out",
                ))),
            };
            match opened {
                Ok(conn) => {
                    if self.down.take().is_some() {
                        tracing::info!(node = %self.addr, "lock node reachable again");
                    }
                    self.backoff = MIN_RECONNECT_BACKOFF;
                    self.conn = Some(conn);
                }
                Err(error) => {
                    if self.down.is_none() {
                        tracing::warn!(node = %self.addr, %error, "lock node unreachable; calls to it fail until a reconnect succeeds");
                    }
                    self.down = Some((Instant::now() + self.backoff, error.clone()));
                    self.backoff = (self.backoff * 2).min(MAX_RECONNECT_BACKOFF);
                    return Err(error);
                }
            }
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Opens a connection, loads the scripts, checks the node's configuration and runs
    /// `verify.lua`, which finds a restart that kept only part of the data.
    async fn open(&mut self) -> Result<MultiplexedConnection, RedisError> {
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        load_scripts(&mut conn).await?;
        // The default sections hold all three fields; naming several sections needs 7.0.
        let info: String = redis::cmd("INFO").query_async(&mut conn).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let run_id = field("run_id").ok_or_else(|| {
            RedisError::from((ErrorKind::UnexpectedReturnType, "INFO server has no run_id"))
        })?;
        let eviction = field("maxmemory_policy").unwrap_or("noeviction");
        if eviction != "noeviction" && !self.policy.allow_eviction {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "lock node refused",
                format!(
                    "its maxmemory-policy is `{eviction}`, so it may evict lock keys and fence counters without any restart, which can let a second holder in; set `maxmemory-policy noeviction` on it, or accept the risk with `allow_eviction(true)`"
                ),
            )));
        }
        let aof = field("aof_enabled") == Some("1");
        // One setting per CONFIG GET: several in one needs 7.0. A node that hides CONFIG
        // (renamed or disabled, as managed services do) is taken as lossy.
        let mut settings = std::collections::HashMap::new();
        for name in ["appendfsync", "save"] {
            let got: Result<std::collections::HashMap<String, String>, _> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut conn)
                .await;
            settings.extend(got.into_iter().flatten());
        }
        let setting = |name: &str| settings.get(name).map(String::as_str);
        let durable = aof && setting("appendfsync") == Some("always");
        let snapshots = setting("save").is_none_or(|s| !s.trim().is_empty());
        if !durable && (aof || snapshots) && !self.warned {
            self.warned = true;
            tracing::warn!(
                node = %self.addr,
                aof,
                appendfsync = setting("appendfsync").unwrap_or("unknown"),
                save = setting("save").unwrap_or("unknown"),
                "lock node persistence can lose acknowledged writes (RDB snapshots, or AOF without `appendfsync always`); a restart is detected by its run_id and the node sits out its quarantine before it votes again"
            );
        }
        let nonce = crate::client::new_value();
        let verified: i64 = scripts::VERIFY
            .key(scripts::NODE_KEY)
            .arg(run_id)
            .arg(u8::from(durable))
            .arg(self.policy.quarantine_ms)
            .arg(&nonce)
            .invoke_async(&mut conn)
            .await?;
        if verified == 2 {
            tracing::warn!(
                node = %self.addr,
                run_id,
                "lock node restarted with data it may not fully have; it sits out its quarantine and is re-seeded before it votes again"
            );
        }
        Ok(conn)
    }

    /// A consecutive run of script calls, as one command.
    async fn scripts(&mut self, batch: &[Op]) -> Vec<Result<Value, RedisError>> {
        let conn = match self.connected().await {
            Ok(conn) => conn,
            Err(error) => return vec![Err(error); batch.len()],
        };
        let replies = match tokio::time::timeout(REPLY_GRACE, send(conn, batch)).await {
            Ok(replies) => replies,
            Err(_) => {
                tracing::warn!(node = %self.addr, calls = batch.len(), "a node has not answered for {}s; failing its calls", REPLY_GRACE.as_secs());
                let e = RedisError::from((ErrorKind::Io, "no reply from the node"));
                return vec![Err(e); batch.len()];
            }
        };
        if replies.iter().any(|r| r.as_ref().is_err_and(broken)) {
            self.conn = None;
        }
        replies.into_iter().map(|r| r.map(Value::Int)).collect()
    }

    /// A call that is not a script, on its own.
    async fn other(&mut self, call: &Call) -> Result<Value, RedisError> {
        let conn = self.connected().await?;
        let Call::Command(cmd) = call else {
            return Ok(Value::Okay);
        };
        let reply = match tokio::time::timeout(REPLY_GRACE, query(conn, cmd)).await {
            Ok(reply) => reply,
            Err(_) => Err(RedisError::from((ErrorKind::Io, "no reply from the node"))),
        };
        if reply.as_ref().is_err_and(broken) {
            self.conn = None;
        }
        reply
    }
}

/// Whether `error` means the connection is gone and must be opened (and verified) again.
fn broken(error: &RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error()
}

/// Loads every script on a node's connection.
async fn load_scripts(conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    for script in scripts::to_load() {
        script.load_async(conn).await?;
    }
    Ok(())
}

fn driver_gone() -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "the node's driver has stopped (the runtime that built the client shut down)",
    ))
}

/// A node's driver: sends the queued calls, everything queued at that moment as one
/// command, and waits for its reply before the next (group commit). Idle, a call goes out
/// at once; under load, the calls that arrive during one round trip share the next.
///
/// Being the only sender to the node is what keeps the order: a NOSCRIPT (a node that lost
/// its script cache) is answered by loading the scripts and sending the same command again,
/// before anything queued behind it; a new connection is verified before anything else.
async fn drive(
    mut link: Link,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ops: mpsc::WeakUnboundedSender<Op>,
    backlog: Arc<AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        backlog.fetch_sub(batch.len(), Ordering::Relaxed);
        // Never sent, so never granted: nothing to take back.
        for op in batch.extract_if(.., |op| op.moot()) {
            let _ = op.reply.send(Err(RedisError::from((
                ErrorKind::Client,
                "not sent: the acquisition had already ended",
            ))));
        }
        // In order: each run of scripts as one command, anything else on its own.
        let mut i = 0;
        while i < batch.len() {
            let run = batch[i..]
                .iter()
                .take_while(|op| matches!(op.call, Call::Script(_)))
                .count();
            if run > 0 {
                replies.extend(link.scripts(&batch[i..i + run]).await);
                i += run;
            } else {
                replies.push(link.other(&batch[i].call).await);
                i += 1;
            }
        }
        for (op, reply) in batch.drain(..).zip(replies.drain(..)) {
            if let (Some(late), Ok(Value::Int(granted))) = (&op.late, &reply)
                && *granted > 0
                && op.moot()
                && let Some(ops) = ops.upgrade()
            {
                // Granted after the acquisition was over: take it back, next in line.
                let (reply, _) = oneshot::channel();
                backlog.fetch_add(1, Ordering::Relaxed);
                let values: Vec<&str> = late.values.iter().map(|v| &**v).collect();
                let args: Vec<&dyn ToRedisArgsDyn> =
                    values.iter().map(|v| v as &dyn ToRedisArgsDyn).collect();
                let _ = ops.send(Op {
                    call: Call::Script(Payload::new(&scripts::RELEASE, &late.keys, &args)),
                    reply,
                    late: None,
                });
            }
            let _ = op.reply.send(reply);
        }
    }
}

/// Sends `batch` (script calls only) as one command and returns one reply per call.
async fn send(conn: &mut MultiplexedConnection, batch: &[Op]) -> Vec<Result<i64, RedisError>> {
    let payload = |op: &Op| match &op.call {
        Call::Script(payload) => payload.clone(),
        _ => unreachable!("only script calls are batched"),
    };
    let mut cmd = redis::cmd("EVALSHA");
    if let [op] = batch {
        let call = payload(op);
        cmd.arg(call.script.get_hash())
            .arg(call.keys.len())
            .arg(&call.keys)
            .arg(&call.args);
    } else {
        let calls: Vec<Arc<Payload>> = batch.iter().map(payload).collect();
        cmd.arg(scripts::BATCH.get_hash())
            .arg(calls.iter().map(|call| call.keys.len()).sum::<usize>());
        for call in &calls {
            cmd.arg(&call.keys);
        }
        cmd.arg(calls.len());
        for call in &calls {
            cmd.arg(call.number)
                .arg(call.keys.len())
                .arg(call.args.len())
                .arg(&call.args);
        }
    }
    let mut reply = query(conn, &cmd).await;
    if matches!(&reply, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)) {
        reply = match load_scripts(conn).await {
            Ok(()) => query(conn, &cmd).await,
            Err(e) => Err(e),
        };
    }
    match reply {
        Err(e) => vec![Err(e); batch.len()],
        Ok(value) if batch.len() == 1 => vec![integer(value)],
        Ok(Value::Array(values)) if values.len() == batch.len() => {
            values.into_iter().map(integer).collect()
        }
        Ok(other) => {
            let e = RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "the batch script returned something else than one reply per call",
                format!("{other:?}"),
            ));
            vec![Err(e); batch.len()]
        }
    }
}

async fn query(conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> Result<Value, RedisError> {
    conn.req_packed_command(cmd).await?.extract_error()
}

/// One script's reply: an integer, or (in a batch) the error it raised, as a string.
fn integer(value: Value) -> Result<i64, RedisError> {
    match value {
        Value::Int(n) => Ok(n),
        Value::BulkString(error) => Err(RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "a lock script failed",
            String::from_utf8_lossy(&error).into_owned(),
        ))),
        other => Err(RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "a lock script returned something else than an integer",
            format!("{other:?}"),
        ))),
    }
}

/// An argument of a script invocation: an object-safe bridge to [`ToRedisArgs`], so one
/// call can mix string and integer arguments.
pub(crate) trait ToRedisArgsDyn: Sync {
    fn push_bytes(&self, out: &mut Vec<Vec<u8>>);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_bytes(&self, out: &mut Vec<Vec<u8>>) {
        out.extend(self.to_redis_args());
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
mod tests {
    use super::*;
    use futures_util::FutureExt;

    const POLICY: NodePolicy = NodePolicy {
        quarantine_ms: 30_000,
        allow_eviction: false,
    };

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            redact("redis://user:secret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redact("rediss://:secret@h"), "rediss://:***@h");
    }

    #[tokio::test]
    async fn bad_urls_name_the_field_and_hide_the_password() {
        let err =
            Node::new("nodes[1]", "http://u:pw@h", Duration::from_secs(1), POLICY).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("invalid `nodes[1]`: cannot use `http://u:***@h`"),
            "{msg}"
        );
        assert!(!msg.contains("pw"), "{msg}");
    }

    /// A node that accepts connections and never answers: the driver's first command hangs,
    /// calls pile up behind it up to the cap, and the next one fails at once instead of
    /// growing the queue.
    #[tokio::test]
    async fn calls_to_a_node_that_stopped_answering_are_capped() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().collect();
            drop(held);
        });
        let (node, _) = Node::new(
            "nodes[0]",
            &format!("redis://{addr}"),
            Duration::from_secs(60),
            POLICY,
        )
        .unwrap();
        let payload = Payload::new(&scripts::RELEASE, &["k".to_owned()], &[&"v"]);
        let mut first = node.eval_shared(&payload, None);
        // Let the driver take the first call and hang on it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!((&mut first).now_or_never().is_none());

        let mut waiting: Vec<Reply> = (0..MAX_BACKLOG)
            .map(|_| node.eval_shared(&payload, None))
            .collect();
        let refused =
            tokio::time::timeout(Duration::from_secs(1), node.eval_shared(&payload, None))
                .await
                .expect("the call over the cap fails at once")
                .unwrap_err();
        assert!(
            format!("{refused:?}").contains("too many calls waiting for this node"),
            "{refused:?}"
        );
        // Those within the cap still wait for the node.
        assert!((&mut waiting[0]).now_or_never().is_none());
        assert!(waiting.last_mut().unwrap().now_or_never().is_none());
    }
}
