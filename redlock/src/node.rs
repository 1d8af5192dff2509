//! One Redis node: a self-reconnecting, multiplexed connection with a per-command timeout.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ToRedisArgs};

use crate::error::{Error, NodeFailure};
use crate::scripts;

/// A lock node. All tasks of a process share its one multiplexed connection, which is what
/// lets 64 concurrent lockers cost 64 pipelined commands rather than 64 connections.
#[derive(Clone)]
pub(crate) struct Node {
    /// `host:port` for logs and errors; never contains credentials.
    addr: std::sync::Arc<str>,
    backend: Backend,
}

/// One prepared call, owning what it needs.
enum Call {
    /// The EVALSHA, the connection, and whether the script can grant a lock.
    Redis(redis::Cmd, ConnectionManager, bool),
    #[cfg(feature = "sim")]
    Sim(
        std::sync::Arc<crate::sim::SimNode>,
        &'static Script,
        Vec<String>,
        Vec<String>,
    ),
}

#[derive(Clone)]
enum Backend {
    Redis(ConnectionManager),
    /// An in-process model of a node, for the deterministic simulation.
    #[cfg(feature = "sim")]
    Sim(std::sync::Arc<crate::sim::SimNode>),
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
    /// so an unreachable node does not stop the client from being built.
    pub(crate) fn new(
        field: &'static str,
        url: &str,
        connect_timeout: Duration,
    ) -> Result<(Node, NodeIdentity), Error> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::config(field, format!("cannot use `{}`: {e}", redact(url))))?;
        let info = client.get_connection_info();
        let addr: std::sync::Arc<str> = info.addr().to_string().into();
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
        Ok((
            Node {
                addr,
                backend: Backend::Redis(conn),
            },
            identity,
        ))
    }

    #[cfg(feature = "sim")]
    pub(crate) fn simulated(node: std::sync::Arc<crate::sim::SimNode>) -> Node {
        Node {
            addr: node.name().into(),
            backend: Backend::Sim(node),
        }
    }

    fn redis_conn(&self) -> Option<&ConnectionManager> {
        match &self.backend {
            Backend::Redis(conn) => Some(conn),
            #[cfg(feature = "sim")]
            Backend::Sim(_) => None,
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `script` with `keys` and `args`; every script returns an integer. The caller
    /// bounds the time it may take.
    ///
    /// The command is built before the returned future first runs, and the future owns
    /// everything it needs, so a round can hand the replies it no longer waits for to a
    /// background task. That matters: redis-rs skips a queued command whose caller has
    /// gone, so dropping an unanswered call could cancel it on one node only.
    ///
    /// A call that can grant a lock is exactly one EVALSHA. On NOSCRIPT (a node that
    /// restarted and lost its script cache) it fails and the scripts are reloaded in the
    /// background, rather than loaded and retried inline, where the retry could land after
    /// this client's next command to the node (a SET after its own release). The other
    /// scripts only act on what is ours; they load and retry inline.
    pub(crate) fn eval(
        &self,
        script: &'static Script,
        keys: &[String],
        args: &[&dyn ToRedisArgsDyn],
    ) -> impl Future<Output = Result<i64, NodeFailure>> + Send + 'static {
        let node = self.addr.clone();
        let call = match &self.backend {
            Backend::Redis(conn) => {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
                for arg in args {
                    arg.push_to(&mut cmd);
                }
                // Scripts that can grant a lock must never run late; see above.
                let grants = script.get_hash() == scripts::ACQUIRE.get_hash()
                    || script.get_hash() == scripts::HANDOFF.get_hash();
                Call::Redis(cmd, conn.clone(), grants)
            }
            #[cfg(feature = "sim")]
            Backend::Sim(sim) => Call::Sim(
                sim.clone(),
                script,
                keys.to_vec(),
                args.iter().flat_map(|a| a.to_strings()).collect(),
            ),
        };
        async move {
            let result = match call {
                Call::Redis(cmd, mut conn, grants) => {
                    let result = cmd.query_async::<i64>(&mut conn).await;
                    match &result {
                        Err(e)
                            if e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                        {
                            if grants {
                                // The node lost its script cache (a restart). No second
                                // attempt: it could land after this client's next command
                                // to the node. This call fails; the next one finds the
                                // scripts loaded.
                                tokio::spawn(load_scripts(conn));
                                result
                            } else {
                                // Releasing, extending and raising counters only ever act
                                // on what is ours, so a late second attempt is harmless.
                                load_scripts(conn.clone()).await;
                                cmd.query_async::<i64>(&mut conn).await
                            }
                        }
                        _ => result,
                    }
                }
                #[cfg(feature = "sim")]
                Call::Sim(sim, script, keys, args) => sim.eval(script, &keys, &args).await,
            };
            result.map_err(|error| NodeFailure::Redis {
                node: node.to_string(),
                error,
            })
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

    /// Opens the connection and loads the scripts now rather than on the first lock.
    ///
    /// Loading matters beyond latency: a round decided at quorum drops the replies still in
    /// flight, and a command already sent still runs on its node, but a NOSCRIPT reply would
    /// need a second step that a dropped future never takes. With the scripts loaded, one
    /// EVALSHA per node is the whole operation.
    pub(crate) async fn warm_up(&self, timeout: Duration) -> Result<(), NodeFailure> {
        let Some(conn) = self.redis_conn() else {
            return Ok(());
        };
        let mut conn = conn.clone();
        let load = async {
            for script in scripts::all() {
                script.load_async(&mut conn).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
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

/// Loads every script on a node's connection (after a NOSCRIPT), best effort.
async fn load_scripts(mut conn: ConnectionManager) {
    for script in scripts::all() {
        if let Err(e) = script.load_async(&mut conn).await {
            tracing::warn!(error = %e, "could not load the lock scripts on a node");
            return;
        }
    }
}

/// An argument of a script invocation: an object-safe bridge to [`ToRedisArgs`], so one
/// call can mix string and integer arguments.
pub(crate) trait ToRedisArgsDyn: Sync {
    fn push_to(&self, cmd: &mut redis::Cmd);
    /// The argument as the strings Redis would receive (for the simulated nodes).
    #[cfg(feature = "sim")]
    fn to_strings(&self) -> Vec<String>;
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, cmd: &mut redis::Cmd) {
        cmd.arg(self);
    }

    #[cfg(feature = "sim")]
    fn to_strings(&self) -> Vec<String> {
        self.to_redis_args()
            .into_iter()
            .map(|a| String::from_utf8_lossy(&a).into_owned())
            .collect()
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
}
