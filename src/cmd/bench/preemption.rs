//! `batchd bench --preemption`: how long priority-1 tasks take while bulk
//! work fills a rate-limited route, with preemption on and off in one run.
//!
//! Each run, on a fresh private `nats-server` (or streams of its own on
//! `--nats-url`): `--preemption-bulk` priority-3 tasks are queued, all
//! naming one model; then `batchd sim` in this process limits that model to
//! `--preemption-sim` (1,200 requests a minute at 300 ms, by default; its
//! limits are not in batchd's config, the route learns them) and the engine
//! starts. After `--preemption-warmup-secs` (the provider's bucket starts
//! full; by then bulk work has spent it and the route runs at its limit),
//! priority-1 tasks are published at `--preemption-rate` per second for
//! `--preemption-secs`. The bench subscribes to the results subjects and
//! times each priority-1 task from just before its publish to the arrival
//! of its outcome.
//!
//! The table gives, per run, the priority-1 p50, p99 and worst, and the
//! share of the limit the route used over the trickle window (successes at
//! the provider, priority 1 and bulk together, over `rpm` × the window).
//! Bar: with preemption on, p1 p99 within the provider's latency + 100 ms
//! while the route uses at least 90% of its limit.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use batchd_actors::task::Priority;
use futures::StreamExt;
use tokio::time::Instant;

use super::capacity::{model_task, CapacitySetting};
use super::{http_providers, publish_tasks, Server};
use crate::cmd::clock_bar;
use crate::config::Config;
use crate::sim::{SimConfig, SimServer};

/// The share of the limit the route must use with preemption on.
pub const SHARE_BAR: f64 = 0.90;
/// How far over the provider's latency the p1 p99 may be.
pub const LATENCY_SLACK_MS: f64 = 100.0;
/// How long the outcomes of the last priority-1 tasks are waited for.
const DRAIN: Duration = Duration::from_secs(15);

/// What one `--preemption` run does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreemptionPlan {
    /// The simulated provider's limit and latency.
    pub setting: CapacitySetting,
    /// Bulk (priority-3) tasks queued first.
    pub bulk: usize,
    /// Seconds of bulk work alone before priority 1 starts.
    pub warmup_secs: u64,
    /// Seconds priority-1 tasks are published.
    pub secs: u64,
    /// Priority-1 tasks a second.
    pub rate: f64,
}

impl PreemptionPlan {
    /// Priority-1 tasks published in a run.
    pub fn p1_tasks(&self) -> usize {
        (self.secs as f64 * self.rate).round() as usize
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.bulk == 0 || self.secs == 0 {
            bail!("--preemption-bulk and --preemption-secs must be at least 1");
        }
        if !(self.rate > 0.0 && self.rate <= 1000.0) {
            bail!("--preemption-rate must be above 0 and at most 1000 a second");
        }
        Ok(())
    }
}

/// One run, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionRun {
    /// Whether preemption was on.
    pub enabled: bool,
    /// Priority-1 tasks published.
    pub p1_sent: usize,
    /// Publish-to-outcome times of those whose outcome came, ms, sorted.
    pub p1_ms: Vec<f64>,
    /// Length of the trickle window, seconds.
    pub window_secs: f64,
    /// Requests the provider answered 200 in the window.
    pub succeeded: u64,
    /// Requests it answered 429 over the whole run.
    pub rate_limited: u64,
    /// Distinct bulk batches seen preempted (sampled every 100 ms).
    pub preempted_batches: usize,
}

impl PreemptionRun {
    /// The `q` quantile of the priority-1 times (nearest rank), ms.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.p1_ms.is_empty() {
            return None;
        }
        let rank = (q * self.p1_ms.len() as f64).ceil() as usize;
        self.p1_ms.get(rank.clamp(1, self.p1_ms.len()) - 1).copied()
    }

    /// Successes in the window over what the limit allows in it.
    pub fn share(&self, rpm: u32) -> f64 {
        let allowed = f64::from(rpm) * self.window_secs / 60.0;
        if allowed > 0.0 {
            self.succeeded as f64 / allowed
        } else {
            0.0
        }
    }
}

/// The figures of `bench --preemption`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionReport {
    pub plan: PreemptionPlan,
    /// Preemption on, then off.
    pub runs: Vec<PreemptionRun>,
}

impl PreemptionReport {
    /// With preemption on: every priority-1 task answered, its p99 within
    /// latency + [`LATENCY_SLACK_MS`], and the route at [`SHARE_BAR`] or more.
    pub fn meets_bar(&self) -> bool {
        let limit = self.plan.setting.latency_ms as f64 + LATENCY_SLACK_MS;
        self.runs.iter().filter(|r| r.enabled).all(|r| {
            r.p1_ms.len() == r.p1_sent
                && r.quantile(0.99).is_some_and(|p99| p99 <= limit)
                && r.share(self.plan.setting.rpm) >= SHARE_BAR
        })
    }
}

impl fmt::Display for PreemptionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.plan;
        writeln!(
            f,
            "preemption: {} p3 tasks queued, one model ({}) on `batchd sim {}`; after {} s, \
             p1 tasks at {}/s for {} s; p1 timed from publish to outcome",
            p.bulk,
            super::capacity::MODEL,
            p.setting.sim_args(),
            p.warmup_secs,
            p.rate,
            p.secs
        )?;
        writeln!(
            f,
            "{:<12}{:>9}{:>11}{:>11}{:>11}{:>13}{:>8}{:>11}",
            "preemption",
            "p1 done",
            "p1 p50",
            "p1 p99",
            "p1 max",
            "limit used",
            "429s",
            "preempted"
        )?;
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"));
        for r in &self.runs {
            writeln!(
                f,
                "{:<12}{:>9}{:>11}{:>11}{:>11}{:>13}{:>8}{:>11}",
                if r.enabled { "on" } else { "off" },
                format!("{}/{}", r.p1_ms.len(), r.p1_sent),
                ms(r.quantile(0.5)),
                ms(r.quantile(0.99)),
                ms(r.p1_ms.last().copied()),
                format!("{:.1}%", r.share(p.setting.rpm) * 100.0),
                r.rate_limited,
                r.preempted_batches
            )?;
        }
        writeln!(
            f,
            "preemption bar: with preemption on, p1 p99 <= {:.0} ms (latency + {LATENCY_SLACK_MS:.0}) \
             and the route uses >= {:.0}% of its limit (p1 + bulk, over the p1 window): {}",
            p.setting.latency_ms as f64 + LATENCY_SLACK_MS,
            SHARE_BAR * 100.0,
            if self.meets_bar() { "met" } else { "NOT met" }
        )
    }
}

/// Runs `plan` with preemption on, then off, prints the table and returns it.
pub async fn run(nats_url: Option<&str>, plan: PreemptionPlan) -> anyhow::Result<PreemptionReport> {
    plan.check()?;
    let mut base = Config::defaults()?;
    base.realtime_only();
    base.nats
        .size_tasks_for(u64::try_from(plan.bulk + plan.p1_tasks()).unwrap_or(u64::MAX));
    let mut runs = Vec::new();
    for enabled in [true, false] {
        let server = Server::open(nats_url, &base).await?;
        let result = measure(&server, &base, plan, enabled).await;
        server.close().await;
        runs.push(result?);
    }
    let report = PreemptionReport { plan, runs };
    println!("{report}");
    Ok(report)
}

/// Publish times of the priority-1 tasks and the outcomes seen.
#[derive(Default)]
struct Clock {
    sent: HashMap<String, Instant>,
    done: HashMap<String, Duration>,
}

async fn measure(
    server: &Server,
    base: &Config,
    plan: PreemptionPlan,
    enabled: bool,
) -> anyhow::Result<PreemptionRun> {
    let label = if enabled { "on" } else { "off" };
    let mut config = base.clone();
    config.nats = server.nats.clone();
    config.dispatch.limits.clear();
    config.preemption.enabled = enabled;
    crate::nats::ensure_topology(&server.client, &config).await?;
    let subjects = config.subjects();
    eprintln!(
        "preemption {label}: {} p3 tasks, then p1 at {}/s for {} s",
        plan.bulk, plan.rate, plan.secs
    );
    let bodies: Vec<_> = (0..plan.bulk)
        .map(|i| {
            let id = format!("bulk-{i:08}");
            let body = model_task(&id, i, Priority::P3);
            (id, body)
        })
        .collect();
    publish_tasks(&server.js, &subjects.task(Priority::P3), &bodies, "p3 pub").await?;
    drop(bodies);

    // Outcomes of priority-1 tasks, timed as they arrive.
    let clock = Arc::new(Mutex::new(Clock::default()));
    let mut results = server
        .client
        .subscribe(subjects.results())
        .await
        .context("subscribing to the results")?;
    let watcher = {
        let (clock, subjects) = (clock.clone(), subjects.clone());
        tokio::spawn(async move {
            while let Some(msg) = results.next().await {
                let Some(id) = subjects.task_id_of(msg.subject.as_str()) else {
                    continue;
                };
                let mut c = clock.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(sent) = c.sent.get(id).copied() {
                    c.done.entry(id.to_owned()).or_insert(sent.elapsed());
                }
            }
        })
    };

    let sim = SimServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            latency: Duration::from_millis(plan.setting.latency_ms),
            rpm: plan.setting.rpm,
            ..SimConfig::default()
        },
    )
    .await
    .context("starting the simulated provider")?;
    let providers = http_providers(&mut config, &sim.base_url())?;
    let total = plan.warmup_secs + plan.secs;
    let pb = clock_bar(total, &format!("preempt {label}"));
    let started = Instant::now();
    let running = match crate::app::start(&config, providers).await {
        Ok(r) => r,
        Err(e) => {
            pb.finish_and_clear();
            watcher.abort();
            sim.shutdown().await;
            return Err(e);
        }
    };
    let ctx = running.engine.context().clone();
    let mut preempted: HashSet<Arc<str>> = HashSet::new();
    let look = |preempted: &mut HashSet<Arc<str>>| {
        for b in ctx.batches.all() {
            if b.is_paused() {
                preempted.insert(b.id.clone());
            }
        }
    };

    let p1_from = started + Duration::from_secs(plan.warmup_secs);
    let p1_until = p1_from + Duration::from_secs(plan.secs);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut succeeded_from = None;
    while Instant::now() < p1_from {
        tick.tick().await;
        look(&mut preempted);
        show(&pb, started, &sim, &clock, plan.p1_tasks());
    }
    succeeded_from.get_or_insert(sim.stats().succeeded);
    let p1_subject = subjects.task(Priority::P1);
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let mut next = tokio::time::interval_at(p1_from, period);
    let mut sent = 0usize;
    let mut publishes = tokio::task::JoinSet::new();
    while sent < plan.p1_tasks() {
        tokio::select! {
            _ = next.tick() => {
                let id = format!("vip-{sent:06}");
                let body = model_task(&id, sent, Priority::P1);
                clock.lock().unwrap_or_else(|p| p.into_inner()).sent.insert(id.clone(), Instant::now());
                let (js, subject) = (server.js.clone(), p1_subject.clone());
                publishes.spawn(async move {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    js.publish_with_headers(subject, headers, body).await?.await?;
                    anyhow::Ok(())
                });
                sent += 1;
            }
            _ = tick.tick() => {
                look(&mut preempted);
                show(&pb, started, &sim, &clock, plan.p1_tasks());
            }
        }
    }
    let window_end = Instant::now().max(p1_until);
    tokio::time::sleep_until(window_end).await;
    let succeeded = sim.stats().succeeded - succeeded_from.unwrap_or(0);
    let window_secs = window_end.saturating_duration_since(p1_from).as_secs_f64();
    while let Some(published) = publishes.join_next().await {
        published
            .context("publishing a p1 task")?
            .context("publishing a p1 task")?;
    }
    let drain_until = Instant::now() + DRAIN;
    while Instant::now() < drain_until && done_count(&clock) < sent {
        tick.tick().await;
        look(&mut preempted);
        show(&pb, started, &sim, &clock, plan.p1_tasks());
    }
    let rate_limited = sim.stats().rate_limited;
    pb.finish_and_clear();
    running.engine.shutdown().await;
    let _ = running.client.drain().await;
    watcher.abort();
    sim.shutdown().await;
    let mut p1_ms: Vec<f64> = clock
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .done
        .values()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    p1_ms.sort_by(f64::total_cmp);
    Ok(PreemptionRun {
        enabled,
        p1_sent: sent,
        p1_ms,
        window_secs,
        succeeded,
        rate_limited,
        preempted_batches: preempted.len(),
    })
}

fn done_count(clock: &Mutex<Clock>) -> usize {
    clock.lock().unwrap_or_else(|p| p.into_inner()).done.len()
}

fn show(
    pb: &indicatif::ProgressBar,
    started: Instant,
    sim: &SimServer,
    clock: &Mutex<Clock>,
    p1_total: usize,
) {
    let stats = sim.stats();
    pb.set_position(started.elapsed().as_secs());
    pb.set_message(format!(
        "{} answered, {} rate limited, p1 {}/{}",
        stats.succeeded,
        stats.rate_limited,
        done_count(clock),
        p1_total
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PreemptionPlan {
        PreemptionPlan {
            setting: CapacitySetting {
                rpm: 1200,
                latency_ms: 300,
            },
            bulk: 50_000,
            warmup_secs: 30,
            secs: 60,
            rate: 5.0,
        }
    }

    fn run(enabled: bool, p1_ms: Vec<f64>, succeeded: u64) -> PreemptionRun {
        PreemptionRun {
            enabled,
            p1_sent: p1_ms.len(),
            p1_ms,
            window_secs: 60.0,
            succeeded,
            rate_limited: 0,
            preempted_batches: 1,
        }
    }

    #[test]
    fn quantiles_are_nearest_rank_and_the_share_is_over_the_window() {
        let r = run(true, (1..=100).map(f64::from).collect(), 1080);
        assert_eq!(r.quantile(0.5), Some(50.0));
        assert_eq!(r.quantile(0.99), Some(99.0));
        assert_eq!(r.quantile(1.0), Some(100.0));
        assert!((r.share(1200) - 0.9).abs() < 1e-9);
        assert_eq!(run(true, Vec::new(), 0).quantile(0.5), None);
        assert_eq!(plan().p1_tasks(), 300);
    }

    #[test]
    fn the_bar_needs_p1_within_latency_plus_slack_and_the_route_used() {
        let fast = || {
            (0..300)
                .map(|i| 300.0 + f64::from(i % 90))
                .collect::<Vec<_>>()
        };
        let ok = PreemptionReport {
            plan: plan(),
            runs: vec![run(true, fast(), 1150), run(false, vec![900.0; 300], 1190)],
        };
        assert!(ok.meets_bar(), "the off run is not held to the bar");
        let text = ok.to_string();
        assert!(text.contains("p1 p99"), "{text}");
        assert!(text.contains("preemption bar:"), "{text}");
        let slow = PreemptionReport {
            plan: plan(),
            runs: vec![run(true, vec![450.0; 300], 1150)],
        };
        assert!(!slow.meets_bar());
        let idle = PreemptionReport {
            plan: plan(),
            runs: vec![run(true, fast(), 1000)],
        };
        assert!(!idle.meets_bar());
        let mut lost = run(true, fast(), 1150);
        lost.p1_sent += 1;
        let lost = PreemptionReport {
            plan: plan(),
            runs: vec![lost],
        };
        assert!(!lost.meets_bar());
    }
}
