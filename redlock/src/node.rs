//! One Redis node: a self-reconnecting, multiplexed connection, and the driver that sends
//! it the lock scripts in batches.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind, ToRedisArgs, Value};
use tokio::sync::{mpsc, oneshot};

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

/// A lock node. All tasks of a process share its one multiplexed connection and its one
/// driver, which is what lets 64 concurrent lockers cost one command per node rather than
/// 64 commands or 64 connections.
#[derive(Clone)]
pub(crate) struct Node {
    /// `host:port` for logs and errors; never contains credentials.
    addr: Arc<str>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Redis {
        conn: ConnectionManager,
        /// The node's driver: every script goes through it, in the order of the calls.
        ops: mpsc::UnboundedSender<Op>,
        /// Calls queued for the driver and not yet taken: bounded by [`MAX_BACKLOG`].
        backlog: Arc<AtomicUsize>,
    },
    /// An in-process model of a node, for the deterministic simulation.
    #[cfg(feature = "sim")]
    Sim(Arc<crate::sim::SimNode>),
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

/// One script call queued for a node's driver.
struct Op {
    call: Arc<Payload>,
    reply: oneshot::Sender<Result<i64, RedisError>>,
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

/// The reply of one call to one node: a named `Unpin` future that borrows nothing, so a
/// round can keep its calls in a plain `Vec` and poll them in place, with no task
/// allocated per call.
pub(crate) struct Reply {
    node: Arc<str>,
    state: ReplyState,
}

enum ReplyState {
    /// Queued on the node's driver; the channel closes if the driver is gone.
    Queued(oneshot::Receiver<Result<i64, RedisError>>),
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
                Poll::Ready(reply) => reply.unwrap_or_else(|_| Err(driver_gone())),
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

impl Node {
    /// Parses `url` and sets up a lazy connection: nothing is sent until the first command,
    /// so an unreachable node does not stop the client from being built. The node's driver
    /// is spawned on the current tokio runtime.
    pub(crate) fn new(
        field: &'static str,
        url: &str,
        connect_timeout: Duration,
    ) -> Result<(Node, NodeIdentity), Error> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::config(field, format!("cannot use `{}`: {e}", redact(url))))?;
        let info = client.get_connection_info();
        let addr: Arc<str> = info.addr().to_string().into();
        let identity = (addr.to_string(), info.redis_settings().db());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            // Every round carries its own deadline; a second timer per command would only
            // cost time.
            .set_response_timeout(None)
            // Reconnection keeps trying in the background; each of our commands carries its
            // own timeout, so a down node never stalls a round.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| Error::config(field, format!("cannot use `{}`: {e}", redact(url))))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::config(field, "the client must be built inside a tokio runtime"))?;
        let (ops, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        runtime.spawn(drive(
            addr.clone(),
            conn.clone(),
            rx,
            ops.downgrade(),
            backlog.clone(),
        ));
        Ok((
            Node {
                addr,
                backend: Backend::Redis { conn, ops, backlog },
            },
            identity,
        ))
    }

    #[cfg(feature = "sim")]
    pub(crate) fn simulated(node: Arc<crate::sim::SimNode>) -> Node {
        Node {
            addr: node.name().into(),
            backend: Backend::Sim(node),
        }
    }

    fn redis_conn(&self) -> Option<&ConnectionManager> {
        match &self.backend {
            Backend::Redis { conn, .. } => Some(conn),
            #[cfg(feature = "sim")]
            Backend::Sim(_) => None,
        }
    }

    /// Whether calls whose replies a round stops waiting for must still be polled to
    /// completion (and their late grants taken back) by the caller. A Redis node's driver
    /// does both by itself.
    pub(crate) fn needs_drain(&self) -> bool {
        self.redis_conn().is_none()
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
        self.eval_shared(&Payload::new(script, keys, args), late)
    }

    /// [`eval`](Self::eval) of a call encoded once for every node of a round.
    pub(crate) fn eval_shared(&self, payload: &Arc<Payload>, late: Option<&LateGrants>) -> Reply {
        let state = match &self.backend {
            Backend::Redis { ops, backlog, .. } => {
                if backlog.fetch_add(1, Ordering::Relaxed) >= MAX_BACKLOG {
                    backlog.fetch_sub(1, Ordering::Relaxed);
                    ReplyState::Refused(Some(RedisError::from((
                        ErrorKind::Io,
                        "too many calls waiting for this node (it has stopped answering)",
                    ))))
                } else {
                    let (reply, rx) = oneshot::channel();
                    let op = Op {
                        call: payload.clone(),
                        reply,
                        late: late.cloned(),
                    };
                    match ops.send(op) {
                        Ok(()) => ReplyState::Queued(rx),
                        Err(_) => {
                            backlog.fetch_sub(1, Ordering::Relaxed);
                            ReplyState::Refused(Some(driver_gone()))
                        }
                    }
                }
            }
            #[cfg(feature = "sim")]
            Backend::Sim(sim) => {
                let _ = late;
                let (sim, script, keys) = (sim.clone(), payload.script, payload.keys.clone());
                let args: Vec<String> = payload
                    .args
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
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

    /// The node's restart state: `(vote_after, seeded)`, each absent on an empty node.
    pub(crate) async fn restart_state(
        &self,
        timeout: Duration,
    ) -> Result<(Option<String>, Option<String>), NodeFailure> {
        #[cfg(feature = "sim")]
        if let Backend::Sim(node) = &self.backend {
            return Ok(node.restart_state());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(scripts::NODE_KEY).arg("vote_after").arg("seeded");
        self.query(&cmd, timeout).await
    }

    /// Every fence counter on the node.
    pub(crate) async fn fence_counters(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(String, i64)>, NodeFailure> {
        #[cfg(feature = "sim")]
        if let Backend::Sim(node) = &self.backend {
            return Ok(node.fence_counters());
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

    /// Runs one plain command, giving up after `timeout`.
    async fn query<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<T, NodeFailure> {
        let mut conn = self
            .redis_conn()
            .expect("plain commands go to Redis nodes only")
            .clone();
        match tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(NodeFailure::Redis {
                node: self.addr.to_string(),
                error,
            }),
            Err(_) => Err(NodeFailure::Timeout {
                node: self.addr.to_string(),
                after: timeout,
            }),
        }
    }

    /// Opens the connection and loads the scripts now rather than on the first lock, so that
    /// the first rounds do not each wait for a NOSCRIPT, a reload and a resend in the driver.
    pub(crate) async fn warm_up(&self, timeout: Duration) -> Result<(), NodeFailure> {
        let Some(conn) = self.redis_conn() else {
            return Ok(());
        };
        let mut conn = conn.clone();
        let load = load_scripts(&mut conn);
        match tokio::time::timeout(timeout, load).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(NodeFailure::Redis {
                node: self.addr.to_string(),
                error,
            }),
            Err(_) => Err(NodeFailure::Timeout {
                node: self.addr.to_string(),
                after: timeout,
            }),
        }
    }
}

/// Loads every script on a node's connection.
async fn load_scripts(conn: &mut ConnectionManager) -> Result<(), RedisError> {
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
/// Being the only sender of scripts to the node is what keeps their order: a NOSCRIPT (a
/// node that restarted and lost its script cache) is answered by loading the scripts and
/// sending the same command again, before anything queued behind it.
async fn drive(
    addr: Arc<str>,
    mut conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ops: mpsc::WeakUnboundedSender<Op>,
    backlog: Arc<AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        backlog.fetch_sub(batch.len(), Ordering::Relaxed);
        // Never sent, so never granted: nothing to take back.
        for op in batch.extract_if(.., |op| op.moot()) {
            let _ = op.reply.send(Err(RedisError::from((
                ErrorKind::Client,
                "not sent: the acquisition had already ended",
            ))));
        }
        if batch.is_empty() {
            continue;
        }
        let replies = match tokio::time::timeout(REPLY_GRACE, send(&mut conn, &batch)).await {
            Ok(replies) => replies,
            Err(_) => {
                tracing::warn!(node = %addr, calls = batch.len(), "a node has not answered for {}s; failing its calls", REPLY_GRACE.as_secs());
                let e = RedisError::from((ErrorKind::Io, "no reply from the node"));
                vec![Err(e); batch.len()]
            }
        };
        for (op, reply) in batch.drain(..).zip(replies) {
            if let (Some(late), Ok(granted)) = (&op.late, &reply)
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
                    call: Payload::new(&scripts::RELEASE, &late.keys, &args),
                    reply,
                    late: None,
                });
            }
            let _ = op.reply.send(reply);
        }
    }
}

/// Sends `batch` as one command and returns one reply per call.
async fn send(conn: &mut ConnectionManager, batch: &[Op]) -> Vec<Result<i64, RedisError>> {
    let mut cmd = redis::cmd("EVALSHA");
    if let [op] = batch {
        let call = &op.call;
        cmd.arg(call.script.get_hash())
            .arg(call.keys.len())
            .arg(&call.keys)
            .arg(&call.args);
    } else {
        cmd.arg(scripts::BATCH.get_hash())
            .arg(batch.iter().map(|op| op.call.keys.len()).sum::<usize>());
        for op in batch {
            cmd.arg(&op.call.keys);
        }
        cmd.arg(batch.len());
        for op in batch {
            let call = &op.call;
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

async fn query(conn: &mut ConnectionManager, cmd: &redis::Cmd) -> Result<Value, RedisError> {
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
        let err = Node::new("nodes[1]", "http://u:pw@h", Duration::from_secs(1)).unwrap_err();
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
