//! `batchd bench`: the raw JetStream floor and batchd end to end, measured
//! side by side in one run on the same machine.
//!
//! Three phases, each on a fresh private `nats-server` (or, with
//! `--nats-url`, on streams of its own that are deleted afterwards), each over
//! the same N seed-shaped task bodies published to the tasks subject first:
//!
//! - (a) the floor: a pull consumer with the engine's `max_ack_pending` and
//!   fetch batch pulls each task, publishes a result awaiting its PubAck and
//!   acks, with as many tasks in flight as `max_ack_pending` allows. This is
//!   what any JetStream worker must do per task; nothing can go faster.
//! - (b) batchd with an instant in-process provider: what the engine costs.
//! - (c) batchd with the simulated provider over HTTP (no latency): what the
//!   HTTP client adds.
//!
//! Each phase is timed from the first pull (the engine's start) until N
//! results are in the results stream; publishing is timed apart.
//!
//! With `--capacity`, [`capacity`] then measures how much of a rate-limited
//! provider's capacity batchd uses, and how many of its requests are answered
//! 429.
//!
//! With `--backlog`, [`backlog`] alone runs instead: the resident memory of
//! `batchd run` with a small and a large backlog queued, and their ratio.
//!
//! With `--preemption`, [`preemption`] alone runs instead: priority-1
//! latency while bulk work fills a rate-limited route, with preemption on
//! and off. With `--replicas`, [`replicas`] alone runs instead: the
//! throughput of 1, 2 and 3 replicas on a single server and on a 3-node
//! cluster. With `--cost`, [`cost`] alone runs instead: the reference
//! workload naive, with batchd's defaults and with every cost lever on,
//! each priced from the simulated provider's bill. With `--routing`,
//! [`routing`] alone runs instead: the demo's workload realtime only, with
//! the Batch API for priority 3, and with the Batch API and flex: cost from
//! the simulator's bill and priority-3 latency.

pub mod backlog;
mod capacity;
pub mod cost;
pub mod preemption;
pub mod replicas;
pub mod routing;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer, stream};
use batchd_actors::ports::Provider;
use batchd_actors::task::{Encoding, Priority};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::progress_bar as bar;
use crate::client::{namespace, Namespace, Outgoing, Publisher, Subjects};
use crate::config::{Config, NatsConfig};
use crate::local_nats::LocalNats;
use crate::provider::InstantProvider;
use crate::sim::{SimConfig, SimServer};

pub use capacity::{CapacityResult, CapacitySetting, CAPACITY_BAR, RATE_LIMITED_BAR};

/// How often the results stream is counted while the engine runs.
const POLL: Duration = Duration::from_millis(10);
/// The minimum the engine must reach, as a fraction of the floor.
pub const BAR: f64 = 0.25;

/// Arguments of `batchd bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Tasks per phase (default 20,000; 10,000 with --cost; 5,000 with --routing)
    #[arg(long)]
    pub tasks: Option<usize>,
    /// Use this NATS server instead of a private one per phase (each phase
    /// uses streams of its own, deleted afterwards)
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Give up a phase after this many seconds
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Then measure the share of a rate-limited provider's capacity batchd
    /// uses, and the share of its requests answered 429, for each
    /// --capacity-sim setting
    #[arg(long)]
    pub capacity: bool,
    /// Seconds each --capacity setting runs
    #[arg(long, default_value_t = 180)]
    pub capacity_secs: u64,
    /// A simulated provider for --capacity (one model, its limits not in
    /// batchd's config), repeatable
    #[arg(
        long = "capacity-sim",
        value_name = "RPM:LATENCY_MS",
        default_values_t = CapacitySetting::BAR
    )]
    pub capacity_sims: Vec<CapacitySetting>,
    /// Replicas sharing each --capacity provider's limit (engines of their
    /// own in this process, each with its own NATS connection and name)
    #[arg(long, default_value_t = 1)]
    pub capacity_replicas: usize,
    /// Instead of the phases: the resident memory of `batchd run` with each
    /// --backlog-sizes backlog queued in JetStream, and the ratio
    #[arg(long)]
    pub backlog: bool,
    /// Backlog sizes for --backlog, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 1_000_000])]
    pub backlog_sizes: Vec<usize>,
    /// Seconds `batchd run` runs over each backlog before its memory is read
    #[arg(long, default_value_t = 30)]
    pub backlog_secs: u64,
    /// Instead of the phases: priority-1 latency from publish to outcome
    /// while bulk work fills a rate-limited route, preemption on and off
    #[arg(long)]
    pub preemption: bool,
    /// The simulated provider for --preemption
    #[arg(long, value_name = "RPM:LATENCY_MS", default_value = "1200:300")]
    pub preemption_sim: CapacitySetting,
    /// Priority-3 tasks queued before each --preemption run
    #[arg(long, default_value_t = 50_000)]
    pub preemption_bulk: usize,
    /// Seconds of bulk work alone before priority-1 tasks start
    #[arg(long, default_value_t = 30)]
    pub preemption_warmup_secs: u64,
    /// Seconds priority-1 tasks are published
    #[arg(long, default_value_t = 60)]
    pub preemption_secs: u64,
    /// Priority-1 tasks published per second
    #[arg(long, default_value_t = 5.0)]
    pub preemption_rate: f64,
    /// Instead of the phases: the throughput of --replica-counts replicas
    /// with the instant provider, on a private server and on a private
    /// 3-node cluster (R3)
    #[arg(long)]
    pub replicas: bool,
    /// Replica counts for --replicas, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 3])]
    pub replica_counts: Vec<usize>,
    /// Instead of the phases: the reference workload run naive, with
    /// batchd's defaults and with every cost lever on, each priced from the
    /// simulated provider's bill
    #[arg(long)]
    pub cost: bool,
    /// Seed of the --cost and --routing workloads
    #[arg(long, default_value_t = 42)]
    pub cost_seed: u64,
    /// Seconds the simulated provider takes to finish a batch job (--cost,
    /// --routing)
    #[arg(long, default_value_t = 5.0)]
    pub batch_secs: f64,
    /// Instead of the phases: the demo's workload realtime only, with the
    /// Batch API for priority 3, and with the Batch API and flex for the
    /// priority-3 tasks whose deadline is too close for a batch window; cost
    /// from the simulated provider's bill and priority-3 latency of each
    #[arg(long)]
    pub routing: bool,
    /// Share of the --routing workload's priority-3 tasks given a deadline
    /// two hours away (0.0..=1.0)
    #[arg(long, default_value_t = 0.33, value_parser = crate::sim::parse_fraction)]
    pub routing_near_share: f64,
}

impl BenchArgs {
    /// Tasks per phase.
    pub fn task_count(&self) -> usize {
        self.tasks.unwrap_or(if self.routing {
            5_000
        } else if self.cost {
            10_000
        } else {
            20_000
        })
    }

    /// What `--routing` runs.
    pub fn routing_plan(&self) -> routing::RoutingPlan {
        routing::RoutingPlan {
            tasks: u64::try_from(self.task_count()).unwrap_or(u64::MAX),
            seed: self.cost_seed,
            batch_secs: self.batch_secs,
            near_share: self.routing_near_share,
            timeout: Duration::from_secs(self.timeout),
        }
    }

    /// What `--cost` runs.
    pub fn cost_plan(&self) -> cost::CostPlan {
        cost::CostPlan {
            tasks: self.task_count(),
            seed: self.cost_seed,
            batch_secs: self.batch_secs,
            timeout: Duration::from_secs(self.timeout),
        }
    }

    /// What `--preemption` runs.
    pub fn preemption_plan(&self) -> preemption::PreemptionPlan {
        preemption::PreemptionPlan {
            setting: self.preemption_sim,
            bulk: self.preemption_bulk,
            warmup_secs: self.preemption_warmup_secs,
            secs: self.preemption_secs,
            rate: self.preemption_rate,
        }
    }
}

/// One measured phase.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseResult {
    /// What was measured.
    pub name: &'static str,
    /// Tasks.
    pub tasks: usize,
    /// Wall time.
    pub seconds: f64,
    /// CPU time of this process (user + system) during the phase, where the
    /// platform reports it; the NATS server's own CPU is not included.
    pub cpu_seconds: Option<f64>,
}

impl PhaseResult {
    /// This process's CPU time per task, in microseconds.
    pub fn cpu_us_per_task(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (self.tasks > 0).then(|| cpu * 1e6 / self.tasks as f64)
    }

    /// Tasks per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tasks as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The figures of one `batchd bench` run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Tasks per phase.
    pub tasks: usize,
    /// Publishing the tasks with PubAcks (phase a's publish).
    pub publish: PhaseResult,
    /// (a) pull, publish a result with PubAck, ack.
    pub floor: PhaseResult,
    /// (b) batchd with the instant provider.
    pub instant: PhaseResult,
    /// (c) batchd with the simulated provider over HTTP.
    pub sim: PhaseResult,
    /// Logical cores of the machine.
    pub cores: usize,
    /// `nats-server` version from the server's INFO.
    pub nats_server_version: String,
    /// Whether the phases ran on private servers.
    pub private_servers: bool,
    /// `--capacity`: one result per simulated provider setting.
    pub capacity: Vec<CapacityResult>,
}

impl BenchReport {
    /// (b) / (a).
    pub fn instant_ratio(&self) -> f64 {
        ratio(self.instant.rate(), self.floor.rate())
    }

    /// (c) / (a).
    pub fn sim_ratio(&self) -> f64 {
        ratio(self.sim.rate(), self.floor.rate())
    }

    /// True when (b) reaches [`BAR`] of the floor.
    pub fn meets_bar(&self) -> bool {
        self.instant_ratio() >= BAR
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<48}{:>8}{:>10}{:>11}{:>10}{:>14}",
            "phase", "tasks", "seconds", "tasks/s", "vs floor", "CPU us/task"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, p: &PhaseResult, vs: Option<f64>| {
            let vs = vs.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
            let cpu = p
                .cpu_us_per_task()
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}"));
            writeln!(
                f,
                "{:<48}{:>8}{:>10.3}{:>11.0}{:>10}{:>14}",
                p.name,
                p.tasks,
                p.seconds,
                p.rate(),
                vs,
                cpu
            )
        };
        row(f, &self.publish, None)?;
        row(f, &self.floor, Some(1.0))?;
        row(f, &self.instant, Some(self.instant_ratio()))?;
        row(f, &self.sim, Some(self.sim_ratio()))?;
        writeln!(
            f,
            "bar (b)/(a) >= {BAR}: {} ({:.2})",
            if self.meets_bar() { "met" } else { "NOT met" },
            self.instant_ratio()
        )?;
        if !self.capacity.is_empty() {
            capacity::write_table(f, &self.capacity)?;
        }
        writeln!(
            f,
            "CPU us/task: this process only (engine, client, and in (c) the simulated provider), not nats-server"
        )?;
        write!(
            f,
            "machine: {} cores, {}/{}; nats-server {} ({}); batchd {}",
            self.cores,
            std::env::consts::OS,
            std::env::consts::ARCH,
            self.nats_server_version,
            if self.private_servers {
                "private, file store"
            } else {
                "shared"
            },
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// Runs `batchd bench`, prints the table and returns the figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let tasks = args.task_count();
    if tasks == 0 {
        bail!("--tasks must be at least 1");
    }
    let mut base = Config::defaults()?;
    base.realtime_only();
    // The phases' backlogs, not the production bound: a shared server may
    // not have that to reserve.
    base.nats
        .size_tasks_for(u64::try_from(tasks.max(60_000)).unwrap_or(u64::MAX));
    let timeout = Duration::from_secs(args.timeout);
    let bodies = task_bodies(&base, tasks);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    eprintln!(
        "batchd bench: {} tasks per phase, {cores} cores, {}",
        tasks,
        match &args.nats_url {
            Some(url) => format!("NATS at {url}"),
            None => "a private nats-server per phase".into(),
        }
    );

    let server = Server::open(args.nats_url.as_deref(), &base).await?;
    let nats_server_version = server.client.server_info().version;
    let floor = floor_phase(&server, &base, &bodies, timeout).await;
    server.close().await;
    let (publish, floor) = floor?;

    let server = Server::open(args.nats_url.as_deref(), &base).await?;
    let instant = engine_phase(
        &server,
        &base,
        &bodies,
        Backend::Instant,
        "(b) batchd end to end, instant provider",
        timeout,
    )
    .await;
    server.close().await;
    let instant = instant?;

    let sim_server = SimServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig::default(),
    )
    .await
    .context("starting the simulated provider")?;
    let server = Server::open(args.nats_url.as_deref(), &base).await?;
    let sim = engine_phase(
        &server,
        &base,
        &bodies,
        Backend::Http(sim_server.base_url()),
        "(c) batchd end to end, simulated HTTP provider",
        timeout,
    )
    .await;
    server.close().await;
    sim_server.shutdown().await;
    let sim = sim?;

    let mut capacity = Vec::new();
    if args.capacity {
        for setting in &args.capacity_sims {
            let server = Server::open(args.nats_url.as_deref(), &base).await?;
            let result = capacity::measure(
                &server,
                &base,
                *setting,
                args.capacity_secs,
                args.capacity_replicas,
            )
            .await;
            server.close().await;
            capacity.push(result?);
        }
    }

    let report = BenchReport {
        tasks,
        publish,
        floor,
        instant,
        sim,
        cores,
        nats_server_version,
        private_servers: args.nats_url.is_none(),
        capacity,
    };
    println!("{report}");
    Ok(report)
}

/// The seed-shaped task bodies, `type` cycling through the config's task types.
pub fn task_bodies(config: &Config, n: usize) -> Vec<(String, Bytes)> {
    let types: Vec<&String> = config.task_types.keys().collect();
    (0..n).map(|i| task_body(&types, i)).collect()
}

/// The `i`-th seed-shaped task body (id `bench-<i>`), of a type from `types`.
pub fn task_body(types: &[&String], i: usize) -> (String, Bytes) {
    let id = format!("bench-{i:08}");
    let task_type = types
        .get(i % types.len().max(1))
        .map_or("content_analysis", |t| t.as_str());
    let body = serde_json::json!({
        "task_id": id,
        "type": task_type,
        "payload": {
            "text": format!("Document {i}: quarterly revenue grew while churn fell; the team shipped two releases and hired three engineers."),
            "options": {"language": "en", "labels": "positive,negative,neutral", "fields": "sector,size", "style": "brief", "max_words": 50},
        },
        "priority": 2,
        "tenant": "bench",
        "metadata": {"n": i},
    });
    (id, Bytes::from(body.to_string()))
}

/// Where a phase runs: a private server, or a namespace on a shared one.
struct Server {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The base config's NATS section in a namespace of its own, so phases
    /// never share state.
    nats: NatsConfig,
    local: Option<LocalNats>,
}

impl Server {
    async fn open(url: Option<&str>, base: &Config) -> anyhow::Result<Server> {
        let (local, url) = match url {
            Some(u) => (None, u.to_owned()),
            None => {
                let l = LocalNats::start().await?;
                let u = l.url().to_owned();
                (Some(l), u)
            }
        };
        let client = crate::nats::connect(&crate::config::NatsConfig {
            url: url.clone(),
            ..base.nats.clone()
        })
        .await?;
        let js = jetstream::new(client.clone());
        let mut nats = base.nats.clone();
        Namespace::new(format!(
            "bench{}",
            ulid::Ulid::new().to_string().to_lowercase()
        ))
        .apply(&mut nats);
        nats.url = url;
        Ok(Server {
            client,
            js,
            nats,
            local,
        })
    }

    /// On a shared server, deletes what the phase created (whether it
    /// succeeded or not); a private server is stopped and removed on drop.
    async fn close(self) {
        if self.local.is_none() {
            if let Err(e) = namespace::remove(&self.js, &self.nats).await {
                tracing::debug!(error = %e, "bench streams or buckets not deleted");
            }
        }
        let _ = self.client.drain().await;
    }
}

/// Publishes every body on `subject` with `Nats-Msg-Id`, a window of PubAcks
/// in flight; returns the time taken.
async fn publish_tasks(
    js: &jetstream::Context,
    subject: &str,
    bodies: &[(String, Bytes)],
    label: &str,
) -> anyhow::Result<Duration> {
    let pb = bar(bodies.len(), label);
    let started = Instant::now();
    let outgoing = bodies.iter().map(|(id, body)| Outgoing {
        subject: subject.to_owned(),
        msg_id: id.clone(),
        content_type: Encoding::Json.content_type(),
        body: body.clone(),
    });
    Publisher::new(js.clone())
        .publish_all(outgoing, |_| pb.inc(1))
        .await?;
    pb.finish_and_clear();
    Ok(started.elapsed())
}

/// (a): the same JetStream work per task as the engine's minimum, nothing else.
async fn floor_phase(
    server: &Server,
    base: &Config,
    bodies: &[(String, Bytes)],
    timeout: Duration,
) -> anyhow::Result<(PhaseResult, PhaseResult)> {
    let n = bodies.len();
    let js = &server.js;
    let (tasks_name, results_name) = (&server.nats.tasks_stream, &server.nats.results_stream);
    let subjects = Subjects::of(&server.nats);
    let task_subject = subjects.task(Priority::P2);
    let tasks = js
        .create_stream(stream::Config {
            name: tasks_name.clone(),
            subjects: vec![task_subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            max_messages: base.nats.tasks_max_msgs,
            max_bytes: base.nats.tasks_max_bytes,
            duplicate_window: Duration::from_secs(base.nats.duplicate_window_secs),
            allow_direct: true,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {tasks_name}"))?;
    js.create_stream(stream::Config {
        name: results_name.clone(),
        subjects: vec![subjects.results()],
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: Duration::from_secs(base.nats.duplicate_window_secs),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {results_name}"))?;

    let cpu_before = process_cpu();
    let publish_time = publish_tasks(js, &task_subject, bodies, "publish").await?;
    let publish_cpu = cpu_since(cpu_before);
    let consumer: consumer::PullConsumer = tasks
        .create_consumer(consumer::pull::Config {
            durable_name: Some("floor".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(base.intake.ack_wait_secs),
            max_deliver: -1,
            max_ack_pending: base.intake.max_ack_pending,
            ..Default::default()
        })
        .await
        .context("creating the floor's consumer")?;
    let max_in_flight = usize::try_from(base.intake.max_ack_pending).unwrap_or(1000);
    // An outcome-sized result body.
    let result_body = Bytes::from(
        serde_json::json!({
            "status": "succeeded", "output": "ok", "finish_reason": "stop", "error": null,
            "model": "gpt-4.1-nano", "provider": "openai", "route": "realtime",
            "usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 10},
            "cost_usd": 0.000014, "attempts": 1, "batch_id": "b_01JBENCHBENCHBENCHBENCHBENC",
            "priority": 2, "tenant": "bench",
            "timings": {"queued_ms": 1, "processing_ms": 0, "total_ms": 1},
            "metadata": {"n": 0}, "completed_at": "2026-01-01T00:00:00.000Z",
        })
        .to_string(),
    );

    let publisher = Publisher::new(js.clone());
    let pb = bar(n, "(a)");
    let cpu_before = process_cpu();
    let started = Instant::now();
    let messages = consumer
        .stream()
        .max_messages_per_batch(base.intake.fetch_batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .context("pulling from the floor's consumer")?;
    // Boxed so it can be dropped (stopping the pulls) before the results are counted.
    let mut work = Box::pin(
        messages
            .take(n)
            .map(|m| {
                let publisher = &publisher;
                let subjects = &subjects;
                let result_body = result_body.clone();
                async move {
                    let m = m.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                    let id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                        .map(|v| v.as_str().to_owned())
                        .context("a task without Nats-Msg-Id")?;
                    publisher
                        .publish(Outgoing {
                            subject: subjects.result(&id),
                            msg_id: id,
                            content_type: Encoding::Json.content_type(),
                            body: result_body,
                        })
                        .await
                        .context("publishing a result")?;
                    m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(max_in_flight),
    );
    let deadline = started + timeout;
    let mut done = 0;
    while done < n {
        match tokio::time::timeout_at(deadline, work.next()).await {
            Ok(Some(r)) => {
                r?;
                done += 1;
                pb.inc(1);
            }
            Ok(None) => break,
            Err(_) => bail!("(a) finished {done} of {n} tasks within {timeout:?}"),
        }
    }
    let elapsed = started.elapsed();
    let floor_cpu = cpu_since(cpu_before);
    pb.finish_and_clear();
    drop(work);
    if done < n {
        bail!("(a) the consumer ended after {done} of {n} tasks");
    }
    let mut results = js.get_stream(results_name).await?;
    let stored = results.info().await?.state.messages;
    if stored != n as u64 {
        bail!("(a) the results stream holds {stored} results for {n} tasks");
    }
    let publish = PhaseResult {
        name: "(a) publish tasks, PubAck each",
        tasks: n,
        seconds: publish_time.as_secs_f64(),
        cpu_seconds: publish_cpu,
    };
    let floor = PhaseResult {
        name: "(a) JetStream floor: pull, publish+PubAck, ack",
        tasks: n,
        seconds: elapsed.as_secs_f64(),
        cpu_seconds: floor_cpu,
    };
    Ok((publish, floor))
}

enum Backend {
    Instant,
    Http(String),
}

/// (b) and (c): publish, start the engine, time until every outcome is stored.
async fn engine_phase(
    server: &Server,
    base: &Config,
    bodies: &[(String, Bytes)],
    backend: Backend,
    name: &'static str,
    timeout: Duration,
) -> anyhow::Result<PhaseResult> {
    let n = bodies.len();
    let mut config = base.clone();
    config.nats = server.nats.clone();
    let providers = match &backend {
        Backend::Instant => instant_providers(&config),
        Backend::Http(url) => http_providers(&mut config, url)?,
    };
    let topology = crate::nats::ensure_topology(&server.client, &config).await?;
    let label = if matches!(backend, Backend::Instant) {
        "(b)"
    } else {
        "(c)"
    };
    publish_tasks(
        &server.js,
        &config.subjects().task(Priority::P2),
        bodies,
        &format!("{label} pub"),
    )
    .await?;

    let pb = bar(n, label);
    let cpu_before = process_cpu();
    let started = Instant::now();
    let running = crate::app::start(&config, providers).await?;
    let mut results = topology.results.clone();
    let outcome = until_stored(&mut results, n, started, timeout, &pb, label)
        .await
        .map(|()| (started.elapsed(), cpu_since(cpu_before)));
    pb.finish_and_clear();
    running.engine.shutdown().await;
    let _ = running.client.drain().await;
    let (elapsed, cpu_seconds) = outcome?;
    let mut dlq = topology.dlq.clone();
    let dead = dlq.info().await.map(|i| i.state.messages).unwrap_or(0);
    if dead > 0 {
        tracing::warn!(dead, "{label}: some tasks failed; see the DLQ");
        eprintln!("warning: {label}: {dead} of {n} tasks failed (dead letters)");
    }
    Ok(PhaseResult {
        name,
        tasks: n,
        seconds: elapsed.as_secs_f64(),
        cpu_seconds,
    })
}

/// Polls `results` until it holds `n` outcomes, or fails once `timeout`
/// has passed since `started` (`label` names the phase).
async fn until_stored(
    results: &mut stream::Stream,
    n: usize,
    started: Instant,
    timeout: Duration,
    pb: &indicatif::ProgressBar,
    label: &str,
) -> anyhow::Result<()> {
    loop {
        let stored = results
            .info()
            .await
            .context("counting the results")?
            .state
            .messages;
        pb.set_position(stored);
        if stored >= n as u64 {
            return Ok(());
        }
        if Instant::now() > started + timeout {
            bail!("{label} {stored} of {n} outcomes within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The instant in-process provider under every provider name of `config`.
fn instant_providers(config: &Config) -> HashMap<String, Arc<dyn Provider>> {
    config
        .providers
        .keys()
        .map(|k| (k.clone(), Arc::new(InstantProvider) as Arc<dyn Provider>))
        .collect()
}

/// Points every provider of `config` at `url` (the simulated provider) and
/// builds their HTTP clients.
fn http_providers(
    config: &mut Config,
    url: &str,
) -> anyhow::Result<HashMap<String, Arc<dyn Provider>>> {
    for p in config.providers.values_mut() {
        p.base_url = url.to_owned();
        p.base_url_env = None;
        p.api_key_env = None;
        p.api_key = Some("sk-bench".into());
    }
    crate::app::http_providers(config)
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat`
/// (Linux reports it in USER_HZ = 100 ticks per second); `None` elsewhere.
fn process_cpu() -> Option<f64> {
    cpu_of("/proc/self/stat")
}

/// CPU time (user + system) of the process whose `stat` file is `path`.
fn cpu_of(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn cpu_since(before: Option<f64>) -> Option<f64> {
    Some(process_cpu()? - before?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(seconds: f64) -> PhaseResult {
        PhaseResult {
            name: "x",
            tasks: 1000,
            seconds,
            cpu_seconds: Some(0.05),
        }
    }

    #[test]
    fn ratios_are_rates_over_the_floor() {
        let r = BenchReport {
            tasks: 1000,
            publish: phase(0.1),
            floor: phase(1.0),
            instant: phase(4.0),
            sim: phase(8.0),
            cores: 2,
            nats_server_version: "2.15.1".into(),
            private_servers: true,
            capacity: Vec::new(),
        };
        assert!((r.instant_ratio() - 0.25).abs() < 1e-9);
        assert!((r.sim_ratio() - 0.125).abs() < 1e-9);
        assert!(r.meets_bar());
        assert_eq!(r.floor.cpu_us_per_task(), Some(50.0));
        let table = r.to_string();
        assert!(table.contains("bar (b)/(a) >= 0.25: met (0.25)"), "{table}");
        assert!(table.contains("nats-server 2.15.1"), "{table}");
    }

    #[test]
    fn bodies_are_valid_tasks_of_the_configured_types() {
        let config = Config::defaults().unwrap();
        let bodies = task_bodies(&config, 10);
        let catalog = config.engine_settings().catalog;
        let mut types = std::collections::HashSet::new();
        for (id, body) in &bodies {
            let task = batchd_actors::codec::decode_task(batchd_actors::codec::Inbound {
                priority: Priority::P2,
                content_type: None,
                body,
                published_at: chrono::Utc::now(),
                max_payload_bytes: config.intake.max_payload_bytes,
                generation: 0,
                reply_to: &batchd_actors::codec::ReplyPolicy::default_for("batchd"),
            })
            .unwrap();
            assert_eq!(&task.task_id, id);
            batchd_actors::routing::plan(&task, &catalog, chrono::Utc::now()).unwrap();
            types.insert(task.task_type.unwrap());
        }
        assert_eq!(types.len(), config.task_types.len());
    }

    #[test]
    fn process_cpu_grows() {
        if let Some(before) = process_cpu() {
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = x.wrapping_add(std::hint::black_box(i));
            }
            std::hint::black_box(x);
            assert!(process_cpu().unwrap() >= before);
        }
    }
}
