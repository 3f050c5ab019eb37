//! Route kind policy: whether a task goes `realtime` (one provider request
//! per task) or `batch_api` (a provider batch job at the batch discount,
//! answered within the provider's completion window). A plain function of
//! the task's priority, its deadline, its own and its type's `route`
//! preference and whether its provider allows batch jobs; the Intake calls
//! it when it routes a task.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::task::{Priority, RouteKind};

/// What a task (its `route` field) or a task type asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePreference {
    /// Always one request per task.
    Realtime,
    /// A batch job whenever the provider allows one, whatever the priority
    /// or deadline.
    BatchApi,
    /// batchd decides: priority 3 by batch job when the deadline allows.
    Auto,
}

impl RoutePreference {
    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<RoutePreference> {
        match s {
            "realtime" => Some(RoutePreference::Realtime),
            "batch_api" => Some(RoutePreference::BatchApi),
            "auto" => Some(RoutePreference::Auto),
            _ => None,
        }
    }
}

/// The batch window the deadline check uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutePolicy {
    /// How long a batch job may take (the provider's completion window).
    pub batch_window: Duration,
    /// Extra time a deadline must leave beyond the window (assembly,
    /// upload, reading the results).
    pub deadline_margin: Duration,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            batch_window: Duration::from_secs(24 * 3600),
            deadline_margin: Duration::from_secs(3600),
        }
    }
}

/// What the policy looks at for one task.
#[derive(Debug, Clone, Copy)]
pub struct RouteAsk {
    /// The task's priority.
    pub priority: Priority,
    /// The task's own `route`, if it set one.
    pub task: Option<RoutePreference>,
    /// Its task type's `route`, if the type sets one.
    pub task_type: Option<RoutePreference>,
    /// Whether the provider serving its model allows batch jobs.
    pub provider_allows_batch: bool,
    /// The task's deadline.
    pub deadline: Option<DateTime<Utc>>,
}

impl RoutePolicy {
    /// The route kind of a task at `now`. The task's preference outranks
    /// its type's; `auto` (the default) sends priority 3 to the Batch API
    /// unless its deadline falls before `now + window + margin`; a provider
    /// without batch jobs always gets `realtime`.
    pub fn decide(&self, ask: RouteAsk, now: DateTime<Utc>) -> RouteKind {
        if !ask.provider_allows_batch {
            return RouteKind::Realtime;
        }
        match ask.task.or(ask.task_type).unwrap_or(RoutePreference::Auto) {
            RoutePreference::Realtime => RouteKind::Realtime,
            RoutePreference::BatchApi => RouteKind::BatchApi,
            RoutePreference::Auto if ask.priority != Priority::P3 => RouteKind::Realtime,
            RoutePreference::Auto => {
                let needed = self.batch_window.saturating_add(self.deadline_margin);
                let fits = ask.deadline.is_none_or(|dl| {
                    chrono::Duration::from_std(needed).is_ok_and(|n| dl >= now + n)
                });
                if fits {
                    RouteKind::BatchApi
                } else {
                    RouteKind::Realtime
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoutePolicy {
        RoutePolicy {
            batch_window: Duration::from_secs(24 * 3600),
            deadline_margin: Duration::from_secs(3600),
        }
    }

    fn ask(priority: Priority) -> RouteAsk {
        RouteAsk {
            priority,
            task: None,
            task_type: None,
            provider_allows_batch: true,
            deadline: None,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap()
    }

    #[test]
    fn priorities_one_and_two_go_realtime_three_goes_to_the_batch_api() {
        let p = policy();
        assert_eq!(p.decide(ask(Priority::P1), now()), RouteKind::Realtime);
        assert_eq!(p.decide(ask(Priority::P2), now()), RouteKind::Realtime);
        assert_eq!(p.decide(ask(Priority::P3), now()), RouteKind::BatchApi);
    }

    #[test]
    fn a_provider_without_batch_jobs_is_always_realtime() {
        let p = policy();
        let mut a = ask(Priority::P3);
        a.provider_allows_batch = false;
        a.task = Some(RoutePreference::BatchApi);
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
    }

    #[test]
    fn a_deadline_inside_the_window_plus_margin_goes_realtime() {
        let p = policy();
        let mut a = ask(Priority::P3);
        a.deadline = Some(now() + chrono::Duration::hours(24));
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
        a.deadline = Some(now() + chrono::Duration::hours(25) - chrono::Duration::seconds(1));
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
        a.deadline = Some(now() + chrono::Duration::hours(25));
        assert_eq!(p.decide(a, now()), RouteKind::BatchApi);
        a.deadline = Some(now() + chrono::Duration::days(3));
        assert_eq!(p.decide(a, now()), RouteKind::BatchApi);
    }

    #[test]
    fn the_task_outranks_its_type_and_both_outrank_priority_and_deadline() {
        let p = policy();
        let mut a = ask(Priority::P3);
        a.task_type = Some(RoutePreference::Realtime);
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
        a.task = Some(RoutePreference::Auto);
        assert_eq!(p.decide(a, now()), RouteKind::BatchApi);
        let mut b = ask(Priority::P1);
        b.task_type = Some(RoutePreference::BatchApi);
        b.deadline = Some(now());
        assert_eq!(p.decide(b, now()), RouteKind::BatchApi);
        b.task = Some(RoutePreference::Realtime);
        assert_eq!(p.decide(b, now()), RouteKind::Realtime);
    }

    #[test]
    fn preferences_parse_from_their_wire_names() {
        for (s, r) in [
            ("realtime", RoutePreference::Realtime),
            ("batch_api", RoutePreference::BatchApi),
            ("auto", RoutePreference::Auto),
        ] {
            assert_eq!(RoutePreference::parse(s), Some(r));
        }
        assert_eq!(RoutePreference::parse("batch"), None);
    }
}
