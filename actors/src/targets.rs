//! Service targets per priority, and how close each priority is to its own
//! (`batchd_priority_target_ratio`).
//!
//! A priority's ratio is the larger of two ages over its target: the age of
//! its oldest task still waiting in JetStream (as the backlog sampler last
//! saw it), and the p99 of the publish-to-outcome times of its tasks that
//! finished within the last [`RECENT`] (at most [`KEPT`] of them). Below 1 the
//! priority is within its target; at 1 or above it misses it. Plain code
//! under tokio's clock, so tests drive it with paused time.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::task::Priority;

/// How far back finished tasks count towards the p99.
pub const RECENT: Duration = Duration::from_secs(300);
/// The most finished tasks kept per priority (the newest).
pub const KEPT: usize = 1024;

/// The time each priority's tasks should take at most, publish to outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTargets(pub [Duration; 3]);

impl Default for ServiceTargets {
    fn default() -> Self {
        ServiceTargets([
            Duration::from_secs(10),
            Duration::from_secs(3600),
            Duration::from_secs(86_400),
        ])
    }
}

impl ServiceTargets {
    /// The target of `p`.
    pub fn of(&self, p: Priority) -> Duration {
        self.0[p.index()]
    }
}

/// What each priority has met lately.
#[derive(Debug)]
pub struct TargetTracker {
    targets: ServiceTargets,
    /// Finished tasks: when, and how long each took; oldest first.
    recent: [VecDeque<(Instant, Duration)>; 3],
    /// Age of the oldest task waiting, as last sampled.
    oldest_waiting: [Duration; 3],
}

impl TargetTracker {
    /// A tracker that has seen nothing yet.
    pub fn new(targets: ServiceTargets) -> TargetTracker {
        TargetTracker {
            targets,
            recent: Default::default(),
            oldest_waiting: [Duration::ZERO; 3],
        }
    }

    /// A task of `p` finished at `now`, `took` after it was published.
    pub fn finished(&mut self, p: Priority, took: Duration, now: Instant) {
        let recent = &mut self.recent[p.index()];
        if recent.len() >= KEPT {
            recent.pop_front();
        }
        recent.push_back((now, took));
    }

    /// The oldest task of `p` waiting in JetStream (`None`: none waits).
    pub fn waiting(&mut self, p: Priority, oldest: Option<Duration>) {
        self.oldest_waiting[p.index()] = oldest.unwrap_or(Duration::ZERO);
    }

    /// The p99 (nearest rank) of `p`'s tasks finished within [`RECENT`] of `now`.
    pub fn recent_p99(&mut self, p: Priority, now: Instant) -> Option<Duration> {
        let recent = &mut self.recent[p.index()];
        while recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > RECENT)
        {
            recent.pop_front();
        }
        let mut took: Vec<Duration> = recent.iter().map(|(_, d)| *d).collect();
        if took.is_empty() {
            return None;
        }
        took.sort_unstable();
        let rank = (took.len() * 99).div_ceil(100).max(1);
        took.get(rank - 1).copied()
    }

    /// `p`'s ratio at `now`: the larger of its oldest wait and its recent
    /// p99, over its target.
    pub fn ratio(&mut self, p: Priority, now: Instant) -> f64 {
        let age = self
            .recent_p99(p, now)
            .unwrap_or(Duration::ZERO)
            .max(self.oldest_waiting[p.index()]);
        let target = self.targets.of(p).as_secs_f64();
        if target > 0.0 {
            age.as_secs_f64() / target
        } else {
            0.0
        }
    }
}

/// A [`TargetTracker`] shared by the actors (kept in the context).
#[derive(Debug)]
pub struct Targets(Mutex<TargetTracker>);

impl Targets {
    /// A shared tracker of `targets`.
    pub fn new(targets: ServiceTargets) -> Targets {
        Targets(Mutex::new(TargetTracker::new(targets)))
    }

    /// The tracker, for one short update or reading (never held across an await).
    pub fn lock(&self) -> MutexGuard<'_, TargetTracker> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn the_ratio_is_the_recent_p99_over_the_target() {
        let mut t = TargetTracker::new(ServiceTargets([secs(10), secs(3600), secs(86_400)]));
        let now = Instant::now();
        assert_eq!(
            t.ratio(Priority::P1, now),
            0.0,
            "nothing seen: within target"
        );
        for i in 1..=100 {
            t.finished(Priority::P1, Duration::from_millis(i * 10), now);
        }
        // p99 of 10 ms .. 1000 ms is 990 ms; over 10 s.
        assert_eq!(
            t.recent_p99(Priority::P1, now),
            Some(Duration::from_millis(990))
        );
        assert!((t.ratio(Priority::P1, now) - 0.099).abs() < 1e-9);
        assert_eq!(t.ratio(Priority::P2, now), 0.0, "priorities apart");
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_task_waiting_counts_even_when_recent_ones_were_fast() {
        let mut t = TargetTracker::new(ServiceTargets::default());
        let now = Instant::now();
        t.finished(Priority::P2, secs(1), now);
        t.waiting(Priority::P2, Some(secs(5400)));
        assert!(
            (t.ratio(Priority::P2, now) - 1.5).abs() < 1e-9,
            "missing its hour"
        );
        t.waiting(Priority::P2, None);
        assert!(t.ratio(Priority::P2, now) < 0.001);
    }

    #[tokio::test(start_paused = true)]
    async fn old_finishes_age_out_and_only_the_newest_are_kept() {
        let mut t = TargetTracker::new(ServiceTargets::default());
        t.finished(Priority::P3, secs(80_000), Instant::now());
        tokio::time::advance(RECENT + secs(1)).await;
        let now = Instant::now();
        assert_eq!(t.recent_p99(Priority::P3, now), None, "aged out");
        for _ in 0..KEPT + 10 {
            t.finished(Priority::P3, secs(1), now);
        }
        assert_eq!(t.recent[Priority::P3.index()].len(), KEPT);
        assert!((t.ratio(Priority::P3, now) - 1.0 / 86_400.0).abs() < 1e-12);
    }
}
