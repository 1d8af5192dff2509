//! `job-runner dead`: list dead letters and put them back.

use job_runner::queue::QueueError;
use job_runner::queue::dead::DeadRetryError;

use crate::args::DeadCommand;
use crate::connect;
use crate::exit::Exit;
use crate::settings::Settings;

/// Lists dead letters, or puts one or all of them back.
pub(crate) async fn dead(settings: &Settings, cmd: DeadCommand) -> Result<(), Exit> {
    let queue = connect::queue(settings, "cli").await?;
    match cmd {
        DeadCommand::List { limit } => {
            let entries = queue.dead_list(limit).await.map_err(|e| Exit::failed(&e))?;
            if entries.is_empty() {
                say!("no dead letters");
            }
            for e in entries {
                say!("{}  {}\n    {}", e.id, e.reason, e.raw);
            }
        }
        DeadCommand::Retry { id: Some(id), .. } => {
            let moved = queue.dead_retry(&id).await.map_err(|e| Exit::failed(&e))?;
            if !moved {
                return Err(Exit::new(1, format!("no dead letter with id {id}")));
            }
            say!("retried {id}");
        }
        DeadCommand::Retry { id: None, .. } => {
            let failed = |e: QueueError| Exit::failed(&e);
            // Every entry there now, once: jobs that fail again while this runs land
            // after `until` and wait for the next `dead retry`.
            let until = queue.dead_last_id().await.map_err(failed)?;
            let (mut moved, mut skipped) = (0, 0);
            let mut after: Option<String> = None;
            while let Some(until) = &until {
                let page = queue
                    .dead_page(after.as_deref(), Some(until), 100)
                    .await
                    .map_err(failed)?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                for e in &page {
                    match queue.dead_retry(&e.id).await {
                        Ok(true) => moved += 1,
                        Ok(false) => {}
                        Err(e @ DeadRetryError::Malformed { .. }) => {
                            skipped += 1;
                            eprintln!("{e}");
                        }
                        Err(err) => return Err(Exit::failed(&err)),
                    }
                }
            }
            say!("retried {moved} dead letters; {skipped} left in place (not jobs)");
        }
    }
    Ok(())
}
