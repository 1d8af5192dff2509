//! `job-runner enqueue`: add jobs to the queue.

use job_runner::NewJob;

use crate::args::EnqueueArgs;
use crate::connect;
use crate::exit::Exit;
use crate::settings::Settings;

/// Adds `--count` copies of the job and prints their ids.
pub(crate) async fn enqueue(settings: &Settings, args: EnqueueArgs) -> Result<(), Exit> {
    let payload: serde_json::Value = serde_json::from_str(&args.payload)
        .map_err(|e| Exit::new(1, format!("--payload is not JSON: {e}")))?;
    if args.kind.is_empty() || args.resource.is_empty() {
        return Err(Exit::new(1, "kind and --resource must be non-empty"));
    }
    let queue = connect::queue(settings, "cli").await?;
    let jobs = vec![NewJob::new(args.kind, args.resource, payload); args.count.max(1)];
    let ids = queue
        .enqueue_many(&jobs)
        .await
        .map_err(|e| Exit::failed(&e))?;
    for id in ids {
        say!("{id}");
    }
    Ok(())
}
