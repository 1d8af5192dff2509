//! A driver's connection to its node: opened on demand, checked (eviction, persistence)
//! and verified against a restart before it carries anything, reopened with backoff.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError};
use tokio::time::Instant;

use super::health::Health;
use crate::ops::{NodePolicy, Op, Outcome, Verify, new_value};
use crate::scripts;

/// After a failed connect, calls fail at once for this long before the next attempt, then
/// twice as long after each further failure, up to [`MAX_RECONNECT_BACKOFF`]: a node that
/// refuses connections costs its callers nothing, instead of a connect attempt each.
const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// The driver's connection to its node: opened on demand, checked and verified before it
/// carries anything, and dropped when it breaks.
pub(super) struct Link {
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
    /// The node's health: a failed connect marks it down, a new connection up.
    health: Arc<Health>,
    /// Starts the probe that brings the node back, once a failed connect marked it down.
    start_probe: Box<dyn Fn() + Send>,
}

impl Link {
    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    /// The node answered a command (late or not): it is not down, however slow.
    pub(super) fn answered(&self) {
        self.health.answered();
    }

    /// Forgets a connection that broke: the next call opens (and verifies) a new one.
    pub(super) fn disconnect(&mut self) {
        self.conn = None;
    }

    pub(super) fn new(
        addr: Arc<str>,
        client: redis::Client,
        config: AsyncConnectionConfig,
        connect_timeout: Duration,
        policy: NodePolicy,
        health: Arc<Health>,
        start_probe: Box<dyn Fn() + Send>,
    ) -> Self {
        Link {
            health,
            start_probe,
            addr,
            client,
            config,
            connect_timeout,
            policy,
            conn: None,
            down: None,
            backoff: MIN_RECONNECT_BACKOFF,
            warned: false,
        }
    }

    /// The verified connection, opening one if there is none and the backoff allows.
    pub(super) async fn connected(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
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
                    self.down = None;
                    if self.health.mark_up() {
                        tracing::info!(node = %self.addr, "lock node reachable again; marked up");
                    }
                    self.backoff = MIN_RECONNECT_BACKOFF;
                    self.conn = Some(conn);
                }
                Err(error) => {
                    // A node whose configuration is refused is not down: the builder
                    // reports it, and no probe would change it.
                    if error.kind() != ErrorKind::InvalidClientConfig && self.health.mark_down() {
                        tracing::warn!(node = %self.addr, %error, "lock node unreachable; marked down: its calls fail at once until a reconnect succeeds");
                        (self.start_probe)();
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
        let verify = Op::Verify(Verify {
            run_id: run_id.to_owned(),
            durable,
            quarantine_ms: self.policy.quarantine_ms,
            nonce: new_value(),
        });
        let mut call = verify.script().prepare_invoke();
        for key in verify.keys() {
            call.key(key);
        }
        for arg in verify.args() {
            call.arg(arg);
        }
        let reply: i64 = call.invoke_async(&mut conn).await?;
        let reset = matches!(verify.decode(reply)?, Outcome::Verified { reset: true });
        if reset {
            tracing::warn!(
                node = %self.addr,
                run_id,
                "lock node restarted with data it may not fully have; it sits out its quarantine and is re-seeded before it votes again"
            );
        }
        Ok(conn)
    }
}

/// Whether `error` means the connection is gone and must be opened (and verified) again.
pub(super) fn broken(error: &RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error()
}

/// Loads every script on a node's connection.
pub(super) async fn load_scripts(conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    for script in scripts::to_load() {
        script.load_async(conn).await?;
    }
    Ok(())
}
