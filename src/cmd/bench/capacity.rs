//! `batchd bench --capacity`: how much of a rate-limited provider's capacity
//! batchd uses, and how many of its requests are answered 429.
//!
//! Each setting runs `batchd sim --rpm R --latency-ms L` in this process (a
//! few hundred requests a second cost it little CPU) against one model whose
//! limits batchd's config does not name: the route learns them from the
//! `x-ratelimit-*` headers. A backlog larger than the run can drain is
//! published first, so the engine is never starved; then the simulated
//! provider and the engine start, and run for N seconds.
//!
//! The provider's bucket starts full: `rpm` requests may go in the first
//! instants, more than any steady rate allows. So the share of the limit
//! used is read over the steady state: successes from [`WARMUP`] (half the
//! run when shorter) to the end, over `rpm` × that window in minutes. The
//! whole-run share, which counts the initial bucket and may exceed 100%, is
//! shown beside it. The 429 share is over the whole run.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use batchd_actors::route::RouteStatus;
use batchd_actors::task::Priority;
use bytes::Bytes;
use tokio::time::Instant;

use super::{cpu_since, http_providers, process_cpu, publish_tasks, Server};
use crate::cmd::clock_bar;
use crate::config::Config;
use crate::sim::{SimConfig, SimServer, SimStats};

/// The share of the limit batchd must use in the steady state.
pub const CAPACITY_BAR: f64 = 0.95;
/// The share several replicas sharing one limit must use together.
pub const SHARED_CAPACITY_BAR: f64 = 0.90;
/// The share of requests answered 429 batchd must stay under.
pub const RATE_LIMITED_BAR: f64 = 0.005;
/// When the steady state is taken to start: by then the provider's initial
/// bucket is spent, whatever batchd did with it.
pub const WARMUP: Duration = Duration::from_secs(60);
/// The one model every task names.
pub const MODEL: &str = "gpt-4.1-nano";
/// How often the provider's counters and the route are sampled.
const SAMPLE: Duration = Duration::from_secs(1);
/// The interval of the per-interval lines under the table.
const INTERVAL_SECS: u64 = 10;

/// A simulated provider's limit and latency: `RPM:LATENCY_MS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacitySetting {
    /// Requests per minute (`batchd sim --rpm`).
    pub rpm: u32,
    /// Latency of each answer (`batchd sim --latency-ms`).
    pub latency_ms: u64,
}

impl CapacitySetting {
    /// The settings of issue 6's bar: a large limit at 1 s latency, and a
    /// small one at 800 ms.
    pub const BAR: [CapacitySetting; 2] = [
        CapacitySetting {
            rpm: 12_000,
            latency_ms: 1000,
        },
        CapacitySetting {
            rpm: 1200,
            latency_ms: 800,
        },
    ];

    /// The `batchd sim` arguments it stands for.
    pub fn sim_args(&self) -> String {
        format!("--rpm {} --latency-ms {}", self.rpm, self.latency_ms)
    }

    /// Tasks published before a run of `secs`: what the limit allows over
    /// the run, plus the initial bucket, plus 10%.
    pub fn backlog(&self, secs: u64) -> usize {
        let tasks = u64::from(self.rpm)
            .saturating_mul(secs.saturating_add(60))
            .saturating_mul(11)
            .div_ceil(600);
        usize::try_from(tasks).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for CapacitySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.rpm, self.latency_ms)
    }
}

impl FromStr for CapacitySetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (rpm, latency) = s
            .split_once(':')
            .ok_or_else(|| format!("'{s}' is not RPM:LATENCY_MS, e.g. 12000:1000"))?;
        let rpm: u32 = rpm
            .trim()
            .parse()
            .map_err(|_| format!("rpm '{rpm}' is not a whole number"))?;
        if rpm == 0 {
            return Err("rpm must be at least 1: the run measures a limit".into());
        }
        let latency_ms = latency
            .trim()
            .parse()
            .map_err(|_| format!("latency '{latency}' is not a whole number of ms"))?;
        Ok(CapacitySetting { rpm, latency_ms })
    }
}

/// One look at the provider and the route during a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub at: f64,
    /// Requests answered 200 so far.
    pub succeeded: u64,
    /// The route's concurrency limit, once the route exists.
    pub concurrency_limit: Option<usize>,
    /// The route's learned requests per minute.
    pub rpm_limit: Option<u64>,
}

/// One setting, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityResult {
    pub setting: CapacitySetting,
    /// How many replicas shared the limit.
    pub replicas: usize,
    /// Length of the run.
    pub seconds: f64,
    /// Start of the steady state.
    pub warmup: f64,
    /// Samples, the first at the start and the last at the end.
    pub samples: Vec<Sample>,
    /// The provider's counters over the run.
    pub stats: SimStats,
    /// Tasks published before the run.
    pub backlog: usize,
    /// Outcomes stored by the end.
    pub outcomes: u64,
    /// CPU time of this process (engine and simulated provider) in the run.
    pub cpu_seconds: Option<f64>,
}

impl CapacityResult {
    /// The steady window: its start, its end and the successes in it.
    fn steady(&self) -> Option<(f64, f64, u64)> {
        let from = self.samples.iter().find(|s| s.at >= self.warmup)?;
        let to = self.samples.last()?;
        (to.at > from.at).then(|| (from.at, to.at, to.succeeded - from.succeeded))
    }

    /// Successes over the limit, from the warm-up to the end.
    pub fn steady_share(&self) -> Option<f64> {
        let (from, to, succeeded) = self.steady()?;
        Some(succeeded as f64 / self.allowed(to - from))
    }

    /// Successes over the limit, over the whole run (the initial bucket
    /// included, so it may exceed 1).
    pub fn whole_share(&self) -> f64 {
        self.stats.succeeded as f64 / self.allowed(self.seconds)
    }

    /// Requests answered 429 over requests made.
    pub fn rate_limited_share(&self) -> f64 {
        if self.stats.requests == 0 {
            return 0.0;
        }
        self.stats.rate_limited as f64 / self.stats.requests as f64
    }

    /// Outcomes stored per second.
    pub fn tasks_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.outcomes as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// This process's CPU time per outcome, in microseconds.
    pub fn cpu_us_per_task(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (self.outcomes > 0).then(|| cpu * 1e6 / self.outcomes as f64)
    }

    /// The share of the limit the steady state must reach:
    /// [`CAPACITY_BAR`] for one replica, [`SHARED_CAPACITY_BAR`] for several.
    pub fn bar(&self) -> f64 {
        if self.replicas > 1 {
            SHARED_CAPACITY_BAR
        } else {
            CAPACITY_BAR
        }
    }

    /// At least [`CapacityResult::bar`] of the limit in the steady state and
    /// fewer than [`RATE_LIMITED_BAR`] of requests answered 429.
    pub fn meets_bar(&self) -> bool {
        self.steady_share().is_some_and(|s| s >= self.bar())
            && self.rate_limited_share() < RATE_LIMITED_BAR
    }

    /// The setting as the table shows it: the sim's flags, and the
    /// replicas when more than one.
    fn label(&self) -> String {
        match self.replicas {
            1 => self.setting.sim_args(),
            n => format!("{}, {n} replicas", self.setting.sim_args()),
        }
    }

    /// Requests the limit allows in `seconds`.
    fn allowed(&self, seconds: f64) -> f64 {
        let allowed = f64::from(self.setting.rpm) * seconds / 60.0;
        if allowed > 0.0 {
            allowed
        } else {
            f64::INFINITY
        }
    }

    /// The last sample at each [`INTERVAL_SECS`] boundary (half a second
    /// of slack for a late tick), and the last sample of a shorter tail.
    fn at_intervals(&self) -> Vec<Sample> {
        let Some(end) = self.samples.last() else {
            return Vec::new();
        };
        let step = INTERVAL_SECS as f64;
        let mut marks: Vec<Sample> = Vec::new();
        let mut boundary = step;
        while boundary <= end.at + 0.5 {
            let mark = self.samples.iter().rev().find(|s| s.at <= boundary + 0.5);
            marks.extend(mark.copied());
            boundary += step;
        }
        if marks.last().is_none_or(|m| end.at > m.at + 0.5) {
            marks.push(*end);
        }
        marks
    }

    /// Successes in each interval.
    pub fn successes_per_interval(&self) -> Vec<u64> {
        let mut before = 0;
        self.at_intervals()
            .iter()
            .map(|s| {
                let n = s.succeeded - before;
                before = s.succeeded;
                n
            })
            .collect()
    }
}

/// Runs one setting for `secs` seconds on `server`.
pub(super) async fn measure(
    server: &Server,
    base: &Config,
    setting: CapacitySetting,
    secs: u64,
    replicas: usize,
) -> anyhow::Result<CapacityResult> {
    if secs == 0 {
        bail!("--capacity-secs must be at least 1");
    }
    if replicas == 0 {
        bail!("--capacity-replicas must be at least 1");
    }
    let run = Duration::from_secs(secs);
    let mut config = base.clone();
    config.nats = server.nats.clone();
    // The route learns the provider's limits from its headers.
    config.dispatch.limits.clear();
    let topology = crate::nats::ensure_topology(&server.client, &config).await?;
    let backlog = setting.backlog(secs);
    eprintln!(
        "capacity, sim {}: {backlog} tasks for {secs} s, {replicas} replica(s), the simulated provider in this process",
        setting.sim_args()
    );
    let bodies = task_bodies(backlog);
    publish_tasks(
        &server.js,
        &config.subjects().task(Priority::P2),
        &bodies,
        "cap pub",
    )
    .await?;
    drop(bodies);

    let sim = SimServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            latency: Duration::from_millis(setting.latency_ms),
            rpm: setting.rpm,
            ..SimConfig::default()
        },
    )
    .await
    .context("starting the simulated provider")?;
    let providers = http_providers(&mut config, &sim.base_url())?;

    let pb = clock_bar(secs, &format!("{}/min", setting.rpm));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut running = Vec::with_capacity(replicas);
    for i in 0..replicas {
        let mut c = config.clone();
        if replicas > 1 {
            c.nats.replica = format!("bench-{i}");
        }
        match crate::app::start(&c, providers.clone()).await {
            Ok(r) => running.push(r),
            Err(e) => {
                pb.finish_and_clear();
                for r in running {
                    r.engine.shutdown().await;
                }
                sim.shutdown().await;
                return Err(e.context(format!("starting replica {i}")));
            }
        }
    }
    let look = |now: Instant| {
        let route = running.first().and_then(|r| route_status(&r.engine));
        Sample {
            at: now.saturating_duration_since(started).as_secs_f64(),
            succeeded: sim.stats().succeeded,
            concurrency_limit: route.as_ref().map(|r| r.concurrency_limit),
            rpm_limit: route.and_then(|r| r.rpm_limit),
        }
    };
    let mut samples = vec![Sample {
        at: 0.0,
        succeeded: 0,
        concurrency_limit: None,
        rpm_limit: None,
    }];
    let mut tick = tokio::time::interval_at(started + SAMPLE, SAMPLE);
    let end = started + run;
    loop {
        let now = tick.tick().await.min(end);
        let sample = look(now);
        samples.push(sample);
        pb.set_position(sample.at as u64);
        pb.set_message(format!(
            "{} answered, {} rate limited, route concurrency {}",
            sample.succeeded,
            sim.stats().rate_limited,
            sample
                .concurrency_limit
                .map_or_else(|| "-".to_owned(), |c| c.to_string())
        ));
        if now >= end {
            break;
        }
    }
    let stats = sim.stats();
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_since(cpu_before);
    let outcomes = topology
        .results
        .clone()
        .info()
        .await
        .map(|i| i.state.messages);
    pb.finish_and_clear();
    for r in running {
        r.engine.shutdown().await;
        let _ = r.client.drain().await;
    }
    sim.shutdown().await;
    let outcomes = outcomes.context("counting the results")?;
    let dead = topology
        .dlq
        .clone()
        .info()
        .await
        .map(|i| i.state.messages)
        .unwrap_or(0);
    if dead > 0 {
        eprintln!(
            "warning: capacity, sim {}: {dead} tasks failed (dead letters)",
            setting.sim_args()
        );
    }
    Ok(CapacityResult {
        setting,
        replicas,
        seconds,
        warmup: WARMUP.as_secs_f64().min(secs as f64 / 2.0),
        samples,
        stats,
        backlog,
        outcomes,
        cpu_seconds,
    })
}

/// The route of [`MODEL`], if the engine has made it.
fn route_status(engine: &batchd_actors::Engine) -> Option<RouteStatus> {
    engine
        .context()
        .routes
        .all()
        .into_iter()
        .find(|r| r.route.model == MODEL)
        .map(|r| r.gate.status())
}

/// `n` small classification tasks, all naming [`MODEL`].
fn task_bodies(n: usize) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| {
            let id = format!("capacity-{i:08}");
            let body = model_task(&id, i, Priority::P2);
            (id, body)
        })
        .collect()
}

/// A small classification task `id` naming [`MODEL`], at `priority`.
pub(super) fn model_task(id: &str, i: usize, priority: Priority) -> Bytes {
    let body = serde_json::json!({
        "task_id": id,
        "type": "classification",
        "model": MODEL,
        "payload": {
            "text": format!("Ticket {i}: the export finished but two columns were empty."),
            "options": {"labels": "bug,question,praise"},
        },
        "priority": priority.number(),
        "tenant": "bench",
    });
    Bytes::from(body.to_string())
}

/// The capacity table, under the floor's.
pub(super) fn write_table(f: &mut fmt::Formatter<'_>, results: &[CapacityResult]) -> fmt::Result {
    writeln!(
        f,
        "capacity: one model ({MODEL}) on `batchd sim`, its limits not in batchd's config; \
         the simulated provider runs in this process"
    )?;
    writeln!(
        f,
        "{:<34}{:>6}{:>11}{:>9}{:>9}{:>11}{:>9}{:>9}{:>14}",
        "sim setting",
        "secs",
        "limit",
        "steady",
        "from",
        "whole run",
        "429s",
        "tasks/s",
        "CPU us/task"
    )?;
    for r in results {
        let steady = r
            .steady_share()
            .map_or_else(|| "-".to_owned(), |s| format!("{:.1}%", s * 100.0));
        let cpu = r
            .cpu_us_per_task()
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}"));
        writeln!(
            f,
            "{:<34}{:>6.0}{:>11}{:>9}{:>9}{:>11}{:>9}{:>9.0}{:>14}",
            r.label(),
            r.seconds,
            format!("{}/min", r.setting.rpm),
            steady,
            format!("{:.0} s", r.warmup),
            format!("{:.1}%", r.whole_share() * 100.0),
            format!("{:.2}%", r.rate_limited_share() * 100.0),
            r.tasks_per_sec(),
            cpu
        )?;
    }
    for r in results {
        writeln!(
            f,
            "capacity bar, {}: steady >= {:.0}% of the limit and 429s < {}%: {}",
            r.label(),
            r.bar() * 100.0,
            RATE_LIMITED_BAR * 100.0,
            if r.meets_bar() { "met" } else { "NOT met" }
        )?;
    }
    writeln!(
        f,
        "steady: successes from `from` to the end over the limit; whole run: the provider's \
         bucket starts full, so it may exceed 100%; 429s: of all requests"
    )?;
    for r in results {
        let marks = r.at_intervals();
        let join = |v: Vec<String>| v.join(" ");
        writeln!(
            f,
            "{}: successes per {INTERVAL_SECS} s (limit {:.0}): {}",
            r.label(),
            f64::from(r.setting.rpm) * INTERVAL_SECS as f64 / 60.0,
            join(
                r.successes_per_interval()
                    .iter()
                    .map(u64::to_string)
                    .collect()
            )
        )?;
        writeln!(
            f,
            "{}: route concurrency limit per {INTERVAL_SECS} s: {}; learned rpm {}; {} of {} requests answered 429",
            r.label(),
            join(
                marks
                    .iter()
                    .map(|s| s.concurrency_limit.map_or_else(|| "-".to_owned(), |c| c.to_string()))
                    .collect()
            ),
            r.samples
                .last()
                .and_then(|s| s.rpm_limit)
                .map_or_else(|| "none".to_owned(), |l| l.to_string()),
            r.stats.rate_limited,
            r.stats.requests
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(rpm: u32, seconds: u64, per_second: impl Fn(u64) -> u64) -> CapacityResult {
        let mut succeeded = 0;
        let samples = (0..=seconds)
            .map(|t| {
                if t > 0 {
                    succeeded += per_second(t);
                }
                Sample {
                    at: t as f64,
                    succeeded,
                    concurrency_limit: Some(16),
                    rpm_limit: Some(u64::from(rpm)),
                }
            })
            .collect();
        CapacityResult {
            setting: CapacitySetting {
                rpm,
                latency_ms: 1000,
            },
            replicas: 1,
            seconds: seconds as f64,
            warmup: 60.0,
            samples,
            stats: SimStats {
                requests: succeeded + 10,
                succeeded,
                rate_limited: 10,
                ..SimStats::default()
            },
            backlog: 0,
            outcomes: succeeded,
            cpu_seconds: Some(1.0),
        }
    }

    #[test]
    fn steady_share_leaves_out_the_initial_bucket() {
        // A burst of a whole bucket in the first second, then the limit.
        let r = result(1200, 180, |t| if t == 1 { 1200 } else { 20 });
        assert!((r.steady_share().unwrap() - 1.0).abs() < 1e-9);
        let whole = (1200.0 + 179.0 * 20.0) / (1200.0 * 3.0);
        assert!((r.whole_share() - whole).abs() < 1e-9);
        assert!(r.rate_limited_share() < RATE_LIMITED_BAR);
        assert!(r.meets_bar());
        let per_interval = r.successes_per_interval();
        assert_eq!(per_interval.len(), 18);
        assert_eq!(per_interval[0], 1200 + 9 * 20);
        assert_eq!(per_interval[17], 200);
    }

    #[test]
    fn a_slow_steady_state_or_many_429s_miss_the_bar() {
        let slow = result(1200, 180, |_| 18);
        assert!((slow.steady_share().unwrap() - 0.9).abs() < 1e-9);
        assert!(!slow.meets_bar());
        let mut limited = result(1200, 180, |_| 20);
        limited.stats.rate_limited = limited.stats.requests / 100;
        assert!(!limited.meets_bar());
        // Replicas sharing one limit: 90% is the bar.
        let mut shared = result(1200, 180, |_| 18);
        shared.replicas = 3;
        assert!(shared.meets_bar());
        assert!(
            shared.label().ends_with(", 3 replicas"),
            "{}",
            shared.label()
        );
    }

    #[test]
    fn a_run_shorter_than_the_warmup_has_no_steady_window_unless_told() {
        let mut r = result(1200, 20, |_| 20);
        assert_eq!(r.steady_share(), None);
        assert!(!r.meets_bar());
        r.warmup = 10.0;
        assert!((r.steady_share().unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(r.successes_per_interval(), [200, 200]);
        let tail = result(1200, 25, |_| 20);
        assert_eq!(tail.successes_per_interval(), [200, 200, 100]);
    }

    #[test]
    fn settings_parse_and_print_as_rpm_colon_latency() {
        let s: CapacitySetting = "12000:1000".parse().unwrap();
        assert_eq!(s, CapacitySetting::BAR[0]);
        assert_eq!(s.to_string(), "12000:1000");
        assert_eq!(s.sim_args(), "--rpm 12000 --latency-ms 1000");
        assert_eq!(s.backlog(180), 52_800);
        for bad in ["12000", "0:100", "x:1", "1:y"] {
            assert!(bad.parse::<CapacitySetting>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tasks_are_valid_and_all_go_to_one_model() {
        let config = Config::defaults().unwrap();
        let catalog = config.engine_settings().catalog;
        for (id, body) in task_bodies(5) {
            let task = batchd_actors::codec::decode_task(batchd_actors::codec::Inbound {
                priority: Priority::P2,
                content_type: None,
                body: &body,
                published_at: chrono::Utc::now(),
                max_payload_bytes: config.intake.max_payload_bytes,
                generation: 0,
                reply_to: &batchd_actors::codec::ReplyPolicy::default_for("batchd"),
            })
            .unwrap();
            assert_eq!(task.task_id, id);
            let plan = batchd_actors::routing::plan(&task, &catalog, chrono::Utc::now()).unwrap();
            assert_eq!(plan.route.model, MODEL);
        }
    }
}
