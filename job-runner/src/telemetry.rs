//! Observability: the Prometheus metrics, the fetch-loop health that `/healthz` reports,
//! and the HTTP server for both.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Metric names, all prefixed `job_runner_`.
pub mod names {
    /// Counter: jobs finished, by `kind` (a kind this runner handles, `unknown` for any
    /// other, `(malformed)` for entries that are not jobs) and `outcome` (`done`,
    /// `retried`, `dead`, `requeued`, `interrupted`, `left_pending`, `taken_over`).
    pub const JOBS: &str = "job_runner_jobs_total";
    /// Histogram: seconds from lock acquired to handler finished, by `kind`.
    pub const JOB_DURATION: &str = "job_runner_job_duration_seconds";
    /// Counter: lock acquisitions, by `outcome` (`acquired`, `contended`, `no_quorum`,
    /// `error`).
    pub const LOCK_ACQUIRE: &str = "job_runner_lock_acquire_total";
    /// Histogram: seconds to acquire a job's lock, whatever the outcome.
    pub const LOCK_ACQUIRE_DURATION: &str = "job_runner_lock_acquire_seconds";
    /// Counter: times a held lock's extensions failed until it was at risk.
    pub const LOCK_EXTEND_FAILED: &str = "job_runner_lock_extensions_failed_total";
    /// Counter: locks lost while their job ran.
    pub const LOCKS_LOST: &str = "job_runner_locks_lost_total";
    /// Counter: entries reclaimed from stalled or dead consumers.
    pub const RECLAIMED: &str = "job_runner_reclaimed_total";
    /// Counter: jobs dead-lettered, by `reason` class (`malformed`, `unknown_kind`,
    /// `permanent`, `attempts_exhausted`).
    pub const DEAD_LETTERED: &str = "job_runner_dead_lettered_total";
    /// Gauge: entries not yet delivered.
    pub const QUEUE_DEPTH: &str = "job_runner_queue_depth";
    /// Gauge: entries delivered and not acknowledged.
    pub const QUEUE_PENDING: &str = "job_runner_queue_pending";
    /// Gauge: jobs in the delayed set.
    pub const QUEUE_DELAYED: &str = "job_runner_queue_delayed";
    /// Gauge: entries in the dead-letter stream.
    pub const QUEUE_DEAD: &str = "job_runner_queue_dead";
    /// Counter: times the queue node was found to have lost data, by `what` (`wiped`:
    /// restarted empty; `rolled_back`: came back with older data).
    pub const QUEUE_DATA_LOST: &str = "job_runner_queue_data_lost_total";
    /// Counter: payments rejected as stale although their runner held the order's lock:
    /// the lock nodes' token counters went backwards.
    pub const FENCE_REGRESSIONS: &str = "job_runner_fence_regressions_total";
    /// Counter: dead letters dropped, oldest first, to keep the dead-letter stream within
    /// its limit (`max_dead_letters`).
    pub const DEAD_DROPPED: &str = "job_runner_dead_letters_dropped_total";
    /// Gauge: jobs running in this process.
    pub const IN_FLIGHT: &str = "job_runner_jobs_in_flight";
    /// Gauge, by `node` (`host:port`): 1 while the lock node is up, 0 while it is marked
    /// down (its calls fail at once until a probe reaches it).
    pub const LOCK_NODE_UP: &str = "job_runner_lock_node_up";
    /// Counter, by `node`: times the lock node was marked down since the process started.
    pub const LOCK_NODE_MARKED_DOWN: &str = "job_runner_lock_node_marked_down_total";
    /// Counter, by `node`: times the lock node was marked up again.
    pub const LOCK_NODE_MARKED_UP: &str = "job_runner_lock_node_marked_up_total";
}

/// Sets the lock-node health series from `locks`: one `up` gauge and two transition
/// counters per node, labelled with its address (never its password).
pub fn record_lock_nodes(locks: &fencelock::Redlock) {
    for node in locks.node_health() {
        let label = node.node.clone();
        metrics::gauge!(names::LOCK_NODE_UP, "node" => label.clone())
            .set(f64::from(u8::from(node.up)));
        metrics::counter!(names::LOCK_NODE_MARKED_DOWN, "node" => label.clone())
            .absolute(node.marked_down);
        metrics::counter!(names::LOCK_NODE_MARKED_UP, "node" => label).absolute(node.marked_up);
    }
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same
/// handle). Returns `None` if another recorder was installed first.
pub fn install_recorder() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets(&seconds)
                .ok()?
                .install_recorder()
                .ok()?;
            // Counters of rare events show from the start, at 0, so that a dashboard or an
            // alert on their rate sees the series before the first event.
            for name in [
                names::LOCK_EXTEND_FAILED,
                names::LOCKS_LOST,
                names::RECLAIMED,
                names::FENCE_REGRESSIONS,
                names::DEAD_DROPPED,
            ] {
                metrics::counter!(name).absolute(0);
            }
            for what in ["wiped", "rolled_back"] {
                metrics::counter!(names::QUEUE_DATA_LOST, "what" => what).absolute(0);
            }
            Some(handle)
        })
        .clone()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The fetch loop's pulse. The loop beats on every turn, also while it waits for a free
/// worker; `/healthz` fails when the beat stops (the loop is stuck, for example on a
/// queue Redis that accepts connections but never answers) or when fetches keep failing.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    last_beat_ms: AtomicU64,
    failures: AtomicU32,
    reclaim_failures: AtomicU32,
    promote_failures: AtomicU32,
    stopping: AtomicBool,
    stall_after: Duration,
}

/// What `/healthz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthStatus {
    /// The fetch loop turns and its fetches succeed.
    Healthy,
    /// Something is wrong; the text says what.
    Unhealthy(String),
}

impl Health {
    /// A pulse that counts as stuck after `stall_after` without a beat.
    pub fn new(stall_after: Duration) -> Self {
        Health {
            inner: Arc::new(HealthInner {
                last_beat_ms: AtomicU64::new(now_ms()),
                failures: AtomicU32::new(0),
                reclaim_failures: AtomicU32::new(0),
                promote_failures: AtomicU32::new(0),
                stopping: AtomicBool::new(false),
                stall_after,
            }),
        }
    }

    pub(crate) fn beat(&self) {
        self.inner.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn fetch_ok(&self) {
        self.inner.failures.store(0, Ordering::Relaxed);
        self.beat();
    }

    pub(crate) fn fetch_failed(&self) {
        self.inner.failures.fetch_add(1, Ordering::Relaxed);
        self.beat();
    }

    /// Reclaims and promotions are counted apart from fetches: a loop whose fetches
    /// succeed while every reclaim fails leaves crashed runners' jobs stranded for good.
    pub(crate) fn reclaim_done(&self, ok: bool) {
        Self::count(&self.inner.reclaim_failures, ok);
    }

    pub(crate) fn promote_done(&self, ok: bool) {
        Self::count(&self.inner.promote_failures, ok);
    }

    fn count(failures: &AtomicU32, ok: bool) {
        if ok {
            failures.store(0, Ordering::Relaxed);
        } else {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// The state now.
    pub fn status(&self) -> HealthStatus {
        if self.inner.stopping.load(Ordering::Relaxed) {
            return HealthStatus::Unhealthy("shutting down".into());
        }
        let since = now_ms().saturating_sub(self.inner.last_beat_ms.load(Ordering::Relaxed));
        if since > self.inner.stall_after.as_millis() as u64 {
            return HealthStatus::Unhealthy(format!("fetch loop stuck for {since} ms"));
        }
        let failures = self.inner.failures.load(Ordering::Relaxed);
        if failures >= 3 {
            return HealthStatus::Unhealthy(format!("last {failures} fetches failed"));
        }
        let failures = self.inner.reclaim_failures.load(Ordering::Relaxed);
        if failures >= 3 {
            return HealthStatus::Unhealthy(format!("last {failures} reclaims failed"));
        }
        let failures = self.inner.promote_failures.load(Ordering::Relaxed);
        if failures >= 3 {
            return HealthStatus::Unhealthy(format!(
                "last {failures} promotions of delayed jobs failed"
            ));
        }
        HealthStatus::Healthy
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Option<PrometheusHandle>,
    health: Health,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
///
/// # Errors
///
/// When the server fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    health: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(render_health))
        .with_state(Endpoints { metrics, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the address for [`serve`], naming it on failure.
///
/// # Errors
///
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for /metrics: {e}"),
        )
    })
}

async fn render_metrics(State(s): State<Endpoints>) -> (StatusCode, String) {
    match &s.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n".into(),
        ),
    }
}

async fn render_health(State(s): State<Endpoints>) -> (StatusCode, String) {
    match s.health.status() {
        HealthStatus::Healthy => (StatusCode::OK, "ok\n".into()),
        HealthStatus::Unhealthy(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_fetch_loop() {
        let health = Health::new(Duration::from_millis(50));
        assert_eq!(health.status(), HealthStatus::Healthy);
        std::thread::sleep(Duration::from_millis(80));
        let HealthStatus::Unhealthy(why) = health.status() else {
            panic!("a loop that stopped beating is unhealthy");
        };
        assert!(why.starts_with("fetch loop stuck"), "{why}");
        health.beat();
        assert_eq!(health.status(), HealthStatus::Healthy);
        for _ in 0..3 {
            health.fetch_failed();
        }
        assert_eq!(
            health.status(),
            HealthStatus::Unhealthy("last 3 fetches failed".into())
        );
        health.fetch_ok();
        assert_eq!(health.status(), HealthStatus::Healthy);
        for _ in 0..3 {
            health.reclaim_done(false);
            health.fetch_ok();
        }
        assert_eq!(
            health.status(),
            HealthStatus::Unhealthy("last 3 reclaims failed".into()),
            "fetches that succeed do not hide reclaims that fail"
        );
        health.reclaim_done(true);
        assert_eq!(health.status(), HealthStatus::Healthy);
        health.stopping();
        assert!(matches!(health.status(), HealthStatus::Unhealthy(_)));
    }
}
