//! `batchd demo`: one command, no API key. It finds or starts a NATS
//! JetStream server, starts the simulated OpenAI provider and the engine in
//! this process, publishes a reproducible workload of thousands of tasks over
//! the three priorities (a few of them deliberately bad), shows live progress
//! while the outcomes come back, and prints a [`Report`].
//!
//! On a NATS server that may be someone else's (`--nats-url`, or one found on
//! the default port) everything the demo creates lives under a unique subject
//! prefix, stream, consumer and bucket names, and is deleted at the end.

use std::collections::HashSet;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use batchd_actors::task::Outcome;
use futures::StreamExt;
use indicatif::ProgressBar;
use tokio::time::Instant;

use crate::client::read::{read_stream, stream_len};
use crate::client::{namespace, Namespace, OutcomeSubscription, Outgoing, Publisher, Subjects};
use crate::config::Config;
use crate::local_nats::LocalNats;
use crate::report::table::group;
use crate::report::Report;
use crate::sim::{SimConfig, SimServer};

mod progress;
pub(crate) mod workload;

use progress::Progress;
use workload::{Message, Workload, TENANTS};

/// Where the demo looks for a running NATS server before starting its own.
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Silence after which the results stream, not the subscription, is read.
const STALL: Duration = Duration::from_secs(5);

/// Arguments of `batchd demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Tasks to publish, a few of them deliberately invalid
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub tasks: u64,
    /// NATS server to use [default: nats://127.0.0.1:4222 when it answers with JetStream, else a private nats-server]
    #[arg(long, env = "BATCHD_NATS_URL")]
    pub nats_url: Option<String>,
    /// Always start a private nats-server (ignores --nats-url)
    #[arg(long)]
    pub private_nats: bool,
    /// Listen address of the Prometheus /metrics endpoint (port 0: any free port)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: SocketAddr,
    /// Simulated provider: base response latency in milliseconds
    #[arg(long, default_value_t = 40)]
    pub latency_ms: u64,
    /// Simulated provider: random extra latency, up to this many milliseconds
    #[arg(long, default_value_t = 80)]
    pub jitter_ms: u64,
    /// Simulated provider: fraction of requests answered with a 500 (batchd retries them)
    #[arg(long, default_value_t = 0.02, value_parser = crate::sim::parse_fraction)]
    pub error_rate: f64,
    /// Simulated provider: requests per minute before it answers 429 (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    pub rpm: u32,
    /// Seed of the workload and of the simulated provider
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Simulated provider: seconds a Batch API batch takes (priority 3 goes
    /// through the Batch API in the demo)
    #[arg(long, default_value_t = 3.0)]
    pub batch_secs: f64,
    /// Send everything realtime (no Batch API), to compare cost and latency
    #[arg(long)]
    pub realtime_only: bool,
    /// Give up when outcomes are still missing after this many seconds
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// The NATS server the demo runs on.
enum Broker {
    /// Started by the demo; gone when dropped.
    Private(LocalNats),
    /// Someone's server: the demo isolates itself under `id` and cleans up.
    Shared { url: String, id: String },
}

impl Broker {
    fn url(&self) -> &str {
        match self {
            Broker::Private(n) => n.url(),
            Broker::Shared { url, .. } => url,
        }
    }
}

/// Runs `batchd demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let sim = SimServer::start(
        "127.0.0.1:0".parse()?,
        SimConfig {
            latency: Duration::from_millis(args.latency_ms),
            jitter: Duration::from_millis(args.jitter_ms),
            error_rate: args.error_rate,
            rpm: args.rpm,
            tpm: 0,
            seed: args.seed,
            record_requests: false,
            batch_duration: Duration::try_from_secs_f64(args.batch_secs.max(0.0))
                .unwrap_or(Duration::from_secs(3)),
            ..SimConfig::default()
        },
    )
    .await
    .context("starting the simulated provider")?;
    let broker = choose_broker(&args).await?;
    let isolation = match &broker {
        Broker::Private(_) => None,
        Broker::Shared { id, .. } => Some(id.as_str()),
    };
    let mut config = demo_config(broker.url(), isolation, &sim.base_url(), args.tasks)?;
    if args.realtime_only {
        config.realtime_only();
    }
    let health = crate::telemetry::Health::default();
    let (metrics_addr, metrics_task) =
        crate::telemetry::serve_metrics(args.metrics_addr, health.clone()).await?;
    let providers = crate::app::http_providers(&config)?;
    let running = match crate::app::start(&config, providers).await {
        Ok(r) => r,
        Err(e) => {
            if let Broker::Shared { .. } = broker {
                // Whatever was created before the failure.
                let _ = remove_demo_objects(&config).await;
            }
            return Err(e).with_context(|| format!("starting the engine on {}", broker.url()));
        }
    };
    health.set_ready(running.readiness(&config));

    let workload = Workload::generate(args.tasks, args.seed);
    print_header(&args, &broker, &config, &sim, metrics_addr, &workload);

    let outcome = drive(&config, &running.engine, workload, &args).await;

    if matches!(&outcome, Ok(r) if r.end == End::Interrupted) {
        println!("\nInterrupted: stopping the engine once in-flight requests finish (ctrl-c again to quit now)");
    }
    tokio::select! {
        _ = running.engine.shutdown() => {}
        _ = tokio::signal::ctrl_c() => println!("Not waiting for in-flight requests."),
    }
    let _ = running.client.drain().await;
    let stats = sim.stats();
    sim.shutdown().await;
    metrics_task.abort();
    let cleanup = match &broker {
        Broker::Shared { .. } => Some(remove_demo_objects(&config).await),
        Broker::Private(_) => None,
    };
    drop(broker);

    let mut run = outcome?;
    add_notes(&mut run, &config, stats, cleanup);
    let (arrived, expected) = (group(run.report.outcomes()), group(run.expected));
    let summary = match run.end {
        End::Complete => format!("All {arrived} outcomes arrived; the engine has stopped."),
        End::Interrupted => format!("Interrupted: {arrived} of {expected} outcomes arrived."),
        End::TimedOut => format!(
            "Timed out after {} s: {arrived} of {expected} outcomes arrived.",
            args.timeout_secs
        ),
        End::EngineStopped => {
            format!("The engine stopped on its own: {arrived} of {expected} outcomes arrived.")
        }
    };
    println!("\n{summary}\n");
    println!("{}", run.report.render());
    let missing = group(run.expected.saturating_sub(run.report.outcomes()));
    match run.end {
        End::Complete | End::Interrupted => Ok(()),
        End::TimedOut => bail!(
            "{missing} outcomes still missing after {} s",
            args.timeout_secs
        ),
        End::EngineStopped => {
            bail!("the engine stopped with {missing} outcomes missing (see the log above)")
        }
    }
}

/// The closing notes: what the provider saw, what JetStream dropped, cleanup.
fn add_notes(
    run: &mut Run,
    config: &Config,
    stats: crate::sim::SimStats,
    cleanup: Option<anyhow::Result<()>>,
) {
    let report = &mut run.report;
    report.add_note(format!(
        "the simulated provider got {} requests: {} answered, {} failed with 500 (retried)",
        group(stats.requests),
        group(stats.succeeded),
        group(stats.server_errors),
    ));
    if stats.rate_limited > 0 || stats.bad_requests > 0 {
        report.add_note(format!(
            "  and answered {} with 429 (rate limited), {} with 4xx (invalid)",
            group(stats.rate_limited),
            group(stats.bad_requests),
        ));
    }
    report.add_note(format!(
        "each model's concurrency adapts between 1 and {} requests in flight (dispatch.max_concurrency)",
        config.dispatch.max_concurrency
    ));
    if run.tally.duplicates > 0 {
        report.add_note(format!(
            "{} duplicate publishes (same Nats-Msg-Id) were dropped by JetStream",
            run.tally.duplicates,
        ));
    }
    if run.tally.from_stream > 0 {
        report.add_note(format!(
            "{} outcomes missed by the subscription were read from the results stream",
            group(run.tally.from_stream)
        ));
    }
    match cleanup {
        Some(Ok(())) => report.add_note(format!(
            "the demo's streams and buckets ({}_*) were removed",
            config.nats.tasks_stream.trim_end_matches("_TASKS"),
        )),
        Some(Err(e)) => report.add_note(format!("cleanup incomplete: {e:#}")),
        None => {}
    }
}

/// `--nats-url` if given; else the default URL if it answers with
/// JetStream; else a private nats-server.
async fn choose_broker(args: &DemoArgs) -> anyhow::Result<Broker> {
    let isolated = |url: &str| Broker::Shared {
        url: url.to_owned(),
        id: format!("{:06x}", rand::random::<u32>() & 0x00ff_ffff),
    };
    if !args.private_nats {
        if let Some(url) = &args.nats_url {
            return Ok(isolated(url));
        }
        if has_jetstream(DEFAULT_NATS_URL).await {
            return Ok(isolated(DEFAULT_NATS_URL));
        }
    }
    let nats = LocalNats::start()
        .await
        .context("starting a private nats-server for the demo")?;
    Ok(Broker::Private(nats))
}

/// True when a server at `url` answers within a second and has JetStream on.
async fn has_jetstream(url: &str) -> bool {
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(url);
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(client)) => {
            // The INFO that arrives with the connection says whether JetStream is on.
            let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
            client.server_info().jetstream
        }
        _ => false,
    }
}

/// The default config pointed at `nats_url` and the simulator, isolated
/// under `batchd_demo_<id>` when `isolation` is given.
pub(crate) fn demo_config(
    nats_url: &str,
    isolation: Option<&str>,
    sim_url: &str,
    tasks: u64,
) -> anyhow::Result<Config> {
    let mut config = Config::defaults()?;
    config.nats.url = nats_url.to_owned();
    if let Some(id) = isolation {
        Namespace::new(format!("batchd_demo_{id}")).apply(&mut config.nats);
    }
    // Room for the workload, not the production default: a shared server
    // may not have that to reserve.
    config.nats.size_tasks_for(tasks);
    // Only the simulator's Batch API: no other provider is asked.
    config.realtime_only();
    let provider = config
        .providers
        .get_mut("openai")
        .context("the default config has no `providers.openai`")?;
    provider.base_url = sim_url.to_owned();
    // The simulator, whatever OPENAI_BASE_URL / OPENAI_API_KEY say.
    provider.base_url_env = None;
    provider.api_key_env = None;
    provider.api_key = None;
    // Priority 3 goes through the simulator's Batch API at half price:
    // jobs assembled for up to two seconds and looked at often.
    provider.batch = crate::config::BatchUse::On;
    let b = &mut config.batching.batch_api;
    b.max_wait_ms = 2_000;
    b.poll_initial_ms = 250;
    b.poll_max_ms = 1_000;
    config.validate()?;
    Ok(config)
}

fn print_header(
    args: &DemoArgs,
    broker: &Broker,
    config: &Config,
    sim: &SimServer,
    metrics: SocketAddr,
    w: &Workload,
) {
    let mut errors = format!(", {}% errors", args.error_rate * 100.0);
    if args.rpm > 0 {
        errors.push_str(&format!(", {} requests/min", group(u64::from(args.rpm))));
    }
    let [p1, p2, p3] = w.per_priority;
    println!(
        "batchd demo: {} LLM tasks through NATS JetStream and a simulated provider\n",
        group(w.tasks())
    );
    match broker {
        Broker::Private(n) => {
            println!(
                "  NATS      {} (private nats-server, temporary store)",
                n.url()
            )
        }
        Broker::Shared { url, .. } => {
            println!("  NATS      {url} (existing server)");
            println!(
                "            isolated under {}.* and {}_*, removed at the end",
                config.nats.subject_prefix,
                config.nats.tasks_stream.trim_end_matches("_TASKS")
            );
        }
    }
    println!(
        "  provider  {} (simulated: {}-{} ms{errors}, seed {})",
        sim.base_url(),
        args.latency_ms,
        args.latency_ms + args.jitter_ms,
        args.seed
    );
    println!("  metrics   http://{metrics}/metrics (curl it while the demo runs)");
    println!(
        "  workload  p1 {}, p2 {}, p3 {}; 5 task types, {} tenants",
        group(p1),
        group(p2),
        group(p3),
        TENANTS.len(),
    );
    println!(
        "            {} as MessagePack, {} OpenAI chat bodies, {} OpenAI Batch lines",
        group(w.msgpack),
        group(w.chat),
        group(w.batch_lines),
    );
    println!(
        "            {} prompts sharing a long prefix (served from the prompt cache)",
        group(w.long_context)
    );
    if w.bad > 0 || w.duplicates > 0 {
        println!(
            "            {} bad inputs (dead letters), {} duplicate publishes (dropped)",
            w.bad, w.duplicates
        );
    }
    println!();
}

/// What happened to the publishes.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// PubAcks for new messages: each one will get exactly one outcome.
    accepted: u64,
    /// PubAcks flagged duplicate: dropped by JetStream.
    duplicates: u64,
    /// Outcomes read back from the results stream after the subscription missed them.
    from_stream: u64,
}

/// Publishes every message with a window of PubAcks in flight.
async fn publish_all(
    js: jetstream::Context,
    subjects: Subjects,
    messages: Vec<Message>,
    bar: ProgressBar,
) -> anyhow::Result<Tally> {
    let outgoing = messages.into_iter().map(|m| Outgoing {
        subject: subjects.task(m.priority),
        msg_id: m.msg_id,
        content_type: m.content_type,
        body: m.body,
    });
    let published = Publisher::new(js)
        .publish_all(outgoing, |_| bar.inc(1))
        .await
        .context("publishing the workload")?;
    Ok(Tally {
        accepted: published.stored() as u64,
        duplicates: published.duplicates as u64,
        from_stream: 0,
    })
}

/// How the wait for outcomes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Interrupted,
    TimedOut,
    EngineStopped,
}

struct Run {
    report: Report,
    /// Tasks that should get an outcome: accepted publishes, or the
    /// workload's unique tasks when publishing did not finish.
    expected: u64,
    end: End,
    tally: Tally,
}

/// Subscribes to outcomes and dead letters, publishes the workload and
/// collects outcomes until every accepted task has one.
async fn drive(
    config: &Config,
    engine: &batchd_actors::Engine,
    workload: Workload,
    args: &DemoArgs,
) -> anyhow::Result<Run> {
    let client = async_nats::ConnectOptions::new()
        .name("batchd-demo")
        .subscription_capacity(1 << 16)
        .connect(config.nats.url.as_str())
        .await
        .with_context(|| format!("connecting the demo client to {}", config.nats.url))?;
    let subjects = config.subjects();
    let mut results = OutcomeSubscription::subscribe(&client, &subjects).await?;
    let mut dead_letters = client
        .subscribe(subjects.dead_letters())
        .await
        .context("subscribing to dead letters")?;
    client
        .flush()
        .await
        .context("registering the subscriptions")?;
    let js = jetstream::new(client.clone());

    let workload_tasks = workload.tasks();
    let started = Instant::now();
    let mut progress = Progress::new(
        workload.messages.len() as u64,
        workload.per_priority,
        std::io::stdout().is_terminal(),
        started,
    );
    let mut publisher = tokio::spawn(publish_all(
        js.clone(),
        subjects,
        workload.messages,
        progress.published.clone(),
    ));

    let mut report = Report::with_prices(config.prices.clone())
        .with_reference_model(config.tiers.complex.clone());
    let mut tally: Option<Tally> = None;
    let mut dlq_seen: HashSet<String> = HashSet::new();
    let mut undecodable = 0u64;
    let mut from_stream = 0u64;
    let mut last_outcome = started;
    let mut last_progress = started;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    let end = loop {
        if let Some(t) = &tally {
            if report.outcomes() >= t.accepted {
                break End::Complete;
            }
        }
        tokio::select! {
            m = results.next() => {
                let Some((task_id, decoded)) = m else { bail!("the outcome subscription closed") };
                match decoded {
                    Ok(o) => {
                        if report.record(&o) {
                            last_outcome = Instant::now();
                            last_progress = last_outcome;
                            progress.completed(&o);
                        }
                    }
                    Err(e) => {
                        undecodable += 1;
                        tracing::warn!(task_id = %task_id, error = %e, "undecodable outcome");
                    }
                }
            }
            m = dead_letters.next() => {
                if let Some(m) = m {
                    dlq_seen.insert(m.subject.to_string());
                }
            }
            r = &mut publisher, if tally.is_none() => {
                let t = r.context("the publisher task failed")??;
                progress.published_all();
                tally = Some(t);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                progress.tick(&report);
                if now > deadline {
                    break End::TimedOut;
                }
                if !engine.is_running() {
                    break End::EngineStopped;
                }
                if let Some(t) = &tally {
                    if now - last_progress > STALL && report.outcomes() < t.accepted {
                        // Core NATS drops messages for a slow subscriber; the
                        // results stream has them all.
                        let before = report.outcomes();
                        read_results_stream(&config.nats.url, &config.nats.results_stream, &mut report).await?;
                        from_stream += report.outcomes() - before;
                        progress.sync(&report);
                        last_progress = now;
                    }
                }
            }
            _ = &mut ctrl_c => break End::Interrupted,
        }
    };
    let elapsed = last_outcome - started;
    progress.finish();
    if tally.is_none() {
        publisher.abort();
    }
    // Dead letters are published before their outcomes: they are all here.
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(100), dead_letters.next()).await
    {
        dlq_seen.insert(m.subject.to_string());
    }
    report.set_elapsed(elapsed);
    report.set_dead_letters(dlq_seen.len() as u64);
    if undecodable > 0 {
        report.add_note(format!(
            "{undecodable} outcome messages could not be decoded"
        ));
    }
    let _ = client.drain().await;
    let expected = tally.map_or(workload_tasks, |t| t.accepted);
    let mut tally = tally.unwrap_or_default();
    tally.from_stream = from_stream;
    Ok(Run {
        report,
        expected,
        end,
        tally,
    })
}

/// Records the outcomes of the results stream when it holds more than the
/// report has (the report skips the ones it already counted).
async fn read_results_stream(
    nats_url: &str,
    stream: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Its own connection: the subscriptions' client is the one falling behind.
    let client = async_nats::connect(nats_url)
        .await
        .with_context(|| format!("connecting to {nats_url} to read {stream}"))?;
    let js = jetstream::new(client.clone());
    let result = async {
        if stream_len(&js, stream).await? > report.outcomes() {
            read_stream(&js, stream, |_, o: Result<Outcome, _>| {
                if let Ok(o) = o {
                    report.record(&o);
                }
            })
            .await?;
        }
        anyhow::Ok(())
    }
    .await;
    let _ = client.drain().await;
    result
}

/// Deletes the demo's streams and buckets from a shared server.
async fn remove_demo_objects(config: &Config) -> anyhow::Result<()> {
    let client = async_nats::connect(config.nats.url.as_str())
        .await
        .with_context(|| format!("connecting to {} to clean up", config.nats.url))?;
    let removed = namespace::remove(&jetstream::new(client.clone()), &config.nats).await;
    let _ = client.drain().await;
    Ok(removed?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_server_gets_isolated_names() {
        let c = demo_config(
            "nats://127.0.0.1:4222",
            Some("abc123"),
            "http://127.0.0.1:1/v1",
            5000,
        )
        .unwrap();
        assert_eq!(c.nats.subject_prefix, "batchd_demo_abc123");
        assert_eq!(c.nats.tasks_stream, "BATCHD_DEMO_ABC123_TASKS");
        assert_eq!(c.nats.results_stream, "BATCHD_DEMO_ABC123_RESULTS");
        assert_eq!(c.nats.dlq_stream, "BATCHD_DEMO_ABC123_DLQ");
        assert_eq!(c.nats.ledger_bucket, "batchd_demo_abc123-ledger");
        assert_eq!(c.nats.consumer_prefix, "batchd_demo_abc123");
        let p = &c.providers["openai"];
        assert_eq!(p.resolved_base_url(), "http://127.0.0.1:1/v1");
        assert!(p.resolved_api_key().is_none());
        let private = demo_config("nats://x:1", None, "http://h/v1", 10).unwrap();
        assert_eq!(private.nats.subject_prefix, "batchd");
    }
}
