//! Batching policy: batches are keyed by route, shared prompt prefix and
//! priority, and sealed when full or when their oldest task has waited
//! `max_wait`. Plain data and functions; the Assembler drives them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routing::Route;
use crate::task::Priority;

/// How one priority's batches are sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPolicy {
    /// Seal when this many tasks are in the batch.
    pub max_size: usize,
    /// Seal when the first task has waited this long (milliseconds).
    pub max_wait_ms: u64,
    /// Seal at once when the priority's queue is drained: with nothing more
    /// waiting, holding the batch open only adds latency.
    #[serde(default = "default_true")]
    pub seal_when_drained: bool,
}

fn default_true() -> bool {
    true
}

impl BatchPolicy {
    /// `max_wait` as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// What groups tasks into one batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    /// Priority class.
    pub priority: Priority,
    /// Provider and model.
    pub route: Route,
    /// Shared prompt prefix hash.
    pub prefix: u64,
}

/// Whether adding a task fills the batch.
pub fn is_full(len: usize, policy: &BatchPolicy) -> bool {
    len >= policy.max_size.max(1)
}

/// How full a sealed batch is, for the fill-ratio histogram.
pub fn fill_ratio(len: usize, policy: &BatchPolicy) -> f64 {
    len as f64 / policy.max_size.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_at_max_size_and_zero_means_one() {
        let p = BatchPolicy {
            max_size: 3,
            max_wait_ms: 10,
            seal_when_drained: true,
        };
        assert!(!is_full(2, &p));
        assert!(is_full(3, &p));
        let p0 = BatchPolicy {
            max_size: 0,
            max_wait_ms: 10,
            seal_when_drained: true,
        };
        assert!(is_full(1, &p0));
        assert!(
            (fill_ratio(
                3,
                &BatchPolicy {
                    max_size: 4,
                    max_wait_ms: 1,
                    seal_when_drained: true
                }
            ) - 0.75)
                .abs()
                < 1e-9
        );
    }
}
