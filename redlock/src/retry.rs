//! The retry schedule of [`Redlock::lock`](crate::Redlock::lock), as data.

use std::time::Duration;

use rand::Rng;

/// How many more rounds `lock` makes after a failed one, and how long it waits between them.
///
/// Each wait is `delay` plus a uniformly random jitter in `[0, jitter]`. The jitter spreads
/// competing clients apart so that they do not collide again round after round (redsync has
/// none). Only errors whose [`ErrorKind::is_retryable`](crate::ErrorKind::is_retryable) is
/// true are retried; a bad argument fails at once.
///
/// The default is node-redlock's: 10 retries, 200 ms delay, 200 ms jitter, so a contended
/// `lock` gives up after at most 11 rounds and about 2–4 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    retries: u32,
    delay: Duration,
    jitter: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 10,
            delay: Duration::from_millis(200),
            jitter: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// `retries` more rounds after the first, each after `delay` plus up to `jitter`.
    pub const fn new(retries: u32, delay: Duration, jitter: Duration) -> Self {
        RetryPolicy {
            retries,
            delay,
            jitter,
        }
    }

    /// No retries: `lock` behaves like `try_lock`.
    pub const fn never() -> Self {
        RetryPolicy::new(0, Duration::ZERO, Duration::ZERO)
    }

    /// The number of retries after the first round.
    pub const fn retries(&self) -> u32 {
        self.retries
    }

    /// The fixed part of each wait.
    pub const fn delay(&self) -> Duration {
        self.delay
    }

    /// The largest random addition to each wait.
    pub const fn jitter(&self) -> Duration {
        self.jitter
    }

    /// The longest a full schedule can wait in total, not counting the rounds themselves.
    pub fn max_total_wait(&self) -> Duration {
        self.delay
            .saturating_add(self.jitter)
            .saturating_mul(self.retries)
    }

    /// One wait, drawn from `rng`.
    pub fn next_delay<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let jitter_us = u64::try_from(self.jitter.as_micros()).unwrap_or(u64::MAX);
        self.delay
            .saturating_add(Duration::from_micros(rng.random_range(0..=jitter_us)))
    }

    /// The whole schedule of waits, drawn from `rng`: exactly `retries` of them.
    pub fn schedule<R: Rng>(&self, mut rng: R) -> impl Iterator<Item = Duration> {
        let policy = *self;
        (0..self.retries).map(move |_| policy.next_delay(&mut rng))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    #[test]
    fn default_is_node_redlocks() {
        let p = RetryPolicy::default();
        assert_eq!(p.retries(), 10);
        assert_eq!(p.delay(), Duration::from_millis(200));
        assert_eq!(p.jitter(), Duration::from_millis(200));
        assert_eq!(p.max_total_wait(), Duration::from_secs(4));
    }

    #[test]
    fn schedule_is_deterministic_for_a_seed_and_bounded() {
        let p = RetryPolicy::default();
        let a: Vec<_> = p.schedule(SmallRng::seed_from_u64(7)).collect();
        let b: Vec<_> = p.schedule(SmallRng::seed_from_u64(7)).collect();
        let c: Vec<_> = p.schedule(SmallRng::seed_from_u64(8)).collect();
        assert_eq!(a, b, "same seed, same schedule");
        assert_ne!(a, c, "another seed, another schedule");
        assert_eq!(a.len(), 10);
        for d in &a {
            assert!(*d >= p.delay() && *d <= p.delay() + p.jitter(), "{d:?}");
        }
        // Jitter actually spreads the waits.
        assert!(a.iter().any(|d| *d != a[0]));
    }

    #[test]
    fn never_has_an_empty_schedule() {
        let p = RetryPolicy::never();
        assert_eq!(p.schedule(SmallRng::seed_from_u64(1)).count(), 0);
        assert_eq!(p.max_total_wait(), Duration::ZERO);
    }

    #[test]
    fn huge_delays_saturate_instead_of_panicking() {
        let p = RetryPolicy::new(3, Duration::MAX, Duration::MAX);
        assert_eq!(p.max_total_wait(), Duration::MAX);
        assert_eq!(p.next_delay(&mut SmallRng::seed_from_u64(1)), Duration::MAX);
    }

    #[test]
    fn zero_jitter_is_exactly_the_delay() {
        let p = RetryPolicy::new(3, Duration::from_millis(5), Duration::ZERO);
        let v: Vec<_> = p.schedule(SmallRng::seed_from_u64(3)).collect();
        assert_eq!(v, vec![Duration::from_millis(5); 3]);
    }
}
