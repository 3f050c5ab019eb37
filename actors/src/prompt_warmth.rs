//! Prompt-cache warm-up: which prefixes a route has warmed, and who waits
//! for whom.
//!
//! A provider writes its prompt cache while it reads a prompt, so requests
//! sent together with one new shared prefix all pay for it in full. For a
//! group of tasks sharing a prefix long enough to be cached, one request
//! goes first (the *lead*) and the others follow once it is answered, or
//! after [`CachingSettings::warm_wait`] at the latest. A prefix answered is
//! *warm* on its route for [`CachingSettings::warm_ttl`]: later groups with
//! it go at once. A group waits on another batch's warm-up only when that
//! batch is at least as urgent: priority 1 never waits on a priority 3 lead.
//!
//! In memory only, per route and bounded ([`WarmPrefixes::CAPACITY`]): a
//! restart forgets what was warm, which costs one warm-up per prefix.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::task::Priority;

/// `[caching]`: warm-up of the provider's prompt cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachingSettings {
    /// Off: every task of a batch is sent at once.
    pub enabled: bool,
    /// How long a prefix stays warm on its route after an answer.
    pub warm_ttl: Duration,
    /// Shortest shared prefix (in estimated tokens, four characters each)
    /// worth a warm-up: OpenAI caches from 1024 tokens.
    pub min_prefix_tokens: u64,
    /// Longest the rest of a group waits for its lead's answer.
    pub warm_wait: Duration,
}

impl Default for CachingSettings {
    fn default() -> Self {
        CachingSettings {
            enabled: true,
            warm_ttl: Duration::from_secs(300),
            min_prefix_tokens: 1024,
            warm_wait: Duration::from_secs(30),
        }
    }
}

impl CachingSettings {
    /// True when a shared prefix of `chars` characters is long enough to be
    /// cached, at about four characters a token.
    pub fn worth_warming(&self, chars: usize) -> bool {
        self.enabled && (chars as u64 / 4) >= self.min_prefix_tokens
    }
}

/// What one task of a batch does about its prefix.
#[derive(Debug)]
pub enum Warmup {
    /// Go at once (nothing to warm, warm already, or caching off).
    Now,
    /// Go first; the others wait for this task's answer.
    Lead(WarmLead),
    /// Wait for the lead's answer (or its end), then go.
    Follow(watch::Receiver<()>),
}

enum Warmth {
    Warm {
        until: Instant,
    },
    Warming {
        id: u64,
        priority: Priority,
        done: watch::Receiver<()>,
    },
}

/// The prefixes of one route: warm ones and those being warmed.
#[derive(Default)]
pub struct WarmPrefixes {
    entries: Mutex<HashMap<u64, Warmth>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for WarmPrefixes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPrefixes")
            .field("len", &self.len())
            .finish()
    }
}

impl WarmPrefixes {
    /// Most prefixes remembered per route; beyond it (after forgetting the
    /// cold ones) a new prefix goes without a warm-up.
    pub const CAPACITY: usize = 4096;

    /// What a group of `size` tasks with `prefix`, at `priority`, does at
    /// `now`: one [`Warmup`] per task, the lead (if any) first.
    pub fn plan(
        self: &Arc<Self>,
        prefix: u64,
        priority: Priority,
        size: usize,
        now: Instant,
    ) -> Vec<Warmup> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let all_now = || (0..size).map(|_| Warmup::Now).collect();
        match entries.get(&prefix) {
            Some(Warmth::Warm { until }) if *until > now => return all_now(),
            // Another batch's lead is out: as urgent or more, wait for it
            // too; less urgent, do not wait behind it.
            Some(Warmth::Warming {
                priority: theirs,
                done,
                ..
            }) => {
                if theirs.number() <= priority.number() {
                    return (0..size).map(|_| Warmup::Follow(done.clone())).collect();
                }
                return all_now();
            }
            Some(Warmth::Warm { .. }) | None => {}
        }
        if entries.len() >= Self::CAPACITY {
            entries.retain(|_, w| match w {
                Warmth::Warm { until } => *until > now,
                Warmth::Warming { .. } => true,
            });
            if entries.len() >= Self::CAPACITY {
                return all_now();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(());
        entries.insert(
            prefix,
            Warmth::Warming {
                id,
                priority,
                done: rx.clone(),
            },
        );
        drop(entries);
        let lead = WarmLead {
            prefixes: self.clone(),
            prefix,
            id,
            _done: tx,
        };
        let mut plan = Vec::with_capacity(size);
        plan.push(Warmup::Lead(lead));
        plan.extend((1..size).map(|_| Warmup::Follow(rx.clone())));
        plan
    }

    /// Prefixes remembered, warm or warming.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn end(&self, prefix: u64, id: u64, warm_until: Option<Instant>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let ours = matches!(entries.get(&prefix), Some(Warmth::Warming { id: i, .. }) if *i == id);
        if !ours {
            return;
        }
        match warm_until {
            Some(until) => {
                entries.insert(prefix, Warmth::Warm { until });
            }
            None => {
                entries.remove(&prefix);
            }
        }
    }
}

/// The lead of a warm-up. Its followers go when it is finished or dropped
/// (a lead that never called, or failed, warmed nothing).
#[derive(Debug)]
pub struct WarmLead {
    prefixes: Arc<WarmPrefixes>,
    prefix: u64,
    id: u64,
    // Dropped last: followers wake once the entry says what happened.
    _done: watch::Sender<()>,
}

impl WarmLead {
    /// The lead's call ended at `now`: answered (the prefix is warm for
    /// `ttl`) or not.
    pub fn finish(self, answered: bool, now: Instant, ttl: Duration) {
        let until = answered.then(|| now + ttl);
        self.prefixes.end(self.prefix, self.id, until);
    }
}

impl Drop for WarmLead {
    fn drop(&mut self) {
        self.prefixes.end(self.prefix, self.id, None);
    }
}

/// Waits until the lead behind `done` is finished or gone, at most `limit`.
pub async fn follow(mut done: watch::Receiver<()>, limit: Duration) {
    // `changed` ends with an error once the lead's sender is dropped; no
    // value is ever sent.
    let _ = tokio::time::timeout(limit, done.changed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leads(plan: &[Warmup]) -> usize {
        plan.iter().filter(|w| matches!(w, Warmup::Lead(_))).count()
    }

    fn followers(plan: &[Warmup]) -> usize {
        plan.iter()
            .filter(|w| matches!(w, Warmup::Follow(_)))
            .count()
    }

    #[test]
    fn a_prefix_is_worth_warming_from_min_prefix_tokens_and_only_when_enabled() {
        let s = CachingSettings::default();
        assert!(!s.worth_warming(4 * 1023));
        assert!(s.worth_warming(4 * 1024));
        let off = CachingSettings {
            enabled: false,
            ..s
        };
        assert!(!off.worth_warming(1_000_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_prefix_gets_one_lead_and_the_rest_follow_until_it_answers() {
        let warm = Arc::new(WarmPrefixes::default());
        let now = Instant::now();
        let mut plan = warm.plan(7, Priority::P2, 5, now);
        assert_eq!((leads(&plan), followers(&plan)), (1, 4));
        let Warmup::Lead(lead) = plan.remove(0) else {
            panic!("the lead comes first");
        };
        let Warmup::Follow(rx) = plan.remove(0) else {
            panic!("then its followers");
        };
        let waiting = tokio::spawn(follow(rx, Duration::from_secs(30)));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        lead.finish(true, now, Duration::from_secs(300));
        waiting.await.unwrap();
        assert_eq!(now.elapsed(), Duration::ZERO, "released at the answer");

        // Warm: all at once, until the TTL has passed.
        let plan = warm.plan(7, Priority::P2, 3, now + Duration::from_secs(299));
        assert_eq!((leads(&plan), followers(&plan)), (0, 0));
        let plan = warm.plan(7, Priority::P2, 3, now + Duration::from_secs(301));
        assert_eq!(leads(&plan), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lead_that_fails_or_never_calls_releases_its_followers_and_warms_nothing() {
        let warm = Arc::new(WarmPrefixes::default());
        let now = Instant::now();
        let mut plan = warm.plan(1, Priority::P3, 2, now);
        let Warmup::Follow(rx) = plan.pop().unwrap() else {
            panic!("a follower");
        };
        drop(plan);
        follow(rx, Duration::from_secs(30)).await;
        assert_eq!(now.elapsed(), Duration::ZERO);
        assert!(warm.is_empty(), "nothing warmed");

        let mut plan = warm.plan(1, Priority::P3, 1, now);
        let Some(Warmup::Lead(lead)) = plan.pop() else {
            panic!("a lead again");
        };
        lead.finish(false, now, Duration::from_secs(300));
        assert_eq!(leads(&warm.plan(1, Priority::P3, 1, now)), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn followers_stop_waiting_after_warm_wait() {
        let warm = Arc::new(WarmPrefixes::default());
        let mut plan = warm.plan(1, Priority::P2, 2, Instant::now());
        let Some(Warmup::Follow(rx)) = plan.pop() else {
            panic!("a follower");
        };
        let started = Instant::now();
        follow(rx, Duration::from_secs(30)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        drop(plan);
    }

    #[test]
    fn priority_one_never_waits_on_a_bulk_lead_but_bulk_waits_on_priority_one() {
        let warm = Arc::new(WarmPrefixes::default());
        let now = Instant::now();
        let bulk = warm.plan(1, Priority::P3, 10, now);
        let urgent = warm.plan(1, Priority::P1, 4, now);
        assert_eq!((leads(&urgent), followers(&urgent)), (0, 0));
        drop(bulk);

        let urgent = warm.plan(2, Priority::P1, 4, now);
        let bulk = warm.plan(2, Priority::P3, 10, now);
        assert_eq!((leads(&bulk), followers(&bulk)), (0, 10));
        drop(urgent);
    }

    #[test]
    fn memory_is_bounded_and_cold_prefixes_are_forgotten_first() {
        let warm = Arc::new(WarmPrefixes::default());
        let now = Instant::now();
        for prefix in 0..WarmPrefixes::CAPACITY as u64 {
            if let Some(Warmup::Lead(lead)) = warm.plan(prefix, Priority::P3, 1, now).pop() {
                lead.finish(true, now, Duration::from_secs(60));
            }
        }
        assert_eq!(warm.len(), WarmPrefixes::CAPACITY);
        let full = warm.plan(u64::MAX, Priority::P3, 2, now);
        assert_eq!(leads(&full), 0, "full of warm prefixes: no warm-up");
        let later = now + Duration::from_secs(61);
        let plan = warm.plan(u64::MAX, Priority::P3, 2, later);
        assert_eq!(leads(&plan), 1, "the cold ones were forgotten");
        assert_eq!(warm.len(), 1);
    }
}
