//! `job-runner info`: the queue's counts, and each lock node's health and the locks it
//! holds.

use crate::connect;
use crate::exit::Exit;
use crate::settings::{Settings, redact};

mod locks;

/// Prints the queue's counts and the locks each lock node holds.
pub(crate) async fn info(settings: &Settings) -> Result<(), Exit> {
    let queue = connect::queue(settings, "cli").await?;
    let st = queue.stats().await.map_err(|e| Exit::failed(&e))?;
    say!(
        "queue     {} ({})",
        settings.queue_name,
        redact(&settings.queue)
    );
    say!("depth     {}", st.depth);
    say!("pending   {}", st.pending);
    say!("delayed   {}", st.delayed);
    say!("dead      {}", st.dead);
    say!("consumers {}", st.consumers);
    for node in &settings.lock_nodes {
        match locks::scan(node).await {
            Ok(keys) => {
                if let Some(warning) = keys.warning(&redact(node)) {
                    eprintln!("job-runner: {warning}");
                }
                say!("lock node {}: up, locks held: {keys}", redact(node));
            }
            Err(e) => say!("lock node {}: down ({e})", redact(node)),
        }
    }
    Ok(())
}
