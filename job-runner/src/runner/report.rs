//! What a run did: each job's ending, added up.

/// What a run did, for the caller and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Jobs done and acknowledged.
    pub done: u64,
    /// Jobs put back for a retry after a transient failure.
    pub retried: u64,
    /// Jobs put back because their lock was contended or the lock quorum unreachable.
    pub requeued: u64,
    /// Jobs sent to dead letters.
    pub dead: u64,
    /// Entries reclaimed from other consumers.
    pub reclaimed: u64,
    /// Jobs cut short by shutdown and put back.
    pub interrupted: u64,
    /// Jobs whose entry another runner reclaimed while this one stalled; left to it.
    pub taken_over: u64,
}

/// How one job ended, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    Done,
    Retried,
    Requeued,
    Dead,
    Interrupted,
    /// Its entry could not be updated; it stays pending and is reclaimed later.
    Left,
    /// Its entry is another runner's now (reclaimed while this one stalled); left to it.
    TakenOver,
}

impl Finished {
    /// The `outcome` label of `job_runner_jobs_total` and of the job's log line.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Finished::Done => "done",
            Finished::Retried => "retried",
            Finished::Requeued => "requeued",
            Finished::Dead => "dead",
            Finished::Interrupted => "interrupted",
            Finished::Left => "left_pending",
            Finished::TakenOver => "taken_over",
        }
    }
}

impl RunReport {
    /// Counts one job task's ending.
    pub(crate) fn tally(&mut self, joined: Result<Finished, tokio::task::JoinError>) {
        match joined {
            Ok(Finished::Done) => self.done += 1,
            Ok(Finished::Retried) => self.retried += 1,
            Ok(Finished::Requeued) => self.requeued += 1,
            Ok(Finished::Dead) => self.dead += 1,
            Ok(Finished::Interrupted) => self.interrupted += 1,
            Ok(Finished::TakenOver) => self.taken_over += 1,
            Ok(Finished::Left) => {}
            Err(e) => {
                tracing::error!(error = %e, "a job task panicked; its entry will be reclaimed");
            }
        }
    }
}
