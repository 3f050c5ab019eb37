//! `batchd bench --routing`: what routing bulk work saves, and what it costs
//! in latency, on the demo's workload against the simulated provider.
//!
//! The workload is `batchd demo`'s (seeded: three priorities, five task
//! types, both encodings, chat bodies, Batch lines, a shared long prefix, a
//! few bad inputs and duplicate publishes), with a share of its priority-3
//! tasks (`--routing-near-share`, a third by default) given a `deadline`
//! two hours away: too close for a 24 h batch window. It runs three ways,
//! each on a private `nats-server` and a fresh simulator in this process
//! (the demo's latency and error rate; flex offered for the workload's
//! models, three times slower, 2% of flex calls refused):
//!
//! - (a) realtime only: every task one request at the default tier;
//! - (b) the Batch API for priority 3 (`batch = true`): the near-deadline
//!   tasks go realtime at the default tier;
//! - (c) the Batch API and flex (`flex = true`): the near-deadline tasks go
//!   realtime at the flex tier, a refusal falling back to the default tier.
//!
//! Each way's cost is the simulator's bill, each part at its rate (default
//! tier at list price, flex and Batch API lines at the batch discount),
//! priced with the config's table; the latency is publish to outcome of the
//! priority-3 tasks that succeeded.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context as _};
use batchd_actors::pricing::{usd, Picousd};
use batchd_actors::task::{Priority, RouteKind, ServiceTier};
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::cost::collect;
use super::{http_providers, Server};
use crate::client::{Outgoing, Publisher};
use crate::cmd::demo::workload::{Message, Workload};
use crate::config::Config;
use crate::sim::{SimBill, SimConfig, SimServer, TierConfig};

/// How far the near deadlines are.
const NEAR_DEADLINE: chrono::Duration = chrono::Duration::hours(2);

/// What `--routing` runs.
#[derive(Debug, Clone, Copy)]
pub struct RoutingPlan {
    /// Tasks of the workload.
    pub tasks: u64,
    /// The workload's and the simulator's seed.
    pub seed: u64,
    /// Seconds the simulator takes to finish a batch job.
    pub batch_secs: f64,
    /// Share of priority-3 tasks with a near deadline.
    pub near_share: f64,
    /// Give up a way after this long.
    pub timeout: Duration,
}

/// The three ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// (a) realtime only.
    RealtimeOnly,
    /// (b) the Batch API for priority 3.
    BatchApi,
    /// (c) the Batch API and flex.
    BatchAndFlex,
}

impl Way {
    /// The way's name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Way::RealtimeOnly => "(a) realtime only",
            Way::BatchApi => "(b) Batch API for p3",
            Way::BatchAndFlex => "(c) Batch API + flex",
        }
    }

    /// The way's provider settings over the demo's config.
    pub fn configure(self, config: &mut Config) {
        for p in config.providers.values_mut() {
            p.batch = (self != Way::RealtimeOnly).into();
            p.flex = self == Way::BatchAndFlex && p.kind == crate::config::ProviderKind::Openai;
        }
    }
}

/// What one way cost and how long its priority-3 tasks took.
#[derive(Debug, Clone, PartialEq)]
pub struct WayResult {
    /// Which.
    pub way: Way,
    /// Outcomes.
    pub tasks: usize,
    /// Succeeded outcomes.
    pub succeeded: usize,
    /// The simulator's bill, priced.
    pub cost: Picousd,
    /// Priority-3 outcomes by Batch API.
    pub p3_batch: usize,
    /// Priority-3 outcomes served at the flex tier.
    pub p3_flex: usize,
    /// Flex calls the simulator refused.
    pub flex_refused: u64,
    /// Priority-3 publish-to-outcome time, median and 99th percentile, s.
    pub p3_p50: f64,
    /// See `p3_p50`.
    pub p3_p99: f64,
    /// The same for the priority-3 tasks sent realtime (all of them in
    /// (a); those with a near deadline in (b) and (c)).
    pub rt_p50: f64,
    /// See `rt_p50`.
    pub rt_p99: f64,
    /// Wall time.
    pub seconds: f64,
}

/// The three ways' figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingReport {
    /// (a), (b), (c).
    pub ways: [WayResult; 3],
    /// Priority-3 tasks with a near deadline.
    pub near: usize,
}

impl RoutingReport {
    /// 1 − way / realtime only.
    pub fn reduction(&self, way: usize) -> f64 {
        let base = self.ways[0].cost as f64;
        if base > 0.0 {
            1.0 - self.ways[way].cost as f64 / base
        } else {
            0.0
        }
    }
}

impl fmt::Display for RoutingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<24}{:>7}{:>11}{:>12}{:>9}{:>10}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}",
            "way",
            "tasks",
            "succeeded",
            "cost USD",
            "vs (a)",
            "p3 batch",
            "p3 flex",
            "refused",
            "p3 p50 s",
            "p3 p99 s",
            "rt p50 s",
            "rt p99 s",
            "seconds"
        )?;
        for (i, w) in self.ways.iter().enumerate() {
            writeln!(
                f,
                "{:<24}{:>7}{:>11}{:>12.4}{:>9}{:>10}{:>9}{:>10}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>9.1}",
                w.way.label(),
                w.tasks,
                w.succeeded,
                usd(w.cost),
                if i == 0 {
                    "-".to_owned()
                } else {
                    format!("-{:.1}%", self.reduction(i) * 100.0)
                },
                w.p3_batch,
                w.p3_flex,
                w.flex_refused,
                w.p3_p50,
                w.p3_p99,
                w.rt_p50,
                w.rt_p99,
                w.seconds
            )?;
        }
        write!(
            f,
            "{} priority-3 tasks had a deadline {} h away (too close for the 24 h batch window): \
             realtime in (a) and (b), flex in (c); cost from the simulator's bill; latency publish to outcome \
             of the priority-3 tasks (p3) and of those sent realtime (rt)",
            self.near,
            NEAR_DEADLINE.num_hours()
        )
    }
}

/// Runs the three ways, prints the table and returns the figures.
pub async fn run(plan: RoutingPlan) -> anyhow::Result<RoutingReport> {
    if plan.tasks == 0 {
        bail!("--tasks must be at least 1");
    }
    if !(0.0..=1.0).contains(&plan.near_share) {
        bail!("--routing-near-share must be between 0 and 1");
    }
    let mut base = Config::defaults()?;
    base.nats.size_tasks_for(plan.tasks.max(60_000));
    let workload = Workload::generate(plan.tasks, plan.seed);
    let deadline = chrono::Utc::now() + NEAR_DEADLINE;
    let (messages, near) = with_near_deadlines(&workload.messages, plan.near_share, deadline);
    eprintln!(
        "batchd bench --routing: the demo's workload, {} tasks ({near} priority 3 with a near deadline), seed {}, sim batch jobs take {} s",
        workload.tasks(),
        plan.seed,
        plan.batch_secs
    );
    let mut ways = Vec::with_capacity(3);
    for way in [Way::RealtimeOnly, Way::BatchApi, Way::BatchAndFlex] {
        let server = Server::open(None, &base).await?;
        let result = run_way(&server, &messages, way, plan).await;
        server.close().await;
        ways.push(result?);
    }
    let ways: [WayResult; 3] = ways
        .try_into()
        .map_err(|_| anyhow::anyhow!("three ways expected"))?;
    let report = RoutingReport { ways, near };
    println!("{report}");
    Ok(report)
}

/// The messages with every `1 / share`-th priority-3 task (a task object:
/// not a Batch line or a bad input) given `deadline`; and how many.
fn with_near_deadlines(
    messages: &[Message],
    share: f64,
    deadline: chrono::DateTime<chrono::Utc>,
) -> (Vec<Message>, usize) {
    let at = Value::String(deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let mut p3 = 0usize;
    let mut near = 0usize;
    let out = messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m.priority != Priority::P3 {
                return m;
            }
            p3 += 1;
            // Near when the running share falls behind the target.
            if (near as f64) >= share * p3 as f64 {
                return m;
            }
            if let Some(body) = with_field(&m, "deadline", &at) {
                m.body = body;
                near += 1;
            }
            m
        })
        .collect();
    (out, near)
}

/// `m`'s body with `field` set, in its encoding; `None` when the body is
/// not a task object (a Batch line, a bad input).
fn with_field(m: &Message, field: &str, value: &Value) -> Option<Bytes> {
    let msgpack = m.content_type == "application/msgpack";
    let mut body: Value = if msgpack {
        rmp_serde::from_slice(&m.body).ok()?
    } else {
        serde_json::from_slice(&m.body).ok()?
    };
    let task = body.as_object_mut()?;
    if !task.contains_key("task_id") || !task.contains_key("payload") {
        return None;
    }
    task.insert(field.to_owned(), value.clone());
    let bytes = if msgpack {
        rmp_serde::to_vec_named(&body).ok()?
    } else {
        serde_json::to_vec(&body).ok()?
    };
    Some(Bytes::from(bytes))
}

async fn run_way(
    server: &Server,
    messages: &[Message],
    way: Way,
    plan: RoutingPlan,
) -> anyhow::Result<WayResult> {
    let sim = SimServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            latency: Duration::from_millis(40),
            jitter: Duration::from_millis(80),
            error_rate: 0.02,
            seed: plan.seed,
            batch_duration: Duration::try_from_secs_f64(plan.batch_secs.max(0.0))
                .unwrap_or(Duration::from_secs(3)),
            tiers: TierConfig {
                flex_unavailable_rate: 0.02,
                ..TierConfig::default()
            },
            ..SimConfig::default()
        },
    )
    .await
    .context("starting the simulated provider")?;
    let mut config = crate::cmd::demo::demo_config(
        &server.nats.url,
        None,
        &sim.base_url(),
        u64::try_from(messages.len()).unwrap_or(u64::MAX),
    )?;
    config.nats = server.nats.clone();
    way.configure(&mut config);
    config.validate()?;
    // The workload's models take flex at the simulator.
    sim.set_flex_models(
        config
            .providers
            .values()
            .flat_map(|p| p.models.iter().cloned())
            .collect(),
    );
    let result = drive(server, &config, messages, way, &sim, plan.timeout).await;
    let cost = priced_bill(&config, &sim);
    let flex_refused = sim.stats().resource_unavailable;
    sim.shutdown().await;
    let (seconds, outcomes) = result?;
    let mut r = tally(way, &outcomes);
    r.cost = cost?;
    r.flex_refused = flex_refused;
    r.seconds = seconds;
    Ok(r)
}

/// Starts the engine, publishes the messages, waits for an outcome each;
/// returns the seconds taken and the outcomes.
async fn drive(
    server: &Server,
    config: &Config,
    messages: &[Message],
    way: Way,
    sim: &SimServer,
    timeout: Duration,
) -> anyhow::Result<(f64, Vec<Value>)> {
    let mut config = config.clone();
    let providers = http_providers(&mut config, &sim.base_url())?;
    let topology = crate::nats::ensure_topology(&server.client, &config).await?;
    let subjects = config.subjects();
    let label = &way.label()[..3];
    let started = Instant::now();
    let running = crate::app::start(&config, providers).await?;
    let outgoing = messages.iter().map(|m| Outgoing {
        subject: subjects.task(m.priority),
        msg_id: m.msg_id.clone(),
        content_type: m.content_type,
        body: m.body.clone(),
    });
    let published = Publisher::new(server.js.clone())
        .publish_all(outgoing, |_| {})
        .await
        .context("publishing the workload")?;
    collect(
        &topology,
        running,
        published.stored(),
        started,
        timeout,
        label,
    )
    .await
}

/// The simulator's bill, each part at its rate, priced with the config's table.
pub fn priced_bill(config: &Config, sim: &SimServer) -> anyhow::Result<Picousd> {
    let parts = [
        (sim.bill(), RouteKind::Realtime, ServiceTier::Default),
        (sim.flex_bill(), RouteKind::Realtime, ServiceTier::Flex),
        (
            sim.priority_bill(),
            RouteKind::Realtime,
            ServiceTier::Priority,
        ),
        (sim.batch_bill(), RouteKind::BatchApi, ServiceTier::Default),
    ];
    let mut total: Picousd = 0;
    for (bill, route, tier) in &parts {
        total += priced(config, bill, *route, *tier)?;
    }
    Ok(total)
}

fn priced(
    config: &Config,
    bill: &BTreeMap<String, SimBill>,
    route: RouteKind,
    tier: ServiceTier,
) -> anyhow::Result<Picousd> {
    let mut total: Picousd = 0;
    for (model, b) in bill {
        total += config
            .prices
            .tier_cost_picousd(model, &b.usage(), route, tier)
            .with_context(|| format!("no price for the sim's model {model}"))?;
    }
    Ok(total)
}

/// Counts the outcomes and the priority-3 latency.
fn tally(way: Way, outcomes: &[Value]) -> WayResult {
    let mut latencies: Vec<u64> = Vec::new();
    let mut realtime: Vec<u64> = Vec::new();
    let mut r = WayResult {
        way,
        tasks: outcomes.len(),
        succeeded: 0,
        cost: 0,
        p3_batch: 0,
        p3_flex: 0,
        flex_refused: 0,
        p3_p50: 0.0,
        p3_p99: 0.0,
        rt_p50: 0.0,
        rt_p99: 0.0,
        seconds: 0.0,
    };
    for o in outcomes {
        let ok = o["status"] == "succeeded";
        if ok {
            r.succeeded += 1;
        }
        if o["priority"] != 3 || !ok {
            continue;
        }
        if o["route"] == "batch_api" {
            r.p3_batch += 1;
        }
        if o["service_tier"] == "flex" {
            r.p3_flex += 1;
        }
        let ms = o["timings"]["total_ms"].as_u64().unwrap_or(0);
        latencies.push(ms);
        if o["route"] == "realtime" {
            realtime.push(ms);
        }
    }
    latencies.sort_unstable();
    realtime.sort_unstable();
    r.p3_p50 = percentile(&latencies, 0.50);
    r.p3_p99 = percentile(&latencies, 0.99);
    r.rt_p50 = percentile(&realtime, 0.50);
    r.rt_p99 = percentile(&realtime, 0.99);
    r
}

/// The `q` quantile of sorted milliseconds, in seconds (nearest rank).
fn percentile(sorted_ms: &[u64], q: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_ms.len() as f64).ceil() as usize).clamp(1, sorted_ms.len());
    sorted_ms[rank - 1] as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_priority_three_tasks_gets_the_near_deadline_in_its_encoding() {
        let w = Workload::generate(600, 42);
        let at = chrono::Utc::now() + NEAR_DEADLINE;
        let (messages, near) = with_near_deadlines(&w.messages, 0.5, at);
        let p3 = w
            .messages
            .iter()
            .filter(|m| m.priority == Priority::P3)
            .count();
        assert!(near > p3 * 2 / 5 && near <= p3 / 2 + 1, "{near} of {p3}");
        let mut seen = 0;
        for (before, after) in w.messages.iter().zip(&messages) {
            if before.body == after.body {
                continue;
            }
            assert_eq!(before.priority, Priority::P3);
            let v: Value = if after.content_type == "application/msgpack" {
                rmp_serde::from_slice(&after.body).unwrap()
            } else {
                serde_json::from_slice(&after.body).unwrap()
            };
            assert!(v["deadline"].is_string(), "{v}");
            seen += 1;
        }
        assert_eq!(seen, near);
        let (same, none) = with_near_deadlines(&w.messages, 0.0, at);
        assert_eq!(none, 0);
        assert!(same.iter().zip(&w.messages).all(|(a, b)| a.body == b.body));
    }

    #[test]
    fn percentiles_are_nearest_rank_in_seconds() {
        let ms: Vec<u64> = (1..=100).map(|i| i * 10).collect();
        assert_eq!(percentile(&ms, 0.5), 0.5);
        assert_eq!(percentile(&ms, 0.99), 0.99);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn each_way_configures_batch_and_flex() {
        let base = Config::defaults().unwrap();
        for (way, batch, flex) in [
            (Way::RealtimeOnly, false, false),
            (Way::BatchApi, true, false),
            (Way::BatchAndFlex, true, true),
        ] {
            let mut c = base.clone();
            way.configure(&mut c);
            let o = &c.providers["openai"];
            assert_eq!((o.batch, o.flex), (batch.into(), flex), "{way:?}");
            assert!(!c.providers["anthropic"].flex);
            c.validate().unwrap();
        }
    }
}
