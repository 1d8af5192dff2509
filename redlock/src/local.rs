//! The in-process queue: tasks of one process that want the same resource wait here, so
//! that only one of them contends in Redis, and the lock can pass from one to the next
//! without being released and acquired again.

use std::fmt;
use std::sync::Arc;

use tokio::sync::OwnedMutexGuard;

use crate::error::Error;
use crate::retry::RetryPolicy;
use crate::shared::{Granted, Shared, Slot};

/// A lock left by the previous holder in this process for the next one is the holder's
/// [`Granted`] as it had it: on each node the keys hold one of its `values`, the values of
/// the hand-off chain so far (a node that missed a hand-off, because a round decided
/// without it, still holds an earlier one).
///
/// This process's turn at some resources. Held by the guard, and by a spawned release, so
/// the next local waiter starts only once our keys are gone from the nodes or handed over.
pub(crate) struct LocalTurn {
    shared: Arc<Shared>,
    keys: Arc<[String]>,
    guards: Vec<OwnedMutexGuard<Option<Granted>>>,
}

impl fmt::Debug for LocalTurn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalTurn")
            .field("keys", &self.keys)
            .finish()
    }
}

impl LocalTurn {
    /// Waits for this process's turn at `keys` (sorted): immediately for a policy without
    /// waits, else for at most the policy's total wait.
    pub(crate) async fn wait(
        shared: &Arc<Shared>,
        keys: &Arc<[String]>,
        policy: RetryPolicy,
    ) -> Result<LocalTurn, Error> {
        let slots: Vec<Slot> = {
            let mut map = shared.local.lock().unwrap_or_else(|p| p.into_inner());
            keys.iter()
                .map(|k| map.entry(k.clone()).or_default().clone())
                .collect()
        };
        // Constructed first so that an early return cleans the map up through Drop.
        let mut turn = LocalTurn {
            shared: shared.clone(),
            keys: keys.clone(),
            guards: Vec::with_capacity(slots.len()),
        };
        let contended = || Error::Contended {
            resource: keys[0].clone(),
            held_elsewhere: 0,
            granted: 0,
            quorum: shared.quorum(),
            attempts: 0,
        };
        let budget = policy.max_total_wait();
        let deadline = crate::clock::after(tokio::time::Instant::now(), budget);
        // Keys are sorted, so two multi-resource lockers in this process cannot deadlock.
        for slot in slots {
            let guard = match slot.clone().try_lock_owned() {
                Ok(g) => g,
                Err(_) if budget.is_zero() => return Err(contended()),
                Err(_) => tokio::time::timeout_at(deadline, slot.lock_owned())
                    .await
                    .map_err(|_| contended())?,
            };
            turn.guards.push(guard);
        }
        Ok(turn)
    }

    /// Takes what a previous holder in this process left. A single-resource turn gets the
    /// baton to swap; batons in a multi-resource turn's slots are released, since a swap
    /// needs every key to hold one value.
    pub(crate) async fn take_baton(&mut self) -> Option<Granted> {
        let mut batons: Vec<(String, Granted)> = self
            .keys
            .iter()
            .zip(self.guards.iter_mut())
            .filter_map(|(key, slot)| slot.take().map(|b| (key.clone(), b)))
            .collect();
        if self.keys.len() == 1 {
            return batons.pop().map(|(_, baton)| baton);
        }
        for (key, baton) in batons {
            baton.end();
            // If this future is dropped here, the remaining batons' keys expire with their TTL.
            self.shared
                .fanout
                .release_all(&Arc::from([key]), &baton.values, true)
                .await;
        }
        None
    }

    /// Leaves the lock to the next task of this process that waits for it, instead of
    /// releasing: only for a single resource, only when someone waits, and only while the
    /// chain of hand-offs is short enough for other processes to get a turn. `held` is
    /// what the holder has; its `handoffs` counts the hand-offs before this one.
    pub(crate) fn hand_off(&mut self, held: &Granted) -> bool {
        let [slot] = self.guards.as_mut_slice() else {
            return false;
        };
        // The map holds one reference and this guard another; any more are waiters.
        if held.handoffs >= self.shared.max_local_handoffs
            || Arc::strong_count(OwnedMutexGuard::mutex(slot)) <= 2
        {
            return false;
        }
        **slot = Some(held.clone());
        true
    }
}

impl Drop for LocalTurn {
    fn drop(&mut self) {
        self.guards.clear();
        // Forget slots nobody uses any more. Clones are only made under this lock, so a
        // count of 1 (the map's own) means no holder and no waiter. A baton still in such a
        // slot was handed to a waiter that gave up: release it.
        let mut orphans = Vec::new();
        {
            let mut map = self.shared.local.lock().unwrap_or_else(|p| p.into_inner());
            for key in self.keys.iter() {
                if map.get(key).is_some_and(|s| Arc::strong_count(s) == 1)
                    && let Some(slot) = map.remove(key)
                    && let Some(baton) = slot.try_lock().ok().and_then(|mut s| s.take())
                {
                    orphans.push((key.clone(), baton));
                }
            }
        }
        for (key, baton) in orphans {
            baton.end();
            self.shared
                .fanout
                .spawn_release(Arc::from([key]), baton.values, ());
        }
    }
}
