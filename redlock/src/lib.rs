//! # fencelock
//!
//! Redlock done right: mutual exclusion across processes and machines through a quorum of
//! independent Redis nodes.
//!
//! ```no_run
//! use std::time::Duration;
//! use fencelock::Redlock;
//!
//! # async fn demo() -> Result<(), fencelock::Error> {
//! let locks = Redlock::builder()
//!     .nodes(["redis://127.0.0.1:7001", "redis://127.0.0.1:7002", "redis://127.0.0.1:7003"])
//!     .build()
//!     .await?;
//! let guard = locks.lock("payment:42", Duration::from_secs(10)).await?;
//! // ... critical section; guard.validity() tells how long it is still safe ...
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! ## The algorithm
//!
//! An acquisition sends one script to all N nodes in parallel, each command bounded by a
//! per-node timeout and by the remaining validity, and decides as soon as the outcome is
//! certain: `N / 2 + 1` grants, or more refusals and failures than `N - quorum`. Validity is
//! `ttl − elapsed − (ttl × drift_factor + 2 ms)` on the monotonic clock. A failed round
//! releases on every node at once, then retries after a delay plus random jitter.
//!
//! Release is compare-and-delete and extension compare-and-`PEXPIRE`, both by script, so
//! nobody can free or prolong a lock that is not theirs, and a failed extension never
//! deletes a valid lock.
//!
//! ## Failure model
//!
//! Safety holds while fewer than a quorum of nodes lose data during a lock's TTL and
//! process clocks advance within the drift factor. Down, paused or slow minorities only
//! cost their per-node timeout; a majority down gives a fast
//! [`NoQuorum`](ErrorKind::NoQuorum) error.

/// Whether a simulation planted the named [`sim::Bug`] in a client: always false without
/// the `sim` feature, so the check compiles away.
macro_rules! planted {
    ($client:expr, $bug:ident) => {{
        #[cfg(feature = "sim")]
        let planted = $client.planted(crate::sim::Bug::$bug);
        #[cfg(not(feature = "sim"))]
        let planted = {
            let _ = &$client;
            false
        };
        planted
    }};
}

mod acquire;
mod builder;
mod client;
mod clock;
mod error;
mod fanout;
mod guard;
mod local;
mod node;
/// The typed contract with the Lua scripts (public with feature `sim`, for the
/// differential test of the model nodes against the real scripts).
#[cfg(feature = "sim")]
pub mod ops;
#[cfg(not(feature = "sim"))]
#[allow(unreachable_pub)]
mod ops;
mod quorum;
mod restart;
mod retry;
mod scoped;
mod scripts;
mod shared;
#[cfg(feature = "sim")]
pub mod sim;
mod watchdog;

pub use builder::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRIFT_FACTOR, DEFAULT_FENCE_WINDOW,
    DEFAULT_MAX_LOCAL_HANDOFFS, DEFAULT_NODE_TIMEOUT, DEFAULT_RESTART_QUARANTINE, MAX_FENCE_WINDOW,
    RedlockBuilder,
};
pub use client::Redlock;
pub use error::{ConfigError, Error, ErrorKind, LostReason, NodeFailure};
pub use guard::LockGuard;
pub use node::NodeHealth;
pub use retry::RetryPolicy;
pub use scoped::ScopedError;
pub use shared::MAX_TTL;
pub use watchdog::{AutoExtend, LockHealth, LockState, WatchdogConfig};

/// Whether `key`, as found on a lock node, is fencelock's own bookkeeping (fence
/// counters, the node's restart state) rather than a lock: for tools that list or count
/// what a node holds without knowing fencelock's key names.
///
/// ```
/// assert!(fencelock::is_internal_key(b"fencelock:node"));
/// assert!(!fencelock::is_internal_key(b"order:42"));
/// ```
pub fn is_internal_key(key: &[u8]) -> bool {
    key.starts_with(scripts::RESERVED_PREFIX.as_bytes())
}

/// Whether `value`, read from a key on a lock node, has the shape of a lock value
/// fencelock writes (128 random bits as 32 lowercase hex digits): for tools that count
/// the locks a node holds without knowing fencelock's format.
///
/// A lock key also always has a TTL: a key whose value merely looks like this but does
/// not expire is not a lock. Other clients' locks (node-redlock, redsync) may or may not
/// match; this recognises fencelock's.
///
/// ```
/// assert!(fencelock::is_lock_value(b"3f1c0a9b7e2d4c6f8a1b2c3d4e5f6a7b"));
/// assert!(!fencelock::is_lock_value(b"hello"));
/// assert!(!fencelock::is_lock_value(b"3F1C0A9B7E2D4C6F8A1B2C3D4E5F6A7B"));
/// ```
pub fn is_lock_value(value: &[u8]) -> bool {
    ops::is_value(value)
}

#[cfg(test)]
mod send_sync {
    fn is_send<T: Send>() {}
    fn is_sync<T: Sync>() {}
    fn is_static<T: 'static>() {}

    #[test]
    fn public_types_are_send_sync_static() {
        is_send::<crate::Redlock>();
        is_sync::<crate::Redlock>();
        is_send::<crate::LockGuard>();
        is_sync::<crate::LockGuard>();
        is_static::<crate::LockGuard>();
        is_send::<crate::Error>();
        is_sync::<crate::Error>();
        is_send::<crate::AutoExtend>();
        is_sync::<crate::AutoExtend>();
        is_send::<crate::LockHealth>();
        is_sync::<crate::LockHealth>();
    }

    /// The lock futures can be spawned: they are `Send` when the work is.
    #[allow(dead_code)]
    fn futures_are_send(client: crate::Redlock, guard: crate::LockGuard) {
        fn is_send_value<T: Send>(_: T) {}
        let ttl = std::time::Duration::from_secs(1);
        is_send_value(client.lock("r", ttl));
        is_send_value(client.lock_many(&["a", "b"], ttl));
        is_send_value(client.using(&["r"], ttl, |_health| async { Ok::<(), ()>(()) }));
        is_send_value(guard.release());
    }
}
