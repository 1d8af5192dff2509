//! Fencing tokens under chaos: 5 nodes, 8 tasks in 4 clients take one resource at least
//! 2 000 times (and for at least 15 s) while a seeded chaos task stops, pauses and restarts (empty) random
//! minorities of nodes. The fence counters live for a few milliseconds only, so that the
//! resource is often known by the nodes' high-water marks alone. A checker then requires
//! the history of `(token, acquired, released)` to be strictly increasing in acquisition
//! order, with no two holding windows overlapping.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fencelock::{Redlock, RetryPolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::Cluster;
use tokio::sync::Mutex;

const ACQUISITIONS: usize = 2_000;
/// Long enough for dozens of faults, whatever the acquisition rate.
const MIN_DURATION: Duration = Duration::from_secs(15);
const TTL: Duration = Duration::from_millis(1_000);
/// At least the TTL: a lock granted by a node before it lost its data has expired by then.
const QUARANTINE: Duration = Duration::from_millis(1_500);
/// Shorter than a holding: the counter often expires before the next acquisition.
const FENCE_WINDOW: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy)]
struct Holding {
    token: u64,
    acquired: Instant,
    released: Instant,
}

#[derive(Debug, Default)]
struct Faults {
    restarts: u32,
    pauses: u32,
    stops: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_increase_and_holders_never_overlap_under_chaos() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SmallRng::from_os_rng().random());
    eprintln!("fence_chaos seed: {seed} (rerun with CHAOS_SEED={seed})");
    let cluster = Arc::new(Cluster::start(5).await);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            Redlock::builder()
                .nodes(cluster.urls())
                .node_timeout(Duration::from_millis(100))
                .fencing(true)
                .fence_window(FENCE_WINDOW)
                .restart_quarantine(QUARANTINE)
                .retry(RetryPolicy::new(
                    200,
                    Duration::from_millis(5),
                    Duration::from_millis(20),
                ))
                .build()
                .await
                .unwrap(),
        );
    }

    let history = Arc::new(Mutex::new(Vec::<Holding>::with_capacity(ACQUISITIONS)));
    let failed_calls = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let chaos = {
        let (cluster, done) = (cluster.clone(), done.clone());
        tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut faults = Faults::default();
            // A node is "out" while down or paused (the faults below wait for those to end),
            // and after an empty restart until it votes again (seeded, quarantine over: its
            // `ready` marker is back); at most 2 of 5 are out at once, so a quorum always
            // remains and never more than a minority is without its data (the failure
            // model).
            let mut emptied = [false; 5];
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..300))).await;
                for (i, emptied) in emptied.iter_mut().enumerate() {
                    if *emptied {
                        let mut c = cluster.conn(i).await;
                        *emptied = !redis::AsyncCommands::exists::<_, bool>(
                            &mut c,
                            "fencelock:node:ready",
                        )
                        .await
                        .unwrap_or(false);
                    }
                }
                let out = emptied.iter().filter(|e| **e).count();
                let candidates: Vec<usize> = (0..5).filter(|i| !emptied[*i]).collect();
                if out >= 2 || candidates.is_empty() {
                    continue;
                }
                let i = candidates[rng.random_range(0..candidates.len())];
                match rng.random_range(0..3) {
                    0 => {
                        cluster.restart_empty(i).await;
                        emptied[i] = true;
                        faults.restarts += 1;
                    }
                    1 => {
                        let pause = Duration::from_millis(rng.random_range(100..600));
                        cluster.pause(i).await;
                        tokio::time::sleep(pause).await;
                        cluster.unpause(i).await;
                        faults.pauses += 1;
                    }
                    _ => {
                        // Down for a while, then back empty.
                        cluster.stop(i).await;
                        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
                        cluster.start_again(i).await;
                        emptied[i] = true;
                        faults.stops += 1;
                    }
                }
            }
            faults
        })
    };

    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let locks = clients[t % clients.len()].clone();
            let (history, failed_calls) = (history.clone(), failed_calls.clone());
            let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(t as u64 + 1));
            tokio::spawn(async move {
                while (history.lock().await.len() < ACQUISITIONS
                    || started.elapsed() < MIN_DURATION)
                    && started.elapsed() < Duration::from_secs(120)
                {
                    let guard = match locks.lock("chaos:resource", TTL).await {
                        Ok(g) => g,
                        Err(_) => {
                            failed_calls.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let acquired = Instant::now();
                    let token = guard.fencing_token().expect("fencing is on");
                    // Hold it for a while, as real work would, so that an overlap with
                    // another holder has time to show.
                    let work = Duration::from_micros(rng.random_range(500..4_000));
                    tokio::time::sleep(work.min(guard.validity() / 2)).await;
                    let released = Instant::now();
                    // The holding window must lie within the lock's validity.
                    assert!(released < guard.valid_until(), "held past validity");
                    history.lock().await.push(Holding {
                        token,
                        acquired,
                        released,
                    });
                    let _ = guard.release().await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let faults = chaos.await.unwrap();
    let elapsed = started.elapsed();

    let mut history = history.lock().await.clone();
    history.sort_by_key(|h| h.acquired);
    let mut violations = Vec::new();
    for pair in history.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.token <= a.token {
            violations.push(format!("token {} after {}", b.token, a.token));
        }
        if b.acquired < a.released {
            violations.push(format!("tokens {} and {} held at once", a.token, b.token));
        }
    }
    eprintln!(
        "fence_chaos: {} acquisitions in {:.1}s, {} failed calls, faults {:?}, seed {seed}",
        history.len(),
        elapsed.as_secs_f64(),
        failed_calls.load(Ordering::Relaxed),
        faults
    );
    assert!(violations.is_empty(), "seed {seed}: {violations:?}");
    assert!(
        history.len() >= ACQUISITIONS,
        "only {} acquisitions",
        history.len()
    );
    assert!(
        faults.restarts + faults.stops > 0 && faults.pauses > 0,
        "{faults:?}"
    );

    // Every node is running again: the chaos task undoes each fault before the next.
    cluster.assert_no_keys_within(Duration::from_secs(3)).await;
    Arc::try_unwrap(cluster)
        .ok()
        .expect("no other owner")
        .teardown()
        .await;
}
