//! A node's driver: the one task that sends a node its calls, in call order, each run of
//! script calls as one batch command.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::health::Probe;
use super::link::{Link, broken, load_scripts};
use crate::error::NodeFailure;
use crate::ops::{Op, Outcome, Release, Vote};
use crate::scripts;

/// The most operations one command to a node carries.
const MAX_BATCH: usize = 256;

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

/// How long the driver waits for the reply to one command before failing its operations
/// and sending the next. The callers gave up long before (each round has its own deadline);
/// this only bounds what a node that stopped answering can hold up.
const REPLY_GRACE: Duration = Duration::from_secs(30);

/// A script call, encoded once and shared by the nodes a round sends it to.
pub(crate) struct Payload {
    pub(super) op: Op,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Payload {
    /// The operation, to read its replies with.
    pub(crate) fn op(&self) -> &Op {
        &self.op
    }

    pub(crate) fn new(op: Op) -> Arc<Payload> {
        Arc::new(Payload {
            keys: op.keys(),
            args: op.args(),
            op,
        })
    }
}

/// What a caller asks of a node's driver.
pub(super) enum Call {
    /// One of the lock scripts; consecutive ones go out as one batch.
    Script(Arc<Payload>),
    /// A plain command (the seeding's reads), on its own.
    Command(redis::Cmd),
    /// Nothing but a verified connection: opened, checked and verified if there is none.
    Connect,
}

/// One call queued for a node's driver.
pub(super) struct Queued {
    pub(super) call: Call,
    pub(super) reply: oneshot::Sender<Result<Value, RedisError>>,
    /// For a call that can grant a lock: whose grant it is, so that a grant for an
    /// acquisition that is already over is taken back (or never sent).
    pub(super) late: Option<LateGrants>,
}

impl Queued {
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
    pub(super) node: Arc<str>,
    pub(super) state: ReplyState,
}

pub(super) enum ReplyState {
    /// Queued on the node's driver; the channel closes if the driver is gone.
    Queued(oneshot::Receiver<Result<Value, RedisError>>),
    /// Refused before it was queued (taken by the first poll).
    Refused(Option<RedisError>),
    /// Not asked: the node is marked down.
    Down,
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
            ReplyState::Down => {
                return Poll::Ready(Err(NodeFailure::Down {
                    node: this.node.to_string(),
                }));
            }
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

pub(super) fn driver_gone() -> RedisError {
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
pub(super) async fn drive(
    mut link: Link,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    ops: mpsc::WeakUnboundedSender<Queued>,
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
            if let (Some(late), Ok(Value::Int(reply)), Call::Script(payload)) =
                (&op.late, &reply, &op.call)
                && let Ok(Vote::Yes(_)) = payload.op.decode(*reply).map(Outcome::vote)
                && op.moot()
                && let Some(ops) = ops.upgrade()
            {
                // Granted after the acquisition was over: take it back, next in line.
                let (reply, _) = oneshot::channel();
                backlog.fetch_add(1, Ordering::Relaxed);
                let release = Op::Release(Release {
                    keys: late.keys.clone(),
                    values: late.values.to_vec(),
                });
                let _ = ops.send(Queued {
                    call: Call::Script(Payload::new(release)),
                    reply,
                    late: None,
                });
            }
            let _ = op.reply.send(reply);
        }
    }
}

impl Link {
    /// A consecutive run of script calls, as one command.
    async fn scripts(&mut self, batch: &[Queued]) -> Vec<Result<Value, RedisError>> {
        let conn = match self.connected().await {
            Ok(conn) => conn,
            Err(error) => return vec![Err(error); batch.len()],
        };
        let replies = match tokio::time::timeout(REPLY_GRACE, send(conn, batch)).await {
            Ok(replies) => replies,
            Err(_) => {
                tracing::warn!(node = %self.addr(), calls = batch.len(), "a node has not answered for {}s; failing its calls", REPLY_GRACE.as_secs());
                let e = RedisError::from((ErrorKind::Io, "no reply from the node"));
                return vec![Err(e); batch.len()];
            }
        };
        if replies.iter().any(|r| r.as_ref().is_err_and(broken)) {
            self.disconnect();
        } else {
            self.answered();
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
            self.disconnect();
        } else {
            self.answered();
        }
        reply
    }
}

/// Sends `batch` (script calls only) as one command and returns one reply per call.
pub(super) async fn send(
    conn: &mut MultiplexedConnection,
    batch: &[Queued],
) -> Vec<Result<i64, RedisError>> {
    let payload = |op: &Queued| match &op.call {
        Call::Script(payload) => payload.clone(),
        _ => unreachable!("only script calls are batched"),
    };
    let mut cmd = redis::cmd("EVALSHA");
    if let [op] = batch {
        let call = payload(op);
        cmd.arg(call.op.script().get_hash())
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
            cmd.arg(call.op.number())
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

pub(super) async fn query(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<Value, RedisError> {
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

/// The driver queue's side of a probe: a `PING` through the node's own driver, so that it
/// waits behind whatever the node has not answered yet, and reconnects if it must.
#[derive(Clone)]
pub(super) struct DriverProbe {
    ops: mpsc::WeakUnboundedSender<Queued>,
    /// The driver's backlog count, which every queued call adds to.
    backlog: Arc<AtomicUsize>,
}

impl DriverProbe {
    /// The probe of the driver that `ops` feeds; it does not keep the driver alive.
    pub(super) fn new(ops: &mpsc::UnboundedSender<Queued>, backlog: &Arc<AtomicUsize>) -> Self {
        DriverProbe {
            ops: ops.downgrade(),
            backlog: backlog.clone(),
        }
    }
}

impl Probe for DriverProbe {
    async fn ping(&self) -> Result<(), RedisError> {
        let Some(ops) = self.ops.upgrade() else {
            return Err(driver_gone());
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        let queued = Queued {
            call: Call::Command(redis::cmd("PING")),
            reply,
            late: None,
        };
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if ops.send(queued).is_err() {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            return Err(driver_gone());
        }
        drop(ops);
        rx.await.unwrap_or_else(|_| Err(driver_gone())).map(drop)
    }

    fn alive(&self) -> bool {
        // The node's handles hold the only strong senders; the driver itself holds a weak
        // one.
        self.ops.strong_count() > 0
    }
}
