//! When to try a failed task again: exponential backoff with full jitter,
//! capped, and the attempt limit. Kept apart from *how* a task is retried.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Retry timing and limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts (deliveries plus the producer's `retry_count`) before `max_retries`.
    pub max_attempts: u32,
    /// Delay before the second attempt (milliseconds).
    pub base_delay_ms: u64,
    /// Delay ceiling (milliseconds).
    pub max_delay_ms: u64,
}

impl RetryPolicy {
    /// True when a task that has spent `attempts` may not be tried again.
    pub fn exhausted(&self, attempts: u32) -> bool {
        attempts >= self.max_attempts
    }

    /// Delay before attempt `attempts + 1`: uniform in `[0, min(cap, base * 2^(attempts-1))]`
    /// (full jitter spreads a burst of failures over the window).
    pub fn delay(&self, attempts: u32, rng: &mut impl Rng) -> Duration {
        let exp = attempts.saturating_sub(1).min(20);
        let ceiling = self
            .base_delay_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_delay_ms);
        Duration::from_millis(rng.random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn delays_grow_and_stay_under_the_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 100,
            max_delay_ms: 1_000,
        };
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..30 {
            let ceiling = (100u64 << (attempt - 1).min(20)).min(1_000);
            for _ in 0..50 {
                assert!(p.delay(attempt, &mut rng) <= Duration::from_millis(ceiling));
            }
        }
        let mean: u128 = (0..1000)
            .map(|_| p.delay(10, &mut rng).as_millis())
            .sum::<u128>()
            / 1000;
        assert!(
            (350..650).contains(&mean),
            "full jitter mean near cap/2, got {mean}"
        );
    }

    #[test]
    fn exhausted_at_the_limit() {
        let p = RetryPolicy {
            max_attempts: 3,
            base_delay_ms: 1,
            max_delay_ms: 1,
        };
        assert!(!p.exhausted(2));
        assert!(p.exhausted(3));
    }
}
