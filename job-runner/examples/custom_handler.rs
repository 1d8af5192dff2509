//! A runner with a handler of your own: enqueue two jobs, run them under their locks,
//! stop once the queue is drained.
//!
//! ```sh
//! cargo run -p job-runner --example custom_handler -- redis://127.0.0.1:6379
//! ```
//!
//! One Redis serves as the queue and the only lock node here; give a real deployment
//! three or five independent lock nodes.

use job_runner::fencelock::Redlock;
use job_runner::{Handler, HandlerError, Job, JobContext, NewJob, Queue, Registry, Runner};

/// The critical section: whatever it writes, it writes with `ctx.fencing_token`.
struct Greet;

impl Handler for Greet {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        let name = job.payload["name"]
            .as_str()
            .ok_or_else(|| HandlerError::permanent("payload has no `name`"))?;
        println!(
            "hello {name} (job {}, fencing token {})",
            job.id, ctx.fencing_token
        );
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let locks = Redlock::builder()
        .nodes([url.as_str()])
        .fencing(true)
        .build()
        .await?;
    let queue = Queue::connect(&url, "example", "example-worker").await?;
    for name in ["Ada", "Grace"] {
        let job = NewJob::new(
            "greet",
            format!("person:{name}"),
            serde_json::json!({ "name": name }),
        );
        queue.enqueue(&job).await?;
    }
    let runner = Runner::builder(queue, locks, Registry::new().with("greet", Greet))
        .once(true)
        .build()?;
    let report = runner.run(std::future::pending::<()>()).await;
    println!("{report:?}");
    if report.done != 2 {
        return Err(format!("expected 2 jobs done: {report:?}").into());
    }
    Ok(())
}
