//! How long a job waits before it runs again.

use std::time::Duration;

use rand::Rng;

/// The longest a job whose lock keeps being held elsewhere waits before it tries again.
pub(crate) const MAX_CONTENDED_DELAY: Duration = Duration::from_secs(5);

/// The delay before a job whose lock was held elsewhere tries again, after `requeues`
/// such tries in a row: `first` doubling each time, at most [`MAX_CONTENDED_DELAY`], with
/// jitter over its upper half. Jobs waiting on one busy resource then go round less and
/// less often, and leave the workers to other resources' jobs, instead of each coming
/// back every `first` for as long as the holder runs.
pub(crate) fn contended_delay(first: Duration, requeues: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = first
        .saturating_mul(1u32 << requeues.min(16))
        .min(MAX_CONTENDED_DELAY.max(first));
    ceiling / 2 + rng.random_range(Duration::ZERO..=ceiling - ceiling / 2)
}

/// The delay before a job whose lock quorum could not be reached tries again: the nodes
/// need time to come back, and every waiting job should not hit them at once.
pub(crate) fn unreachable_delay(rng: &mut impl Rng) -> Duration {
    Duration::from_millis(500) + rng.random_range(Duration::ZERO..=Duration::from_secs(1))
}

/// The delay before the retry that follows failed attempt number `attempt` (0 for the
/// first): `base` doubling per attempt, at most `max`, with full jitter that never goes
/// below a tenth of the step, so that a burst of failures spreads out but still backs off.
pub(crate) fn backoff_delay(
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: &mut impl Rng,
) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(max);
    let floor = ceiling / 10;
    floor + rng.random_range(Duration::ZERO..=ceiling - floor)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    #[test]
    fn contended_requeues_back_off_up_to_a_cap() {
        let first = Duration::from_millis(250);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut last_low = Duration::ZERO;
        for requeues in 0..40u32 {
            let delays: Vec<Duration> = (0..200)
                .map(|_| contended_delay(first, requeues, &mut rng))
                .collect();
            let low = *delays.iter().min().unwrap();
            let high = *delays.iter().max().unwrap();
            let ceiling = (first * 2u32.pow(requeues.min(16))).min(MAX_CONTENDED_DELAY);
            assert!(
                low >= ceiling / 2 && high <= ceiling,
                "{requeues}: {low:?}..{high:?}"
            );
            assert!(low >= last_low, "{requeues}: the wait never shrinks");
            last_low = ceiling / 2;
        }
        // After a handful of tries a waiting job comes back at most every 2.5-5 s, not
        // every 0-250 ms.
        assert!(contended_delay(first, 6, &mut rng) >= MAX_CONTENDED_DELAY / 2);
        assert_eq!(contended_delay(Duration::ZERO, 3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_inside_each_step() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        let mut rng = SmallRng::seed_from_u64(7);
        for attempt in 0..40u32 {
            let ceiling = (base * 2u32.pow(attempt.min(20))).min(max);
            let delays: Vec<Duration> = (0..500)
                .map(|_| backoff_delay(base, max, attempt, &mut rng))
                .collect();
            let low = *delays.iter().min().unwrap();
            let high = *delays.iter().max().unwrap();
            assert!(
                low >= ceiling / 10 && high <= ceiling,
                "attempt {attempt}: delays {low:?}..{high:?} outside {:?}..{ceiling:?}",
                ceiling / 10
            );
            // Jittered: 500 draws cover most of the step, not one point of it.
            assert!(
                high - low > ceiling / 2,
                "attempt {attempt}: delays {low:?}..{high:?} are not spread over the step"
            );
        }
    }
}
