//! Tasks of one process that want the same resource queue in-process: `try_lock` fails at
//! once without asking the nodes, and `lock` gets the resource as soon as the holder
//! releases, handed over without the keys ever being free: as it is, with no round (and
//! with fencing the next reserved token), while its validity lasts, else in one swap round.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fencelock::sim::{SimCluster, SimOptions};
use fencelock::{Error, ErrorKind, Redlock, RedlockBuilder, RetryPolicy};
use support::{Cluster, TEST_NODE_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_waiters_are_handed_the_lock_without_retry_delay() {
    let cluster = Cluster::start(3).await;
    let locks = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        // A long retry delay: a waiter that went through Redis retries would need >= 2 s.
        .retry(RetryPolicy::new(3, Duration::from_secs(2), Duration::ZERO))
        .build()
        .await
        .unwrap();
    let held = locks
        .lock("local:r", Duration::from_secs(10))
        .await
        .unwrap();

    let err = locks
        .try_lock("local:r", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Contended);
    assert!(
        matches!(err, Error::Contended { attempts: 0, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "lock on `local:r` is held by another task of this process"
    );

    let waiter = {
        let locks = locks.clone();
        tokio::spawn(async move {
            let guard = locks.lock("local:r", Duration::from_secs(10)).await;
            (Instant::now(), guard)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the waiter must wait for the holder");
    let (value, validity) = (held.value().to_owned(), held.validity());
    let released_at = Instant::now();
    held.release().await.unwrap();
    let (got_at, guard) = waiter.await.unwrap();
    let guard = guard.expect("the waiter gets the lock");
    let handoff = got_at.duration_since(released_at);
    assert!(
        handoff < Duration::from_secs(1),
        "hand-off took {handoff:?}"
    );
    // The lock passed as it was, without a round: same value, and no more validity than
    // the holder had left; the nodes still hold it, and a node-redlock-style client is
    // still refused.
    assert_eq!(guard.value(), value);
    assert!(guard.validity() <= validity);
    assert!(
        guard.validity() > Duration::from_secs(9),
        "{:?}",
        guard.validity()
    );
    cluster.wait_all_hold("local:r", guard.value()).await;
    for i in 0..3 {
        assert!(
            !cluster.foreign_set_nx(i, "local:r", "intruder").await,
            "node {i} was free"
        );
    }
    guard.release().await.unwrap();
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

/// Within a hand-off chain the keys are never free: an intruder spinning on `SET NX`
/// against one node never gets in while tasks of the process pass the lock along, here
/// with every hand-off a swap round. Tokens grow along the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_never_free_during_swap_hand_offs() {
    chain_against_an_intruder(true).await;
}

/// The same with hand-offs as they are by default: without a round, with the next of the
/// tokens reserved in the last round, until the reserved run is used up; then a swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_never_free_during_hand_offs_without_rounds() {
    chain_against_an_intruder(false).await;
}

/// Every task queues before the chain starts, so each release but the last finds a waiter
/// and hands off; a task that queued late would find none and release for real, which is
/// how the lock is meant to behave, not a gap in the chain.
async fn chain_against_an_intruder(swap_every_hand_off: bool) {
    const TASKS: usize = 80;
    let cluster = Cluster::start(3).await;
    let builder = Redlock::builder()
        .nodes(cluster.urls())
        .node_timeout(TEST_NODE_TIMEOUT)
        .max_local_handoffs(usize::MAX)
        .fencing(true);
    let locks = if swap_every_hand_off {
        builder
            .build_with(SimOptions::default().swap_every_hand_off())
            .await
    } else {
        builder.build().await
    }
    .unwrap();
    // Held on every node before the intruder starts, so a win can only come from a gap.
    let first = locks
        .lock("local:chain", Duration::from_secs(10))
        .await
        .unwrap();
    cluster.wait_all_hold("local:chain", first.value()).await;
    let started = Arc::new(AtomicBool::new(false));
    let chain_over = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let intruder = {
        let (started, chain_over, done) = (started.clone(), chain_over.clone(), done.clone());
        let mut c = cluster.conn(0).await;
        tokio::spawn(async move {
            let (mut tries, mut wins) = (0u32, 0u32);
            while !done.load(Ordering::SeqCst) {
                let during_chain = started.load(Ordering::SeqCst);
                let reply: redis::Value = redis::cmd("SET")
                    .arg("local:chain")
                    .arg("intruder")
                    .arg("NX")
                    .arg("PX")
                    .arg(50)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                // Read after the reply: if the last release had not begun by then, the SET
                // ran while the chain held the key.
                if !chain_over.load(Ordering::SeqCst) {
                    tries += u32::from(during_chain);
                    wins += u32::from(reply != redis::Value::Nil);
                }
            }
            (tries, wins)
        })
    };
    let queued = Arc::new(AtomicUsize::new(0));
    let taken = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(vec![first.fencing_token().unwrap()]));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (locks, queued, taken, chain_over, tokens) = (
                locks.clone(),
                queued.clone(),
                taken.clone(),
                chain_over.clone(),
                tokens.clone(),
            );
            tokio::spawn(async move {
                // `lock` joins the local queue in its first poll, the same one as this count.
                queued.fetch_add(1, Ordering::SeqCst);
                let g = locks
                    .lock("local:chain", Duration::from_secs(10))
                    .await
                    .unwrap();
                tokens.lock().unwrap().push(g.fencing_token().unwrap());
                // Long enough for the intruder to try a few times per holder: hand-offs
                // without a round take no time at all.
                tokio::time::sleep(Duration::from_millis(1)).await;
                if taken.fetch_add(1, Ordering::SeqCst) + 1 == TASKS {
                    chain_over.store(true, Ordering::SeqCst);
                }
                g.release().await.unwrap();
            })
        })
        .collect();
    while queued.load(Ordering::SeqCst) < TASKS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The last count may land a moment before its task's first poll is over.
    tokio::time::sleep(Duration::from_millis(20)).await;
    started.store(true, Ordering::SeqCst);
    first.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (tries, wins) = intruder.await.unwrap();
    assert!(
        tries >= 10,
        "the intruder must actually have tried during the chain ({tries})"
    );
    assert_eq!(
        wins, 0,
        "the keys were free {wins} times while the chain held them"
    );
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), TASKS + 1);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must grow along the chain: {tokens:?}"
    );
    cluster.assert_no_keys().await;
    cluster.teardown().await;
}

/// A slow node's grant from a hand-off round can arrive after that holder has already
/// passed the lock on. It set a value the chain still owns, so it must not be taken back
/// while the chain goes on: that would leave the node free, and every later hand-off would
/// then run on a bare quorum. Model nodes on a paused clock make the late grants certain.
#[test]
fn a_slow_nodes_late_grants_stay_with_the_chain() {
    const TASKS: usize = 40;
    on_paused_clock(async {
        let cluster = SimCluster::new(3, 7);
        cluster.node(0).set_max_delay(Duration::from_millis(5));
        for i in 1..3 {
            cluster.node(i).set_max_delay(Duration::from_micros(100));
        }
        // Hand-offs here are all swap rounds, whose late grants this is about.
        let locks = model_builder()
            .max_local_handoffs(usize::MAX)
            .build_simulated_with(&cluster, SimOptions::default().swap_every_hand_off())
            .await
            .unwrap();
        let first = locks
            .lock("local:slow", Duration::from_secs(10))
            .await
            .unwrap();
        while cluster.node(0).holds("local:slow").is_none() {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let chain_over = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (locks, taken, chain_over) = (locks.clone(), taken.clone(), chain_over.clone());
                tokio::spawn(async move {
                    let g = locks
                        .lock("local:slow", Duration::from_secs(10))
                        .await
                        .unwrap();
                    // The last holder's release is real: watching stops before it.
                    if taken.fetch_add(1, Ordering::SeqCst) + 1 == TASKS {
                        chain_over.store(true, Ordering::SeqCst);
                    }
                    // Passed on long before node 0 answers this holder's round.
                    g.release().await.unwrap();
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let observer = {
            let (cluster, chain_over) = (cluster.clone(), chain_over.clone());
            tokio::spawn(async move {
                let (mut samples, mut free) = (0u32, 0u32);
                while !chain_over.load(Ordering::SeqCst) {
                    samples += 1;
                    free += u32::from(cluster.node(0).holds("local:slow").is_none());
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
                (samples, free)
            })
        };
        first.release().await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let (samples, free) = observer.await.unwrap();
        assert!(samples >= 10, "the observer must have looked ({samples})");
        assert_eq!(free, 0, "node 0 was free in {free} of {samples} samples");
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..3 {
            assert_eq!(cluster.node(i).holds("local:slow"), None, "node {i}");
        }
    });
}

/// A `lock` dropped mid-round passes this process's turn on only once its partial keys are
/// gone: the next local waiter's first round is not refused by them, so it does not sit
/// out a retry delay. Model nodes on a paused clock; each seed is one interleaving.
#[test]
fn a_cancelled_acquire_passes_its_turn_on_after_its_keys_are_gone() {
    const KEY: &str = "local:cancelled";
    let mut checked = 0;
    for seed in 0..24 {
        let waited = on_paused_clock(async {
            let cluster = SimCluster::new(3, seed);
            for i in 0..3 {
                cluster.node(i).set_max_delay(Duration::from_millis(5));
            }
            let locks = model_builder().build_simulated(&cluster).await.unwrap();
            let first = {
                let locks = locks.clone();
                tokio::spawn(async move { locks.lock(KEY, Duration::from_secs(10)).await })
            };
            tokio::task::yield_now().await;
            let second = {
                let locks = locks.clone();
                tokio::spawn(async move {
                    let start = tokio::time::Instant::now();
                    let guard = locks.lock(KEY, Duration::from_secs(10)).await.unwrap();
                    let waited = start.elapsed();
                    guard.release().await.unwrap();
                    waited
                })
            };
            // Cancel the first once its keys sit on a quorum but before it has heard so.
            let held = || {
                (0..3)
                    .filter(|&i| cluster.node(i).holds(KEY).is_some())
                    .count()
            };
            while held() < 2 && !first.is_finished() {
                tokio::time::sleep(Duration::from_micros(10)).await;
            }
            if first.is_finished() {
                second.abort();
                return None;
            }
            first.abort();
            let waited = second.await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            for i in 0..3 {
                assert_eq!(cluster.node(i).holds(KEY), None, "seed {seed}: node {i}");
            }
            Some(waited)
        });
        let Some(waited) = waited else { continue };
        checked += 1;
        // The default retry delay is at least 200 ms; the release takes at most one node
        // timeout (50 ms) and the second's round a few ms.
        assert!(
            waited < Duration::from_millis(100),
            "seed {seed}: the next waiter got the lock after {waited:?}, so its first round was refused"
        );
    }
    assert!(
        checked >= 12,
        "too few seeds cancelled mid-round: {checked}"
    );
}

/// A lock handed on while its validity lasts takes no round at all: with every node
/// paused, a chain of local waiters still gets through, each with the holder's value and
/// deadline, and with fencing each with the next token. The chain's last holder then
/// releases for real.
#[test]
fn a_hand_off_within_the_validity_needs_no_round() {
    const KEY: &str = "local:no-round";
    for fencing in [false, true] {
        on_paused_clock(async {
            let cluster = SimCluster::new(3, 3);
            let locks = model_builder()
                .fencing(fencing)
                .build_simulated(&cluster)
                .await
                .unwrap();
            let first = locks.lock(KEY, Duration::from_secs(10)).await.unwrap();
            let (value, deadline, token) = (
                first.value().to_owned(),
                tokio::time::Instant::now() + first.validity(),
                first.fencing_token(),
            );
            assert_eq!(token.is_some(), fencing);
            let waiters: Vec<_> = (0..4)
                .map(|_| {
                    let locks = locks.clone();
                    tokio::spawn(async move { locks.lock(KEY, Duration::from_secs(10)).await })
                })
                .collect();
            tokio::task::yield_now().await;
            for i in 0..3 {
                cluster.node(i).pause();
            }
            let mut holder = first;
            for (n, waiter) in waiters.into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                holder.release().await.unwrap();
                holder = tokio::time::timeout(Duration::from_millis(1), waiter)
                    .await
                    .unwrap_or_else(|_| panic!("fencing {fencing}: waiter {n} needed the nodes"))
                    .unwrap()
                    .unwrap();
                assert_eq!(holder.value(), value, "fencing {fencing}: waiter {n}");
                let its_deadline = tokio::time::Instant::now() + holder.validity();
                assert!(
                    its_deadline <= deadline && deadline - its_deadline < Duration::from_millis(1),
                    "fencing {fencing}: waiter {n}: the chain's deadline is kept, not renewed"
                );
                assert_eq!(
                    holder.fencing_token(),
                    token.map(|t| t + 1 + n as u64),
                    "waiter {n}"
                );
            }
            for i in 0..3 {
                cluster.node(i).unpause();
                assert_eq!(cluster.node(i).holds(KEY).as_deref(), Some(value.as_str()));
            }
            holder.release().await.unwrap();
            for i in 0..3 {
                assert_eq!(cluster.node(i).holds(KEY), None, "node {i}");
            }
            // The tokens handed on were reserved: the next acquisition outranks them all.
            if fencing {
                let next = locks.lock(KEY, Duration::from_secs(10)).await.unwrap();
                assert!(next.fencing_token() > token.map(|t| t + 4));
                next.release().await.unwrap();
            }
        });
    }
}

/// Once the chain's validity has fallen below what a fresh round would give (the TTL less
/// drift and the node timeout), a hand-off is a swap round: a fresh value, a fresh
/// deadline, and with fencing a larger token.
#[test]
fn a_hand_off_swaps_once_the_validity_runs_low() {
    const KEY: &str = "local:swap";
    for fencing in [false, true] {
        on_paused_clock(async {
            let cluster = SimCluster::new(3, 5);
            let locks = model_builder()
                .fencing(fencing)
                .build_simulated(&cluster)
                .await
                .unwrap();
            let ttl = Duration::from_secs(1);
            let first = locks.lock(KEY, ttl).await.unwrap();
            let waiter = {
                let locks = locks.clone();
                tokio::spawn(async move { locks.lock(KEY, ttl).await })
            };
            // 100 ms in, 890 ms of validity are left: under the floor of 1 000 less 10 ms
            // of drift and 50 ms of node timeout.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let left = first.validity();
            let (value, token) = (first.value().to_owned(), first.fencing_token());
            first.release().await.unwrap();
            let second = waiter.await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_ne!(second.value(), value, "fencing {fencing}");
            assert!(second.validity() > left, "fencing {fencing}");
            assert_eq!(second.fencing_token().is_some(), fencing);
            if fencing {
                assert!(second.fencing_token() > token);
            }
            for i in 0..3 {
                assert_eq!(
                    cluster.node(i).holds(KEY).as_deref(),
                    Some(second.value()),
                    "fencing {fencing}: node {i}"
                );
            }
            second.release().await.unwrap();
            for i in 0..3 {
                assert_eq!(cluster.node(i).holds(KEY), None, "node {i}");
            }
        });
    }
}

/// With fencing, a chain hands on without a round only the tokens its last round reserved
/// (`max_local_handoffs`, at most 64): the hand-off after that is a swap round, and the
/// tokens keep growing across it.
#[test]
fn a_fenced_chain_swaps_once_its_reserved_tokens_run_out() {
    const KEY: &str = "local:reserved";
    const WAITERS: usize = 70;
    on_paused_clock(async {
        let cluster = SimCluster::new(3, 13);
        let locks = model_builder()
            .max_local_handoffs(usize::MAX)
            .fencing(true)
            .build_simulated(&cluster)
            .await
            .unwrap();
        let first = locks.lock(KEY, Duration::from_secs(10)).await.unwrap();
        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                let locks = locks.clone();
                tokio::spawn(async move { locks.lock(KEY, Duration::from_secs(10)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let mut seen = vec![(first.value().to_owned(), first.fencing_token().unwrap())];
        let mut holder = first;
        for waiter in waiters {
            holder.release().await.unwrap();
            holder = waiter.await.unwrap().unwrap();
            seen.push((holder.value().to_owned(), holder.fencing_token().unwrap()));
        }
        holder.release().await.unwrap();
        assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "{seen:?}");
        // The first holder and the 64 after it share the first round's value.
        let swaps: Vec<usize> = (1..seen.len())
            .filter(|&i| seen[i].0 != seen[i - 1].0)
            .collect();
        assert_eq!(swaps, [65], "hand-offs that took a round");
        for i in 0..3 {
            assert_eq!(cluster.node(i).holds(KEY), None, "node {i}");
        }
    });
}

/// A node that missed a hand-off still holds the chain's earlier value, which the chain
/// owns: `extend` renews it there too, so that node does not fall free at the old TTL
/// while the lock is held (which would leave the lock one failure from losing its quorum).
#[test]
fn extend_renews_a_node_that_missed_a_hand_off() {
    const KEY: &str = "local:extend-chain";
    on_paused_clock(async {
        let cluster = SimCluster::new(3, 9);
        let locks = model_builder()
            .build_simulated_with(&cluster, SimOptions::default().swap_every_hand_off())
            .await
            .unwrap();
        let first = locks.lock(KEY, Duration::from_secs(1)).await.unwrap();
        let old = first.value().to_owned();
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(KEY, Duration::from_secs(1)).await })
        };
        tokio::task::yield_now().await;
        // Node 2 loses the swap: the round decides on nodes 0 and 1.
        cluster.node(2).set_drop_rate(1.0);
        first.release().await.unwrap();
        let mut second = waiter.await.unwrap().unwrap();
        cluster.node(2).set_drop_rate(0.0);
        assert_ne!(second.value(), old);
        assert_eq!(cluster.node(2).holds(KEY).as_deref(), Some(old.as_str()));

        second.extend(Duration::from_secs(5)).await.unwrap();
        // Past the first TTL, well within the extension.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            cluster.node(2).holds(KEY).as_deref(),
            Some(old.as_str()),
            "node 2's key was not renewed"
        );
        for i in 0..2 {
            assert_eq!(cluster.node(i).holds(KEY).as_deref(), Some(second.value()));
        }
        second.release().await.unwrap();
        for i in 0..3 {
            assert_eq!(cluster.node(i).holds(KEY), None, "node {i}");
        }
    });
}

/// Runs `test` on a current-thread runtime whose clock is paused: model nodes and the
/// client then run on virtual time, deterministically.
fn on_paused_clock<F: std::future::Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(test)
}

/// A builder for a client of model nodes, with a node timeout of 50 ms.
fn model_builder() -> RedlockBuilder {
    Redlock::builder().node_timeout(Duration::from_millis(50))
}
