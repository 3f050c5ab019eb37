//! Route kind policy: whether a task goes `realtime` (one provider request
//! per task) or `batch_api` (a provider batch job at the batch discount,
//! answered within the provider's completion window). A plain function of
//! the task's priority, its deadline, its own and its type's `route`
//! preference and whether its provider allows batch jobs; the Intake calls
//! it when it routes a task.
//!
//! A realtime task also gets a service tier ([`TierOptions::decide`]):
//! `flex` (Batch API rates, slower, sometimes refused) for priority 3 work
//! that could not wait for a batch window, where the provider's config
//! enables it for the model; `priority` (faster, at a premium) for priority
//! 1 where enabled; `default` otherwise. A flex refusal falls back to the
//! default tier at once, or to the Batch API, as configured.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::task::{Priority, RouteKind, ServiceTier};

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
    /// With a value, `auto` priority-2 work goes by batch job too, and a
    /// job of it still running after this long is cancelled, its
    /// unanswered tasks sent realtime (the provider usually ends small
    /// jobs well inside priority 2's target). `None`: priority 2 is realtime.
    pub p2_patience: Option<Duration>,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            batch_window: Duration::from_secs(24 * 3600),
            deadline_margin: Duration::from_secs(3600),
            p2_patience: None,
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
            RoutePreference::Auto if ask.priority == Priority::P1 => RouteKind::Realtime,
            RoutePreference::Auto if ask.priority == Priority::P2 => {
                // The job may run its patience, then the task goes realtime.
                let Some(patience) = self.p2_patience else {
                    return RouteKind::Realtime;
                };
                if fits(
                    ask.deadline,
                    patience.saturating_add(self.deadline_margin),
                    now,
                ) {
                    RouteKind::BatchApi
                } else {
                    RouteKind::Realtime
                }
            }
            RoutePreference::Auto => {
                let needed = self.batch_window.saturating_add(self.deadline_margin);
                if fits(ask.deadline, needed, now) {
                    RouteKind::BatchApi
                } else {
                    RouteKind::Realtime
                }
            }
        }
    }
}

/// Whether a deadline (if any) leaves `needed` after `now`.
fn fits(deadline: Option<DateTime<Utc>>, needed: Duration, now: DateTime<Utc>) -> bool {
    deadline.is_none_or(|dl| chrono::Duration::from_std(needed).is_ok_and(|n| dl >= now + n))
}

/// Where a task goes when its flex call is refused (429 resource unavailable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlexFallback {
    /// The same call at the default tier, at once.
    #[default]
    Standard,
    /// A provider batch job, where the provider allows one and the task did
    /// not ask for `route: "realtime"`; else the default tier.
    BatchApi,
}

/// The service tiers one provider offers (`[providers.NAME]` flex and
/// priority keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierOptions {
    /// Whether priority-3 realtime tasks go `flex`.
    pub flex: bool,
    /// The models flex applies to; empty: every model of the provider.
    pub flex_models: Vec<String>,
    /// What a flex refusal does.
    pub flex_fallback: FlexFallback,
    /// How long a flex call may take (flex answers slowly).
    pub flex_timeout: Duration,
    /// Whether priority-1 tasks go `priority`.
    pub priority_p1: bool,
}

impl Default for TierOptions {
    /// Neither flex nor priority.
    fn default() -> Self {
        TierOptions {
            flex: false,
            flex_models: Vec::new(),
            flex_fallback: FlexFallback::Standard,
            flex_timeout: Duration::from_secs(900),
            priority_p1: false,
        }
    }
}

/// A task's service tier and where its flex refusal sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTierChoice {
    /// The tier its call asks for.
    pub tier: ServiceTier,
    /// Where a flex refusal sends it: `Realtime` (the default tier) or
    /// `BatchApi`.
    pub on_refusal: RouteKind,
}

impl TierOptions {
    /// True when flex applies to `model`.
    pub fn flex_for(&self, model: &str) -> bool {
        self.flex && (self.flex_models.is_empty() || self.flex_models.iter().any(|m| m == model))
    }

    /// The tier of a task routed `kind` on `model`. Priority 3 realtime (its
    /// deadline too close for a batch window, `route: "realtime"`, or a
    /// provider without batch jobs) goes `flex` where flex applies to the
    /// model; priority 1 goes `priority` where enabled; batch jobs and
    /// everything else take the default tier.
    pub fn decide(&self, ask: RouteAsk, kind: RouteKind, model: &str) -> ServiceTierChoice {
        let tier = match (kind, ask.priority) {
            (RouteKind::BatchApi, _) => ServiceTier::Default,
            (RouteKind::Realtime, Priority::P3) if self.flex_for(model) => ServiceTier::Flex,
            (RouteKind::Realtime, Priority::P1) if self.priority_p1 => ServiceTier::Priority,
            _ => ServiceTier::Default,
        };
        let wants_realtime = ask.task.or(ask.task_type) == Some(RoutePreference::Realtime);
        let on_refusal = match self.flex_fallback {
            FlexFallback::BatchApi if ask.provider_allows_batch && !wants_realtime => {
                RouteKind::BatchApi
            }
            _ => RouteKind::Realtime,
        };
        ServiceTierChoice { tier, on_refusal }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoutePolicy {
        RoutePolicy {
            batch_window: Duration::from_secs(24 * 3600),
            deadline_margin: Duration::from_secs(3600),
            p2_patience: None,
        }
    }

    #[test]
    fn with_a_patience_priority_two_goes_by_batch_job_when_its_deadline_leaves_room() {
        let p = RoutePolicy {
            p2_patience: Some(Duration::from_secs(1800)),
            ..policy()
        };
        assert_eq!(p.decide(ask(Priority::P2), now()), RouteKind::BatchApi);
        assert_eq!(p.decide(ask(Priority::P1), now()), RouteKind::Realtime);
        let mut a = ask(Priority::P2);
        // Patience (30 min) plus the margin (1 h).
        a.deadline = Some(now() + chrono::Duration::minutes(90));
        assert_eq!(p.decide(a, now()), RouteKind::BatchApi);
        a.deadline = Some(now() + chrono::Duration::minutes(89));
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
        let mut a = ask(Priority::P2);
        a.task = Some(RoutePreference::Realtime);
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
        let mut a = ask(Priority::P2);
        a.provider_allows_batch = false;
        assert_eq!(p.decide(a, now()), RouteKind::Realtime);
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

    fn flex_on(fallback: FlexFallback) -> TierOptions {
        TierOptions {
            flex: true,
            flex_models: vec!["gpt-5-mini".into()],
            flex_fallback: fallback,
            ..TierOptions::default()
        }
    }

    #[test]
    fn priority_three_realtime_goes_flex_for_the_flex_models_only() {
        let o = flex_on(FlexFallback::Standard);
        let mut a = ask(Priority::P3);
        a.deadline = Some(now() + chrono::Duration::hours(2));
        let kind = policy().decide(a, now());
        assert_eq!(kind, RouteKind::Realtime);
        assert_eq!(o.decide(a, kind, "gpt-5-mini").tier, ServiceTier::Flex);
        assert_eq!(o.decide(a, kind, "gpt-4.1").tier, ServiceTier::Default);
        // A batch job needs no tier; nor do priorities 1 and 2 by default.
        assert_eq!(
            o.decide(ask(Priority::P3), RouteKind::BatchApi, "gpt-5-mini")
                .tier,
            ServiceTier::Default
        );
        for p in [Priority::P1, Priority::P2] {
            assert_eq!(
                o.decide(ask(p), RouteKind::Realtime, "gpt-5-mini").tier,
                ServiceTier::Default
            );
        }
        // Off, or on for every model.
        let off = TierOptions::default();
        assert_eq!(off.decide(a, kind, "gpt-5-mini").tier, ServiceTier::Default);
        let all = TierOptions {
            flex_models: Vec::new(),
            ..o
        };
        assert_eq!(all.decide(a, kind, "gpt-4.1").tier, ServiceTier::Flex);
    }

    #[test]
    fn realtime_by_preference_or_without_batch_goes_flex_too() {
        let o = flex_on(FlexFallback::Standard);
        let mut a = ask(Priority::P3);
        a.task = Some(RoutePreference::Realtime);
        let kind = policy().decide(a, now());
        assert_eq!(o.decide(a, kind, "gpt-5-mini").tier, ServiceTier::Flex);
        let mut b = ask(Priority::P3);
        b.provider_allows_batch = false;
        let kind = policy().decide(b, now());
        assert_eq!(o.decide(b, kind, "gpt-5-mini").tier, ServiceTier::Flex);
    }

    #[test]
    fn priority_one_goes_priority_only_when_enabled() {
        let on = TierOptions {
            priority_p1: true,
            ..TierOptions::default()
        };
        let a = ask(Priority::P1);
        assert_eq!(
            on.decide(a, RouteKind::Realtime, "m").tier,
            ServiceTier::Priority
        );
        assert_eq!(
            TierOptions::default()
                .decide(a, RouteKind::Realtime, "m")
                .tier,
            ServiceTier::Default
        );
        assert_eq!(
            on.decide(ask(Priority::P2), RouteKind::Realtime, "m").tier,
            ServiceTier::Default
        );
    }

    #[test]
    fn a_refusal_falls_back_to_the_batch_api_only_where_it_can() {
        let o = flex_on(FlexFallback::BatchApi);
        let mut a = ask(Priority::P3);
        a.deadline = Some(now() + chrono::Duration::hours(2));
        assert_eq!(
            o.decide(a, RouteKind::Realtime, "gpt-5-mini").on_refusal,
            RouteKind::BatchApi
        );
        let mut no_batch = a;
        no_batch.provider_allows_batch = false;
        assert_eq!(
            o.decide(no_batch, RouteKind::Realtime, "gpt-5-mini")
                .on_refusal,
            RouteKind::Realtime
        );
        let mut wants_realtime = a;
        wants_realtime.task_type = Some(RoutePreference::Realtime);
        assert_eq!(
            o.decide(wants_realtime, RouteKind::Realtime, "gpt-5-mini")
                .on_refusal,
            RouteKind::Realtime
        );
        assert_eq!(
            flex_on(FlexFallback::Standard)
                .decide(a, RouteKind::Realtime, "gpt-5-mini")
                .on_refusal,
            RouteKind::Realtime
        );
    }
}
