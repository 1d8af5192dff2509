//! The `payment` handler: the seed's `processPayment` made real.
//!
//! Under the order's lock: check that the order is pending, charge it through a
//! [`Gateway`], and mark it paid in one ledger transaction that carries the fencing token.
//! The [`Ledger`] rejects the write if a newer holder has been at the order since, so a
//! holder that paused past its lock's expiry cannot pay the order a second time. An order
//! already paid is a success that charges nothing, so duplicate jobs are harmless.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::error;
use crate::handler::{Handler, HandlerError, JobContext};
use crate::job::Job;
use crate::ledger::{Begin, Commit, Holder, Ledger, LedgerError, Outcome, Writer};

/// A payment job's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    /// The order to pay.
    pub order_id: i64,
    /// How much, in cents.
    pub amount_cents: i64,
}

/// One charge, as the gateway is asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// The order.
    pub order_id: i64,
    /// The amount in cents.
    pub amount_cents: i64,
    /// Repeats of a request with the same key return the first charge instead of charging
    /// again, as with real payment gateways' idempotency keys.
    pub idempotency_key: String,
}

/// Why a charge failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// Whether the same charge may succeed later.
    pub transient: bool,
    /// What the gateway said.
    pub message: String,
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GatewayError {}

/// A payment gateway.
pub trait Gateway: Send + Sync + 'static {
    /// Charges the order; returns the gateway's charge id.
    fn charge(
        &self,
        request: &ChargeRequest,
    ) -> impl Future<Output = Result<String, GatewayError>> + Send;
}

/// A gateway for demos and tests: charges after a random latency, fails a fraction of
/// calls, and can freeze its thread to imitate a stop-the-world pause.
#[derive(Clone)]
pub struct SimulatedGateway {
    inner: Arc<SimInner>,
}

struct SimInner {
    latency: (Duration, Duration),
    failure_rate: f64,
    pauses: Mutex<HashMap<i64, Duration>>,
    rng: Mutex<SmallRng>,
    charges: Mutex<HashSet<String>>,
}

impl fmt::Debug for SimulatedGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedGateway")
            .field("latency", &self.inner.latency)
            .field("failure_rate", &self.inner.failure_rate)
            .finish_non_exhaustive()
    }
}

impl Default for SimulatedGateway {
    fn default() -> Self {
        SimulatedGateway::new(Duration::ZERO, Duration::ZERO, 0.0)
    }
}

impl SimulatedGateway {
    /// Charges take between `min` and `max` latency; a `failure_rate` fraction of them
    /// fail transiently.
    pub fn new(min: Duration, max: Duration, failure_rate: f64) -> Self {
        SimulatedGateway {
            inner: Arc::new(SimInner {
                latency: (min, max.max(min)),
                failure_rate: failure_rate.clamp(0.0, 1.0),
                pauses: Mutex::new(HashMap::new()),
                rng: Mutex::new(SmallRng::from_os_rng()),
                charges: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The next charge of `order_id` blocks its thread for `pause` before it returns,
    /// with the charge made: on a current-thread runtime this freezes the whole worker,
    /// lock watchdog included, like a long GC pause.
    pub fn pause_once(&self, order_id: i64, pause: Duration) {
        self.lock(&self.inner.pauses).insert(order_id, pause);
    }

    /// Distinct charges made (by idempotency key).
    pub fn charges(&self) -> usize {
        self.lock(&self.inner.charges).len()
    }

    fn lock<'a, T>(&self, m: &'a Mutex<T>) -> std::sync::MutexGuard<'a, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Gateway for SimulatedGateway {
    async fn charge(&self, request: &ChargeRequest) -> Result<String, GatewayError> {
        let (latency, fail) = {
            let mut rng = self.lock(&self.inner.rng);
            let (min, max) = self.inner.latency;
            let latency = if max > min {
                rng.random_range(min..=max)
            } else {
                min
            };
            (latency, rng.random_bool(self.inner.failure_rate))
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if fail {
            return Err(GatewayError {
                transient: true,
                message: "simulated gateway failure".into(),
            });
        }
        self.lock(&self.inner.charges)
            .insert(request.idempotency_key.clone());
        let pause = self.lock(&self.inner.pauses).remove(&request.order_id);
        if let Some(pause) = pause {
            // Deliberately blocking: the point is to stop the thread, watchdog and all.
            std::thread::sleep(pause);
        }
        Ok(format!("ch_{}", request.idempotency_key))
    }
}

/// The `payment` handler.
#[derive(Debug, Clone)]
pub struct PaymentHandler<G> {
    ledger: Ledger,
    gateway: G,
}

impl<G: Gateway> PaymentHandler<G> {
    /// Pays orders in `ledger` through `gateway`.
    pub fn new(ledger: Ledger, gateway: G) -> Self {
        PaymentHandler { ledger, gateway }
    }
}

async fn blocking<T, F>(ledger: &Ledger, f: F) -> Result<T, HandlerError>
where
    T: Send + 'static,
    F: FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
{
    let ledger = ledger.clone();
    match tokio::task::spawn_blocking(move || f(&ledger)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.is_retryable() => Err(HandlerError::transient(error::chain(&e))),
        Ok(Err(e @ LedgerError::AmountMismatch { .. })) => {
            Err(HandlerError::permanent(error::chain(&e)))
        }
        Ok(Err(e)) => Err(HandlerError::transient(error::chain(&e))),
        Err(e) => Err(HandlerError::transient(format!("ledger task failed: {e}"))),
    }
}

/// This holder's attempt at an order, owned, so each blocking ledger call can take a copy:
/// what every write records beside its outcome.
#[derive(Clone)]
struct Attempt {
    token: u64,
    worker: Arc<str>,
    job_id: Arc<str>,
}

impl Attempt {
    fn holder(&self) -> Holder<'_> {
        Holder {
            token: self.token,
            worker: &self.worker,
            job_id: &self.job_id,
        }
    }

    fn writer(&self, started_us: i64) -> Writer<'_> {
        self.holder().writer(started_us)
    }
}

impl<G: Gateway> Handler for PaymentHandler<G> {
    async fn handle(&self, job: &Job, ctx: JobContext) -> Result<(), HandlerError> {
        let payment: Payment = serde_json::from_value(job.payload.clone()).map_err(|e| {
            HandlerError::permanent(format!(
                "payment payload must be {{\"order_id\": int, \"amount_cents\": int}}: {e}"
            ))
        })?;
        // The fence is per order, so the lock must be too: tokens of another resource's
        // lock come from another counter, and would fence this order wrongly either way.
        let resource = format!("order:{}", payment.order_id);
        if job.resource != resource {
            return Err(HandlerError::permanent(format!(
                "a payment of order {} must run under the lock `{resource}`, not `{}`",
                payment.order_id, job.resource
            )));
        }
        if payment.amount_cents <= 0 {
            return Err(HandlerError::permanent(format!(
                "amount_cents must be positive, got {}",
                payment.amount_cents
            )));
        }
        let token = ctx.fencing_token;
        let attempt = Attempt {
            token,
            worker: ctx.worker.clone(),
            job_id: job.id.as_str().into(),
        };

        let begin = {
            let attempt = attempt.clone();
            blocking(&self.ledger, move |l| {
                l.begin(payment.order_id, payment.amount_cents, attempt.holder())
            })
            .await?
        };
        let started_us = match begin {
            Begin::AlreadyPaid => return Ok(()),
            Begin::Stale { fence } => {
                if matches!(ctx.lock.state(), fencelock::LockState::Held) {
                    // A stale holder has lost its lock; this one holds it. So the lock
                    // nodes hand out tokens below ones they handed out before.
                    metrics::counter!(crate::telemetry::names::FENCE_REGRESSIONS).increment(1);
                    tracing::error!(
                        token,
                        fence,
                        order = payment.order_id,
                        "fencing token below the order's fence although this runner holds the \
                         order's lock: the lock nodes' token counters went backwards (did a \
                         majority lose its data?); every such order is rejected until they \
                         pass the fence"
                    );
                }
                return Err(HandlerError::transient(format!(
                    "fencing token {token} is stale: order {} has seen token {fence}",
                    payment.order_id
                )));
            }
            Begin::Pending { started_us } => started_us,
        };
        if ctx.cancel.is_cancelled() {
            return Err(HandlerError::transient("cancelled before charging"));
        }
        let request = ChargeRequest {
            order_id: payment.order_id,
            amount_cents: payment.amount_cents,
            idempotency_key: format!("order-{}", payment.order_id),
        };
        // A cancelled call may or may not have charged: it is logged as an attempt, and the
        // retry's charge carries the same idempotency key. A call that returns is recorded
        // whatever the cancel signal says meanwhile: the fence, not the signal, decides
        // whether the write counts.
        let charged = tokio::select! {
            r = self.gateway.charge(&request) => r,
            () = ctx.cancel.cancelled() => {
                blocking(&self.ledger, move |l| {
                    l.record(payment.order_id, attempt.writer(started_us), Outcome::Cancelled)
                })
                .await?;
                return Err(HandlerError::transient("cancelled while charging"));
            }
        };
        let charge_id = match charged {
            Ok(id) => id,
            Err(e) => {
                let attempt = attempt.clone();
                blocking(&self.ledger, move |l| {
                    l.record(
                        payment.order_id,
                        attempt.writer(started_us),
                        Outcome::GatewayFailed,
                    )
                })
                .await?;
                return Err(if e.transient {
                    HandlerError::transient(format!("gateway: {e}"))
                } else {
                    HandlerError::permanent(format!("gateway refused the charge: {e}"))
                });
            }
        };
        let commit = blocking(&self.ledger, move |l| {
            l.commit(payment.order_id, &charge_id, attempt.writer(started_us))
        })
        .await?;
        match commit {
            Commit::Charged | Commit::AlreadyPaid => Ok(()),
            Commit::Stale { fence } => Err(HandlerError::transient(format!(
                "ledger rejected stale fencing token {token}: order {} has seen token {fence}",
                payment.order_id
            ))),
        }
    }
}
