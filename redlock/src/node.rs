//! One Redis node: a self-reconnecting, multiplexed connection with a per-command timeout.

use std::fmt;
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
    addr: String,
    conn: ConnectionManager,
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
        let addr = info.addr().to_string();
        let identity = (addr.clone(), info.redis_settings().db());
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
        Ok((Node { addr, conn }, identity))
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `script` with `keys` and `args`. The caller bounds the time it may take.
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[&dyn ToRedisArgsDyn],
    ) -> Result<T, NodeFailure> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            arg.push_to(&mut invocation);
        }
        let mut conn = self.conn.clone();
        invocation
            .invoke_async::<T>(&mut conn)
            .await
            .map_err(|error| NodeFailure::Redis {
                node: self.addr.clone(),
                error,
            })
    }

    /// Runs one plain command, giving up after `timeout`.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<T, NodeFailure> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(NodeFailure::Redis {
                node: self.addr.clone(),
                error,
            }),
            Err(_) => Err(NodeFailure::Timeout {
                node: self.addr.clone(),
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
        let mut conn = self.conn.clone();
        let load = async {
            for script in scripts::all() {
                script.load_async(&mut conn).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(timeout, load).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(NodeFailure::Redis {
                node: self.addr.clone(),
                error,
            }),
            Err(_) => Err(NodeFailure::Timeout {
                node: self.addr.clone(),
                after: timeout,
            }),
        }
    }
}

/// An argument of a script invocation: an object-safe bridge to [`ToRedisArgs`], so one
/// call can mix string and integer arguments.
pub(crate) trait ToRedisArgsDyn: Sync {
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation.arg(self);
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
