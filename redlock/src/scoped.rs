//! The scoped API: work run under a lock that is kept alive while it runs and stopped when
//! the lock is lost.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures_util::future::{Either, select};

use crate::client::Redlock;
use crate::error::{Error, ErrorKind, LostReason};
use crate::guard::LockGuard;
use crate::watchdog::{LockHealth, LockState, WatchdogConfig};

/// What [`Redlock::using`] returns on failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum ScopedError<E> {
    /// The lock could not be taken; the work did not run.
    Acquire(Error),
    /// The work returned an error while the lock held; the lock was released.
    Work(E),
    /// The lock was lost while the work ran (its future was dropped, unless
    /// `cancel_on_loss` is off) or was found lost at release. Carries the work's own error,
    /// if it returned one, so that nothing is hidden.
    Lost {
        /// Why the lock is lost.
        error: Error,
        /// The work's own error, if it finished with one.
        work: Option<E>,
    },
}

impl<E: fmt::Display> fmt::Display for ScopedError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopedError::Acquire(e) => write!(f, "could not take the lock: {e}"),
            ScopedError::Work(e) => write!(f, "the work under the lock failed: {e}"),
            ScopedError::Lost { error, work: None } => write!(f, "{error}"),
            ScopedError::Lost {
                error,
                work: Some(work),
            } => write!(f, "{error}; the work also failed: {work}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ScopedError<E> {}

impl Redlock {
    /// Runs `work` under a lock on `resources`, kept alive by a watchdog that extends it at
    /// about ttl/3, with the default [`WatchdogConfig`].
    ///
    /// `work` gets a [`LockHealth`] that turns [`AtRisk`](LockState::AtRisk) before the lock
    /// can expire and [`Lost`](LockState::Lost) when it has. When the lock is lost, the
    /// work's future is dropped and the call returns [`ScopedError::Lost`]. The lock is
    /// released when the work ends, and a release that finds the lock gone is reported, not
    /// hidden behind the work's result.
    ///
    /// # Errors
    ///
    /// [`ScopedError::Acquire`] when the lock cannot be taken, [`ScopedError::Work`] for the
    /// work's own error, [`ScopedError::Lost`] when the lock was lost.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the work's future is dropped with it and the lock is
    /// released in the background.
    pub async fn using<F, Fut, T, E>(
        &self,
        resources: &[&str],
        ttl: Duration,
        work: F,
    ) -> Result<T, ScopedError<E>>
    where
        F: FnOnce(LockHealth) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.using_with(resources, ttl, WatchdogConfig::default(), work)
            .await
    }

    /// [`using`](Self::using) with explicit watchdog settings.
    ///
    /// # Errors
    ///
    /// As [`using`](Self::using).
    ///
    /// # Cancel safety
    ///
    /// As [`using`](Self::using).
    pub async fn using_with<F, Fut, T, E>(
        &self,
        resources: &[&str],
        ttl: Duration,
        config: WatchdogConfig,
        work: F,
    ) -> Result<T, ScopedError<E>>
    where
        F: FnOnce(LockHealth) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let guard = self
            .lock_many(resources, ttl)
            .await
            .map_err(ScopedError::Acquire)?;
        guard.hold_while(config, work).await
    }
}

impl LockGuard {
    /// Runs `work` under this lock, kept alive by a watchdog with `config`, then releases
    /// it: the second half of [`Redlock::using_with`], for a lock taken another way (with
    /// a retry policy of the caller's, say). Results as for `using_with`.
    ///
    /// # Errors
    ///
    /// [`ScopedError::Work`] for the work's own error, [`ScopedError::Lost`] when the
    /// lock was lost.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the work's future is dropped with it and the lock is
    /// released in the background.
    pub async fn hold_while<F, Fut, T, E>(
        self,
        config: WatchdogConfig,
        work: F,
    ) -> Result<T, ScopedError<E>>
    where
        F: FnOnce(LockHealth) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let guard = self;
        let watched = guard.auto_extend_with(config);
        let health = watched.health();
        let outcome = {
            let work = pin!(work(health.clone()));
            if config.cancel_on_loss {
                match select(work, pin!(health.lost())).await {
                    Either::Left((result, _)) => Some(result),
                    Either::Right(_) => None,
                }
            } else {
                Some(work.await)
            }
        };
        let guard = watched.stop().await;
        let resource = guard.resource().to_owned();
        let released = guard.release().await;
        let lost = |reason| Error::Lost {
            resource: resource.clone(),
            reason,
        };
        match (outcome, released) {
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Err(e)), Ok(())) => Err(ScopedError::Work(e)),
            (Some(result), Err(error)) if error.kind() == ErrorKind::Lost => {
                Err(ScopedError::Lost {
                    error,
                    work: result.err(),
                })
            }
            // The lock held to the end; only the release could not reach every node, and
            // what it left expires with the TTL. The work's result stands.
            (Some(result), Err(error)) => {
                tracing::warn!(%resource, %error, "release after scoped work failed; keys expire with their TTL");
                result.map_err(ScopedError::Work)
            }
            // The watchdog knows best why the lock went (a limit, or the nodes); the
            // release, which found it gone, adds nothing.
            (None, released) => Err(ScopedError::Lost {
                error: match (health.state(), released) {
                    (LockState::Lost(reason), _) => lost(reason),
                    (_, Err(error)) => error,
                    (_, Ok(())) => lost(LostReason::Expired),
                },
                work: None,
            }),
        }
    }
}
