//! Batching policy: batches are keyed by route, shared prompt prefix and
//! priority, and sealed when full or when their oldest task has waited
//! `max_wait`. How full is full follows the priority's queue depth
//! ([`BatchPolicy::size_for`]): a deep queue fills larger batches at no cost
//! in latency, a shallow one does not hold tasks back for company. Plain
//! data and functions; the Assembler drives them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routing::Route;
use crate::task::{Priority, RouteKind};

/// How one priority's batches are sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPolicy {
    /// Seal when this many tasks are in the batch, while the queue is
    /// shallower than every step of `depth_steps`.
    pub max_size: usize,
    /// Seal when the first task has waited this long (milliseconds),
    /// whatever the size: the wait stays bounded as batches grow.
    pub max_wait_ms: u64,
    /// Seal at once when the priority's queue is drained: with nothing more
    /// waiting, holding the batch open only adds latency.
    #[serde(default = "default_true")]
    pub seal_when_drained: bool,
    /// Larger sizes for deeper queues: the size of the deepest step whose
    /// `above` the queue depth exceeds replaces `max_size`.
    #[serde(default)]
    pub depth_steps: Vec<DepthStep>,
}

/// One step of adaptive batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepthStep {
    /// Applies when the queue holds more than this many tasks.
    pub above: u64,
    /// The batch size then.
    pub size: usize,
}

fn default_true() -> bool {
    true
}

impl BatchPolicy {
    /// `max_wait` as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// The batch size for a queue `depth` tasks deep (at least 1).
    pub fn size_for(&self, depth: u64) -> usize {
        self.depth_steps
            .iter()
            .filter(|s| depth > s.above)
            .max_by_key(|s| s.above)
            .map_or(self.max_size, |s| s.size)
            .max(1)
    }
}

/// What groups tasks into one batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    /// Priority class.
    pub priority: Priority,
    /// Realtime or provider batch job: batch-job tasks are assembled apart,
    /// under `[batching.batch_api]`.
    pub kind: RouteKind,
    /// Provider and model.
    pub route: Route,
    /// Shared prompt prefix hash.
    pub prefix: u64,
}

/// Whether a batch of `len` tasks is full at `size`.
pub fn is_full(len: usize, size: usize) -> bool {
    len >= size.max(1)
}

/// How full a sealed batch is against the size it was opened for, for the
/// fill-ratio histogram.
pub fn fill_ratio(len: usize, size: usize) -> f64 {
    len as f64 / size.max(1) as f64
}

/// The engine's latest view of each priority's queue depth, written by the
/// backlog sampler every `backlog_interval` and read by the Assembler when
/// it opens a batch: no lookup per batch.
#[derive(Debug, Default)]
pub struct QueueDepths([AtomicU64; 3]);

impl QueueDepths {
    /// Records a sampled depth.
    pub fn set(&self, p: Priority, depth: u64) {
        self.0[p.index()].store(depth, Ordering::Relaxed);
    }

    /// The last sampled depth (0 before the first sample).
    pub fn get(&self, p: Priority) -> u64 {
        self.0[p.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_size: usize, steps: &[(u64, usize)]) -> BatchPolicy {
        BatchPolicy {
            max_size,
            max_wait_ms: 10,
            seal_when_drained: true,
            depth_steps: steps
                .iter()
                .map(|&(above, size)| DepthStep { above, size })
                .collect(),
        }
    }

    #[test]
    fn full_at_size_and_zero_means_one() {
        assert!(!is_full(2, 3));
        assert!(is_full(3, 3));
        assert!(is_full(1, 0));
        assert!((fill_ratio(3, 4) - 0.75).abs() < 1e-9);
        assert!((fill_ratio(1, 0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn size_follows_depth_with_the_seed_thresholds() {
        let p = policy(20, &[(1_000, 50), (10_000, 100)]);
        assert_eq!(p.size_for(0), 20);
        assert_eq!(p.size_for(1_000), 20, "more than 1,000, not 1,000");
        assert_eq!(p.size_for(1_001), 50);
        assert_eq!(p.size_for(10_000), 50);
        assert_eq!(p.size_for(10_001), 100);
        assert_eq!(p.size_for(u64::MAX), 100);
    }

    #[test]
    fn steps_in_any_order_pick_the_deepest_that_applies() {
        let p = policy(20, &[(10_000, 100), (1_000, 50)]);
        assert_eq!(p.size_for(5_000), 50);
        assert_eq!(p.size_for(50_000), 100);
    }

    #[test]
    fn no_steps_is_a_fixed_size_and_zero_means_one() {
        assert_eq!(policy(7, &[]).size_for(1_000_000), 7);
        assert_eq!(policy(0, &[]).size_for(0), 1);
        assert_eq!(policy(5, &[(10, 0)]).size_for(11), 1);
    }

    #[test]
    fn depths_start_at_zero_and_keep_the_last_sample() {
        let d = QueueDepths::default();
        assert_eq!(d.get(Priority::P3), 0);
        d.set(Priority::P3, 12_000);
        d.set(Priority::P1, 3);
        assert_eq!(d.get(Priority::P3), 12_000);
        assert_eq!(d.get(Priority::P1), 3);
        assert_eq!(d.get(Priority::P2), 0);
    }
}
