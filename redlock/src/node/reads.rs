//! The plain reads a seeding makes of a node (its restart state, its fencing state), each
//! through the node's driver, in order with its calls, and bounded by a timeout.

use std::future::Future;
use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, RedisError};

#[cfg(feature = "sim")]
use super::Backend;
use super::Node;
use super::driver::{Call, driver_gone};
use crate::error::NodeFailure;
use crate::ops::{Init, NodeState, Op, new_value};
use crate::scripts;

impl Node {
    /// The node's restart state, giving the node one first if it has none (so that there
    /// is a nonce for a seeding to carry).
    pub(crate) async fn restart_state(
        &self,
        quarantine_ms: u64,
        timeout: Duration,
    ) -> Result<NodeState, NodeFailure> {
        if self.health.is_down() {
            return Err(self.down());
        }
        #[cfg(feature = "sim")]
        if let Backend::Sim(sim) = &self.backend {
            return self
                .bounded(timeout, async {
                    Ok(sim.restart_state(&init(quarantine_ms)).await)
                })
                .await;
        }
        let init = self.eval(Op::Init(init(quarantine_ms)), None);
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
        if self.health.is_down() {
            return Err(self.down());
        }
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
    pub(super) async fn bounded<T>(
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
}

/// A fresh [`Init`]: a node read without a restart state gets one, with a nonce a seeding
/// can carry.
fn init(quarantine_ms: u64) -> Init {
    Init {
        nonce: new_value(),
        quarantine_ms,
    }
}
