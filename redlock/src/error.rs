//! What can go wrong, classified so that callers can act on it.

use std::fmt;
use std::time::Duration;

/// The broad class of an [`Error`]: what happened, independent of the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Another owner holds the lock on enough nodes that a quorum was impossible.
    Contended,
    /// Too many nodes failed or timed out for a quorum, independent of contention. The
    /// error lists each failed node and whether it timed out or errored.
    NoQuorum,
    /// A quorum was reached, but the acquisition took so long that no validity was left.
    ExpiredDuringAcquire,
    /// The lock is no longer held: its validity ran out, or a quorum no longer has our value.
    Lost,
    /// A node answered with an error (a Redis error, not a timeout).
    Redis,
    /// A single-node operation got no answer within the per-node timeout.
    Timeout,
    /// The configuration, or an argument such as a TTL or resource name, is invalid.
    Config,
}

impl ErrorKind {
    /// Whether trying the same operation again may succeed.
    ///
    /// Contention, a missing quorum, an acquisition that ran out of validity, Redis errors and
    /// timeouts are transient. A lost lock cannot be regained by the same guard, and a bad
    /// configuration stays bad.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Contended
                | ErrorKind::NoQuorum
                | ErrorKind::ExpiredDuringAcquire
                | ErrorKind::Redis
                | ErrorKind::Timeout
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Contended => "contended",
            ErrorKind::NoQuorum => "no quorum",
            ErrorKind::ExpiredDuringAcquire => "expired during acquire",
            ErrorKind::Lost => "lost",
            ErrorKind::Redis => "redis error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Config => "invalid configuration",
        })
    }
}

/// Why one node did not grant, extend or release.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeFailure {
    /// The node did not answer within the per-node timeout.
    Timeout {
        /// The node's address (`host:port`, never the password).
        node: String,
        /// How long we waited.
        after: Duration,
    },
    /// The node answered with an error, or the connection failed.
    Redis {
        /// The node's address (`host:port`, never the password).
        node: String,
        /// The error from the `redis` crate.
        error: redis::RedisError,
    },
    /// The node restarted without its data and may not vote yet: it waits out its
    /// quarantine, or its fence counters have not been seeded from the other nodes.
    Restarted {
        /// The node's address (`host:port`, never the password).
        node: String,
        /// True while the node still needs seeding, false while it sits out its quarantine.
        unseeded: bool,
    },
    /// The node is marked down (it refused a connection, or left rounds in a row without
    /// an answer), so it was not asked: a probe brings it back once it answers a `PING`.
    Down {
        /// The node's address (`host:port`, never the password).
        node: String,
    },
}

impl NodeFailure {
    /// The node's address.
    pub fn node(&self) -> &str {
        match self {
            NodeFailure::Timeout { node, .. }
            | NodeFailure::Redis { node, .. }
            | NodeFailure::Restarted { node, .. }
            | NodeFailure::Down { node } => node,
        }
    }
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeFailure::Timeout { node, after } => {
                write!(f, "{node}: no answer within {}ms", after.as_millis())
            }
            NodeFailure::Redis { node, error } => write!(f, "{node}: {error}"),
            NodeFailure::Restarted {
                node,
                unseeded: true,
            } => {
                write!(f, "{node}: came up empty, not yet seeded")
            }
            NodeFailure::Restarted {
                node,
                unseeded: false,
            } => {
                write!(f, "{node}: came up empty, in quarantine")
            }
            NodeFailure::Down { node } => {
                write!(f, "{node}: marked down, not asked until it answers again")
            }
        }
    }
}

/// An error from a lock operation or from building a client.
///
/// Use [`Error::kind`] to classify it and [`Error::is_retryable`] to decide whether to try
/// again. The `Display` output is one line that names the resource and the numbers involved.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Another owner holds the lock on enough nodes that a quorum was impossible.
    Contended {
        /// The resource (or the first of several) that was asked for.
        resource: String,
        /// How many nodes reported the key held by someone else.
        held_elsewhere: usize,
        /// How many nodes granted it to us (released again before returning).
        granted: usize,
        /// How many nodes a quorum needs.
        quorum: usize,
        /// How many rounds were made; 0 when another task of this process held the
        /// resource for the whole wait, so no round was made.
        attempts: u32,
    },
    /// Too many nodes were unreachable, failed or timed out for a quorum.
    NoQuorum {
        /// The resource (or the first of several) of the operation.
        resource: String,
        /// The operation: `acquire`, `extend` or `release`.
        operation: &'static str,
        /// How many nodes a quorum needs.
        quorum: usize,
        /// How many nodes answered as hoped.
        succeeded: usize,
        /// The nodes that failed and why.
        failures: Vec<NodeFailure>,
    },
    /// A quorum granted the lock, but the round took longer than the TTL minus the drift.
    ExpiredDuringAcquire {
        /// The resource (or the first of several) that was asked for.
        resource: String,
        /// How long the round took.
        elapsed: Duration,
        /// The TTL that was asked for.
        ttl: Duration,
    },
    /// The lock is not held any more.
    Lost {
        /// The resource (or the first of several) of the lock.
        resource: String,
        /// Why we know: validity ran out locally, or the nodes no longer hold our value.
        reason: LostReason,
    },
    /// A single-node operation failed with a Redis error.
    Redis(NodeFailure),
    /// The configuration or an argument is invalid.
    Config(ConfigError),
}

/// How a lock was found to be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The validity deadline passed on our monotonic clock.
    Expired,
    /// A quorum of nodes answered that the key no longer holds our value.
    NotOwned,
    /// Auto-extension stopped at its maximum total hold time, and the lock then expired.
    HoldLimit,
    /// Auto-extension stopped at its maximum number of extensions, and the lock then
    /// expired.
    ExtensionLimit,
    /// The watchdog stopped watching: its guard was taken back with
    /// [`AutoExtend::stop`](crate::AutoExtend::stop), or released or dropped with it. A
    /// [`LockHealth`](crate::LockHealth) ends in this state, so work that still holds one
    /// stops trusting the lock.
    Stopped,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Contended { .. } => ErrorKind::Contended,
            Error::NoQuorum { .. } => ErrorKind::NoQuorum,
            Error::ExpiredDuringAcquire { .. } => ErrorKind::ExpiredDuringAcquire,
            Error::Lost { .. } => ErrorKind::Lost,
            Error::Redis(NodeFailure::Timeout { .. }) => ErrorKind::Timeout,
            Error::Redis(_) => ErrorKind::Redis,
            Error::Config(_) => ErrorKind::Config,
        }
    }

    /// Whether trying again may succeed; see [`ErrorKind::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    pub(crate) fn config(field: &'static str, message: impl Into<String>) -> Self {
        Error::Config(ConfigError {
            field,
            message: message.into(),
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Contended {
                resource, attempts, ..
            } if *attempts == 0 => write!(
                f,
                "lock on `{resource}` is held by another task of this process"
            ),
            Error::Contended {
                resource,
                held_elsewhere,
                granted,
                quorum,
                attempts,
            } => write!(
                f,
                "lock on `{resource}` is held by another owner: {held_elsewhere} node(s) hold it, \
                 {granted} granted, {quorum} needed, after {attempts} attempt(s)"
            ),
            Error::NoQuorum {
                resource,
                operation,
                quorum,
                succeeded,
                failures,
            } => {
                write!(
                    f,
                    "{operation} of `{resource}` reached {succeeded} of the {quorum} nodes a quorum needs; failed: "
                )?;
                for (i, failure) in failures.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{failure}")?;
                }
                Ok(())
            }
            Error::ExpiredDuringAcquire {
                resource,
                elapsed,
                ttl,
            } => write!(
                f,
                "lock on `{resource}` was granted after {}ms, which leaves no validity of its {}ms TTL",
                elapsed.as_millis(),
                ttl.as_millis()
            ),
            Error::Lost { resource, reason } => match reason {
                LostReason::Expired => write!(f, "lock on `{resource}` expired"),
                LostReason::NotOwned => {
                    write!(
                        f,
                        "lock on `{resource}` is no longer held by us on a quorum"
                    )
                }
                LostReason::HoldLimit => write!(
                    f,
                    "lock on `{resource}` expired after reaching its maximum hold time"
                ),
                LostReason::ExtensionLimit => write!(
                    f,
                    "lock on `{resource}` expired after reaching its maximum number of extensions"
                ),
                LostReason::Stopped => write!(
                    f,
                    "lock on `{resource}` is no longer watched: its watchdog stopped"
                ),
            },
            Error::Redis(NodeFailure::Timeout { node, after }) => {
                write!(
                    f,
                    "node {node} did not answer within {}ms",
                    after.as_millis()
                )
            }
            // The source carries the message; see `source()`.
            Error::Redis(NodeFailure::Redis { node, .. }) => {
                write!(f, "redis error on node {node}")
            }
            Error::Redis(failure) => write!(f, "{failure}"),
            Error::Config(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Redis(NodeFailure::Redis { error, .. }) => Some(error),
            // A config error's Display already is its whole message.
            _ => None,
        }
    }
}

/// A configuration value, or an argument, that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    message: String,
}

impl ConfigError {
    /// The setting or argument that is wrong, e.g. `drift_factor` or `nodes[2]`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_kinds() {
        assert!(ErrorKind::Contended.is_retryable());
        assert!(ErrorKind::NoQuorum.is_retryable());
        assert!(ErrorKind::ExpiredDuringAcquire.is_retryable());
        assert!(ErrorKind::Timeout.is_retryable());
        assert!(!ErrorKind::Lost.is_retryable());
        assert!(!ErrorKind::Config.is_retryable());
    }

    #[test]
    fn no_quorum_lists_the_failed_nodes() {
        let e = Error::NoQuorum {
            resource: "r".into(),
            operation: "acquire",
            quorum: 2,
            succeeded: 0,
            failures: vec![NodeFailure::Timeout {
                node: "a:1".into(),
                after: Duration::from_millis(50),
            }],
        };
        assert_eq!(e.kind(), ErrorKind::NoQuorum);
        assert_eq!(
            e.to_string(),
            "acquire of `r` reached 0 of the 2 nodes a quorum needs; failed: a:1: no answer within 50ms"
        );
    }

    #[test]
    fn config_error_names_the_field() {
        let e = Error::config("drift_factor", "0.7 is outside [0, 0.5)");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert_eq!(
            e.to_string(),
            "invalid `drift_factor`: 0.7 is outside [0, 0.5)"
        );
    }
}
