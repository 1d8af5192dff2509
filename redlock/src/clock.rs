//! Where a `Duration` meets the monotonic clock or the wire. Every such place goes through
//! here, so that no setting, however large, overflows an `Instant` (which panics) or is
//! truncated on its way to a node (which silently shortens a TTL).

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: what "never" means for a deadline.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `from + d`, or a deadline that never comes when that does not fit in an `Instant`.
pub(crate) fn after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(FAR_FUTURE))
        .unwrap_or(from)
}

/// `d` in whole milliseconds, rounded up: a TTL sent to a node is never shorter than the
/// one the client counts validity from. Saturates at `u64::MAX`.
pub(crate) fn millis_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_up_and_saturate() {
        assert_eq!(millis_ceil(Duration::ZERO), 0);
        assert_eq!(millis_ceil(Duration::from_micros(1)), 1);
        assert_eq!(millis_ceil(Duration::from_micros(1_999)), 2);
        assert_eq!(millis_ceil(Duration::from_millis(2)), 2);
        assert_eq!(millis_ceil(Duration::MAX), u64::MAX);
    }

    #[test]
    fn deadlines_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }
}
