//! What a failed minority of nodes costs: the sequential cycle and 64 tasks on five nodes
//! with all up, one a closed port, one paused (`docker pause`, as SIGSTOP), and two closed
//! ports. Each faulty phase follows an untimed second in which the client may notice the
//! fault: the figures are the steady state, which is what a long outage costs.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::support::Cluster;
use crate::{Latency, client, median, parallel, sequential};

/// One scenario of the fault rows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    AllUp,
    OneClosed,
    OnePaused,
    TwoClosed,
}

impl Fault {
    pub(crate) const ALL: [Fault; 4] = [
        Fault::AllUp,
        Fault::OneClosed,
        Fault::OnePaused,
        Fault::TwoClosed,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Fault::AllUp => "all 5 up",
            Fault::OneClosed => "1 of 5 a closed port",
            Fault::OnePaused => "1 of 5 paused",
            Fault::TwoClosed => "2 of 5 closed ports",
        }
    }

    /// The smallest ratio to the all-up figure of the same run that the sequential cycle
    /// must reach.
    pub(crate) fn target(self) -> f64 {
        match self {
            Fault::AllUp => 1.0,
            Fault::OneClosed | Fault::OnePaused => 0.8,
            Fault::TwoClosed => 0.6,
        }
    }
}

/// One scenario's figures in one run.
#[derive(Clone, Copy, Default)]
pub(crate) struct FaultRow {
    pub(crate) seq_rate: f64,
    pub(crate) lat: Latency,
    pub(crate) par_rate: f64,
}

/// A URL at which nothing listens: a port bound and let go at once.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = listener.local_addr().expect("its address").port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

/// Measures one scenario on the cluster's five nodes; node 4 is the one paused.
pub(crate) async fn measure(cluster: &Cluster, fault: Fault) -> FaultRow {
    let mut urls = cluster.urls();
    let closed = match fault {
        Fault::OneClosed => 1,
        Fault::TwoClosed => 2,
        _ => 0,
    };
    for url in urls.iter_mut().rev().take(closed) {
        *url = closed_port_url();
    }
    let locks = client(&urls, false).await;
    if fault == Fault::OnePaused {
        cluster.pause(4).await;
    }
    settle(&locks).await;
    let (seq_rate, acq, rel) = sequential(&locks).await;
    let par_rate = parallel(&locks, 64).await;
    if fault == Fault::OnePaused {
        cluster.unpause(4).await;
    }
    FaultRow {
        seq_rate,
        lat: Latency::of(&acq, &rel),
        par_rate,
    }
}

/// An untimed second of cycles, in which a client may find out which nodes are down.
async fn settle(locks: &fencelock::Redlock) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        let guard = locks.lock("bench:settle", crate::TTL).await.expect("lock");
        guard.release().await.expect("release");
    }
}

/// Prints the fault table: medians over the runs, each faulty figure also as a ratio to
/// the all-up figure of its own run.
pub(crate) fn report(rows: &[Vec<FaultRow>]) {
    let all_up = &rows[0];
    println!(
        "\nwhat a failed minority costs, 5 nodes, medians of {} runs (ratios: medians of the per-run ratios to all up; targets in parentheses):\n",
        all_up.len()
    );
    println!(
        "| scenario | seq cycles/s | vs all up | acquire p50 | acquire p99 | release p50 | release p99 | 64 tasks cycles/s | vs all up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (fault, runs) in Fault::ALL.iter().zip(rows) {
        let m = |f: fn(&FaultRow) -> f64| median(runs.iter().map(f).collect());
        let ratio = |f: fn(&FaultRow) -> f64| {
            median(
                runs.iter()
                    .zip(all_up)
                    .map(|(r, up)| f(r) / f(up))
                    .collect(),
            )
        };
        let target = |t: f64| {
            if *fault == Fault::AllUp {
                String::new()
            } else {
                format!(" (>= {t})")
            }
        };
        println!(
            "| {} | {:.0} | {:.2}x{} | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0} | {:.2}x{} |",
            fault.label(),
            m(|r| r.seq_rate),
            ratio(|r| r.seq_rate),
            target(fault.target()),
            m(|r| r.lat.acq_p50),
            m(|r| r.lat.acq_p99),
            m(|r| r.lat.rel_p50),
            m(|r| r.lat.rel_p99),
            m(|r| r.par_rate),
            ratio(|r| r.par_rate),
            target(0.8),
        );
    }
}
