//! Auto-extension: a watchdog that keeps a lock alive while work runs under it, and tells
//! the work when the lock is at risk, before it is lost.

use std::fmt;
use std::pin::pin;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::{Either, select};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock;
use crate::error::{Error, ErrorKind, LostReason};
use crate::guard::LockGuard;

/// How a watched lock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockState {
    /// Extensions succeed; the lock is safe.
    Held,
    /// The remaining validity fell below the at-risk threshold and no extension has renewed
    /// it yet (one failed, or a limit stops them): finish or checkpoint now. Fires before
    /// validity runs out. The watchdog keeps trying, and the state goes back to `Held` if
    /// an extension gets through.
    AtRisk,
    /// The lock is gone: validity ran out, a quorum no longer holds our value, a limit of
    /// the watchdog was reached and the lock then expired, or the watchdog stopped
    /// ([`LostReason::Stopped`]). Terminal: a handle never leaves it.
    Lost(LostReason),
}

/// Watches a lock: poll it with [`state`](Self::state), or await
/// [`at_risk`](Self::at_risk) and [`lost`](Self::lost). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LockHealth {
    rx: watch::Receiver<LockState>,
    token: Option<u64>,
    /// A simulation planted the bug of a handle that keeps its last state forever.
    never_ends: bool,
}

impl LockHealth {
    /// The state now. Once the watchdog has stopped, however it stopped (its task ended,
    /// or the runtime that ran it shut down), this is a [`Lost`](LockState::Lost) state.
    pub fn state(&self) -> LockState {
        let state = *self.rx.borrow();
        if matches!(state, LockState::Lost(_)) || self.rx.has_changed().is_ok() {
            return state;
        }
        if self.never_ends {
            return state;
        }
        LockState::Lost(LostReason::Stopped)
    }

    /// Whether the lock is lost.
    pub fn is_lost(&self) -> bool {
        matches!(self.state(), LockState::Lost(_))
    }

    /// The fencing token of the watched lock, when fencing is on.
    pub fn fencing_token(&self) -> Option<u64> {
        self.token
    }

    /// Resolves once the lock is at risk or lost, returning that state.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only watches.
    pub async fn at_risk(&self) -> LockState {
        let mut rx = self.rx.clone();
        match rx.wait_for(|s| *s != LockState::Held).await {
            Ok(s) => *s,
            // The watchdog is gone, and with it any claim on the lock.
            Err(_) => self.state(),
        }
    }

    /// Resolves once the lock is lost, returning why.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only watches.
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.rx.clone();
        match rx.wait_for(|s| matches!(s, LockState::Lost(_))).await {
            Ok(s) => match *s {
                LockState::Lost(reason) => reason,
                _ => LostReason::Expired,
            },
            Err(_) => match self.state() {
                LockState::Lost(reason) => reason,
                _ => LostReason::Stopped,
            },
        }
    }
}

/// Settings of the watchdog, with consuming setters.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct WatchdogConfig {
    max_hold: Duration,
    max_extensions: u32,
    at_risk_fraction: f64,
    pub(crate) cancel_on_loss: bool,
}

impl Default for WatchdogConfig {
    /// Extend at ttl/3 for at most 1 hour and 10 000 extensions; at risk below ttl/3 of
    /// validity; the scoped work is cancelled when the lock is lost.
    fn default() -> Self {
        WatchdogConfig {
            max_hold: Duration::from_secs(3600),
            max_extensions: 10_000,
            at_risk_fraction: 1.0 / 3.0,
            cancel_on_loss: true,
        }
    }
}

impl WatchdogConfig {
    /// The longest the lock is kept in total, from the watchdog's start (default 1 hour). After
    /// that the watchdog stops extending and the lock expires with
    /// [`LostReason::HoldLimit`].
    pub fn max_hold(mut self, max: Duration) -> Self {
        self.max_hold = max;
        self
    }

    /// The most extensions the watchdog makes (default 10 000). After that the lock
    /// expires with [`LostReason::ExtensionLimit`].
    pub fn max_extensions(mut self, max: u32) -> Self {
        self.max_extensions = max;
        self
    }

    /// At risk once validity is below this fraction of the TTL and no extension has
    /// renewed it (default 1/3). Clamped to `[0.01, 0.6]`: the watchdog extends once
    /// validity is down to 2/3 of the TTL, and a threshold above that would report every
    /// routine extension as a risk.
    pub fn at_risk_fraction(mut self, fraction: f64) -> Self {
        self.at_risk_fraction = fraction.clamp(0.01, 0.6);
        self
    }

    /// Limits that keep a lock of `ttl` for up to `hold`: that as the hold limit, and
    /// extensions enough for it (one per ttl/3, twice as many again for retried ones).
    /// The defaults (an hour, 10 000 extensions) would cut a longer or a short-TTL hold
    /// short.
    pub fn holding(hold: Duration, ttl: Duration) -> Self {
        let period_ms = (ttl.as_millis() / 3).max(1);
        let extensions = (hold.as_millis() / period_ms).saturating_mul(2) + 3;
        WatchdogConfig::default()
            .max_hold(hold)
            .max_extensions(u32::try_from(extensions).unwrap_or(u32::MAX))
    }

    /// Whether [`Redlock::using`](crate::Redlock::using) drops the work's future when the lock is lost (default
    /// true). When false, the work runs to its end and must watch [`LockHealth`] itself.
    pub fn cancel_on_loss(mut self, cancel: bool) -> Self {
        self.cancel_on_loss = cancel;
        self
    }
}

/// A lock kept alive by a watchdog task. Get the guard back with
/// [`stop`](Self::stop); dropping it stops the watchdog and releases the lock in the
/// background, like dropping a guard.
#[must_use = "dropping the handle stops the watchdog and releases the lock"]
pub struct AutoExtend {
    health: LockHealth,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<LockGuard>>,
}

impl fmt::Debug for AutoExtend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AutoExtend")
            .field("state", &self.health.state())
            .finish_non_exhaustive()
    }
}

impl AutoExtend {
    pub(crate) fn start(guard: LockGuard, config: WatchdogConfig) -> Self {
        let (tx, rx) = watch::channel(LockState::Held);
        let (stop_tx, stop_rx) = oneshot::channel();
        let never_ends = planted!(guard.shared(), HealthNeverEnds);
        let health = LockHealth {
            rx,
            token: guard.fencing_token(),
            never_ends,
        };
        let task = tokio::spawn(async move {
            let guard = watch_lock(guard, config, &tx, stop_rx).await;
            // Whatever happens to the guard now, this watchdog no longer vouches for it.
            if !never_ends {
                tx.send_if_modified(|s| {
                    let ends = !matches!(s, LockState::Lost(_));
                    if ends {
                        *s = LockState::Lost(LostReason::Stopped);
                    }
                    ends
                });
            }
            guard
        });
        AutoExtend {
            health,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// A handle on the lock's state, for the work running under it.
    pub fn health(&self) -> LockHealth {
        self.health.clone()
    }

    /// Stops the watchdog and returns the guard, to release or keep.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the watchdog has been told to stop and the guard it
    /// returns is dropped, which releases the lock in the background.
    pub async fn stop(mut self) -> LockGuard {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("the task is only taken here");
        task.await.expect("the watchdog task does not panic")
    }
}

impl Drop for AutoExtend {
    fn drop(&mut self) {
        // The task sees the channel closed, stops, and drops the guard: a background release.
        self.stop.take();
    }
}

/// When to extend next: once the validity left is down to 2/3 of the TTL, so that two
/// more tries fit before it runs out. Counted from the validity the guard has, not from
/// now: a guard handed over with little validity left is extended at once.
fn next_extension(guard: &LockGuard, ttl: Duration) -> Instant {
    if planted!(guard.shared(), WatchdogIgnoresValidity) {
        return clock::after(Instant::now(), ttl / 3);
    }
    clock::after(
        Instant::now(),
        guard.validity().saturating_sub(ttl - ttl / 3),
    )
}

async fn watch_lock(
    mut guard: LockGuard,
    config: WatchdogConfig,
    state: &watch::Sender<LockState>,
    mut stop: oneshot::Receiver<()>,
) -> LockGuard {
    let ttl = guard.ttl();
    let hold_until = clock::after(Instant::now(), config.max_hold);
    let at_risk_below = ttl.mul_f64(config.at_risk_fraction);
    let mut extensions = 0u32;
    let mut next = next_extension(&guard, ttl);
    let mut failing = false;
    let ignores_validity = planted!(guard.shared(), WatchdogIgnoresValidity);
    // Set once a limit stops the extensions; the lock then runs out its validity.
    let mut limit: Option<LostReason> = None;
    loop {
        // Wake for the next extension, or while failing or limited, often enough to report
        // at-risk and loss on time; a stop request wins at any point.
        let wake = if failing || limit.is_some() {
            clock::after(Instant::now(), (ttl / 20).max(Duration::from_millis(5)))
                .min(guard.deadline())
        } else {
            next
        };
        let sleep = pin!(tokio::time::sleep_until(wake));
        if let Either::Right(_) = select(sleep, &mut stop).await {
            return guard;
        }
        if !guard.is_valid() {
            state.send_replace(LockState::Lost(limit.unwrap_or(LostReason::Expired)));
            return wait_for_stop(guard, stop).await;
        }
        if limit.is_none() && extensions >= config.max_extensions {
            limit = Some(LostReason::ExtensionLimit);
        }
        // Never extend past the hold limit; an extension too short to be valid is the limit.
        let extend_to = ttl.min(hold_until.saturating_duration_since(Instant::now()));
        if limit.is_none() && extend_to <= guard.validity() {
            limit = Some(LostReason::HoldLimit);
        }
        // Below the threshold with nothing renewed yet: say so before trying, since the
        // try itself may take the rest of the validity.
        if (limit.is_some() || !ignores_validity) && guard.validity() < at_risk_below {
            state.send_if_modified(|s| replace(s, LockState::AtRisk));
        }
        if limit.is_some() {
            continue;
        }
        match guard.extend(extend_to).await {
            Ok(()) => {
                extensions += 1;
                failing = false;
                next = next_extension(&guard, ttl);
                if extend_to < ttl {
                    // Cut short by the hold limit: this was the last extension.
                    limit = Some(LostReason::HoldLimit);
                }
                state.send_if_modified(|s| replace(s, LockState::Held));
            }
            Err(e) if e.kind() == ErrorKind::Lost => {
                let reason = match e {
                    Error::Lost { reason, .. } => reason,
                    _ => LostReason::Expired,
                };
                state.send_replace(LockState::Lost(reason));
                return wait_for_stop(guard, stop).await;
            }
            Err(e) if e.kind() == ErrorKind::Config => {
                // The remaining hold time is too short for a valid extension.
                limit = Some(LostReason::HoldLimit);
            }
            Err(e) => {
                // Transient: keep trying within the validity; never delete anything.
                tracing::debug!(resource = guard.resource(), error = %e, "extension failed; retrying");
                failing = true;
                if guard.validity() < at_risk_below {
                    state.send_if_modified(|s| replace(s, LockState::AtRisk));
                }
            }
        }
    }
}

fn replace(slot: &mut LockState, new: LockState) -> bool {
    let changed = *slot != new;
    *slot = new;
    changed
}

async fn wait_for_stop(guard: LockGuard, stop: oneshot::Receiver<()>) -> LockGuard {
    let _ = stop.await;
    guard
}

impl LockGuard {
    /// Hands the guard to a watchdog that extends it at about ttl/3, with the default
    /// [`WatchdogConfig`]. Needs a tokio runtime.
    pub fn auto_extend(self) -> AutoExtend {
        self.auto_extend_with(WatchdogConfig::default())
    }

    /// [`auto_extend`](Self::auto_extend) with explicit settings.
    pub fn auto_extend_with(self, config: WatchdogConfig) -> AutoExtend {
        AutoExtend::start(self, config)
    }
}
