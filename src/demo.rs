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
use async_nats::HeaderMap;
use batchd_actors::task::Priority;
use bytes::Bytes;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::config::Config;
use crate::local_nats::LocalNats;
use crate::report::{group, Report};
use crate::sim::{SimConfig, SimServer};

/// Where the demo looks for a running NATS server before starting its own.
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Publishes sent before their PubAcks are awaited.
const PUBLISH_WINDOW: usize = 512;
/// How often a progress line is printed when stdout is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Silence after which the results stream, not the subscription, is read.
const STALL: Duration = Duration::from_secs(5);
/// Workloads at least this large include the deliberately bad inputs.
const MIN_TASKS_FOR_BAD_INPUTS: u64 = 100;

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
    #[arg(long, default_value_t = 0.02, value_parser = parse_fraction)]
    pub error_rate: f64,
    /// Simulated provider: requests per minute before it answers 429 (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    pub rpm: u32,
    /// Seed of the workload and of the simulated provider
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Give up when outcomes are still missing after this many seconds
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0.0 and 1.0"))
    }
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
        },
    )
    .await
    .context("starting the simulated provider")?;
    let broker = choose_broker(&args).await?;
    let isolation = match &broker {
        Broker::Private(_) => None,
        Broker::Shared { id, .. } => Some(id.as_str()),
    };
    let config = demo_config(broker.url(), isolation, &sim.base_url(), args.tasks)?;
    let (metrics_addr, metrics_task) = crate::telemetry::serve_metrics(args.metrics_addr).await?;
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
        "throughput is bounded by {} requests in flight per model (dispatch.route_concurrency)",
        config.dispatch.route_concurrency
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
fn demo_config(
    nats_url: &str,
    isolation: Option<&str>,
    sim_url: &str,
    tasks: u64,
) -> anyhow::Result<Config> {
    let mut config = Config::defaults()?;
    config.nats.url = nats_url.to_owned();
    if let Some(id) = isolation {
        let prefix = format!("batchd_demo_{id}");
        let stream = prefix.to_ascii_uppercase();
        config.nats.subject_prefix = prefix.clone();
        config.nats.tasks_stream = format!("{stream}_TASKS");
        config.nats.results_stream = format!("{stream}_RESULTS");
        config.nats.dlq_stream = format!("{stream}_DLQ");
        config.nats.checkpoints_bucket = format!("{prefix}-checkpoints");
        config.nats.ledger_bucket = format!("{prefix}-ledger");
        config.nats.consumer_prefix = prefix;
    }
    // Room for the workload (bodies are a few KiB at most), not the
    // production default of 8 GiB: a shared server may not have that to reserve.
    let bytes = i64::try_from(tasks.saturating_mul(16 * 1024)).unwrap_or(i64::MAX);
    config.nats.tasks_max_bytes = bytes.clamp(64 << 20, config.nats.tasks_max_bytes);
    let provider = config
        .providers
        .get_mut("openai")
        .context("the default config has no `providers.openai`")?;
    provider.base_url = sim_url.to_owned();
    // The simulator, whatever OPENAI_BASE_URL / OPENAI_API_KEY say.
    provider.base_url_env = None;
    provider.api_key_env = None;
    provider.api_key = None;
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

/// One message to publish.
#[derive(Clone)]
struct Message {
    priority: Priority,
    msg_id: String,
    content_type: &'static str,
    body: Bytes,
}

/// The demo's reproducible workload.
struct Workload {
    messages: Vec<Message>,
    /// Unique tasks per priority (what gets an outcome).
    per_priority: [u64; 3],
    msgpack: u64,
    chat: u64,
    batch_lines: u64,
    long_context: u64,
    bad: u64,
    duplicates: u64,
}

const TENANTS: [(&str, u32); 4] = [
    ("acme", 40),
    ("globex", 30),
    ("initech", 20),
    ("umbrella", 10),
];
const TYPES: [(&str, u32); 5] = [
    ("content_analysis", 25),
    ("classification", 30),
    ("summarization", 20),
    ("data_enrichment", 17),
    ("report_generation", 8),
];
const LANGUAGES: [(&str, u32); 5] = [("en", 70), ("de", 10), ("fr", 8), ("es", 8), ("ja", 4)];

impl Workload {
    /// `n` unique tasks (bad inputs included) plus a few duplicate publishes,
    /// the same for the same `seed`.
    fn generate(n: u64, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let handbook = handbook();
        let mut w = Workload {
            messages: Vec::with_capacity(usize::try_from(n).unwrap_or(0) + 8),
            per_priority: [0; 3],
            msgpack: 0,
            chat: 0,
            batch_lines: 0,
            long_context: 0,
            bad: 0,
            duplicates: 0,
        };
        let bad = if n >= MIN_TASKS_FOR_BAD_INPUTS {
            bad_inputs()
        } else {
            Vec::new()
        };
        let good = n - bad.len() as u64;
        for i in 0..good {
            let priority = pick(
                &mut rng,
                &[(Priority::P1, 10), (Priority::P2, 30), (Priority::P3, 60)],
            );
            let roll: f64 = rng.random();
            let (msg_id, body) = if roll < 0.01 {
                w.batch_lines += 1;
                batch_line(&mut rng, i)
            } else if roll < 0.03 {
                w.chat += 1;
                chat_task(&mut rng, i, priority)
            } else if roll < 0.07 {
                w.long_context += 1;
                handbook_task(&mut rng, i, priority, &handbook)
            } else {
                typed_task(&mut rng, i, priority)
            };
            let msgpack = rng.random_bool(0.15);
            let encoded = if msgpack {
                rmp_serde::to_vec_named(&body).ok()
            } else {
                None
            };
            let (content_type, bytes) = match encoded {
                Some(b) => {
                    w.msgpack += 1;
                    ("application/msgpack", b)
                }
                None => ("application/json", body.to_string().into_bytes()),
            };
            w.per_priority[priority.index()] += 1;
            w.messages.push(Message {
                priority,
                msg_id,
                content_type,
                body: Bytes::from(bytes),
            });
        }
        for b in bad {
            w.per_priority[b.priority.index()] += 1;
            w.bad += 1;
            let at = rng.random_range(0..=w.messages.len());
            w.messages.insert(at, b);
        }
        if good >= 10 {
            for _ in 0..3 {
                let original = rng.random_range(0..w.messages.len() / 2);
                let copy = w.messages[original].clone();
                let at = rng.random_range(w.messages.len() / 2..=w.messages.len());
                w.messages.insert(at, copy);
                w.duplicates += 1;
            }
        }
        w
    }

    /// Unique tasks: what gets an outcome.
    fn tasks(&self) -> u64 {
        self.per_priority.iter().sum()
    }
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total.max(1));
    for (item, weight) in items {
        if roll < *weight {
            return *item;
        }
        roll -= weight;
    }
    items[items.len() - 1].0
}

fn one<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

/// `count` sentences from `pool`, with `{p}` replaced by a product.
fn sentences(rng: &mut StdRng, pool: &[&str], count: usize) -> String {
    let product = one(rng, PRODUCTS);
    (0..count)
        .map(|_| one(rng, pool).replace("{p}", product))
        .collect::<Vec<_>>()
        .join(" ")
}

fn metadata(rng: &mut StdRng, i: u64) -> Value {
    json!({"source": one(rng, &["crm", "helpdesk", "web", "mobile", "import"]), "seq": i})
}

/// A `{"text", "options"}` task of one of the five configured types.
fn typed_task(rng: &mut StdRng, i: u64, priority: Priority) -> (String, Value) {
    let task_type = pick(rng, &TYPES);
    let language = pick(rng, &LANGUAGES);
    let (text, options) = match task_type {
        "content_analysis" => {
            let n = rng.random_range(2..=12);
            (
                sentences(rng, REVIEW_SENTENCES, n),
                json!({"language": language}),
            )
        }
        "classification" => {
            let n = rng.random_range(1..=4);
            let subject = one(rng, TICKET_SUBJECTS);
            (
                format!(
                    "Subject: {subject}\n\n{}",
                    sentences(rng, TICKET_SENTENCES, n)
                ),
                json!({"labels": "billing, bug, feature_request, account, shipping, other"}),
            )
        }
        "summarization" => {
            let n = rng.random_range(5..=30);
            (
                sentences(rng, MEETING_SENTENCES, n),
                json!({"language": language, "max_words": one(rng, &["30", "50", "80", "120"])}),
            )
        }
        "data_enrichment" => {
            let name = format!(
                "{} {}",
                one(rng, COMPANY_WORDS),
                one(rng, &["GmbH", "Inc.", "Ltd", "SA", "BV", "LLC"])
            );
            let domain: String = name
                .split_whitespace()
                .next()
                .unwrap_or("example")
                .to_ascii_lowercase();
            (
                format!(
                    "name: {name}\nwebsite: https://{domain}.example\ncity: {}\nnotes: {}",
                    one(rng, CITIES),
                    one(rng, TICKET_SENTENCES)
                ),
                json!({"fields": one(rng, &["industry, employee_range, country", "industry, founded_year", "country, vat_id_format, industry"])}),
            )
        }
        _ => (
            weekly_metrics(rng),
            json!({"style": one(rng, &["executive summary", "detailed analysis", "weekly status update"])}),
        ),
    };
    let mut task = json!({
        "task_id": format!("t{i:06}"),
        "type": task_type,
        "payload": {"text": text, "options": options},
        "priority": priority.number(),
        "tenant": pick(rng, &TENANTS),
        "metadata": metadata(rng, i),
    });
    let roll: f64 = rng.random();
    if roll < 0.03 {
        task["model"] = json!("gpt-4o-mini");
    } else if roll < 0.08 {
        task["tier"] = json!(one(rng, &["simple", "standard", "complex"]));
    }
    (format!("t{i:06}"), task)
}

/// A task whose payload is an OpenAI chat body.
fn chat_task(rng: &mut StdRng, i: u64, priority: Priority) -> (String, Value) {
    let n = rng.random_range(1..=3);
    let review = sentences(rng, REVIEW_SENTENCES, n);
    let ask = one(
        rng,
        &[
            "Translate into French:",
            "Rewrite politely, as a reply from the vendor:",
            "Extract the product and the main complaint as JSON:",
            "Give this review a star rating from 1 to 5 and one reason:",
        ],
    );
    let id = format!("t{i:06}");
    let task = json!({
        "task_id": id,
        "payload": {
            "messages": [
                {"role": "system", "content": "You are a concise assistant for an e-commerce team."},
                {"role": "user", "content": format!("{ask}\n\n{review}")},
            ],
            "max_tokens": 150,
            "temperature": 0.2,
        },
        "priority": priority.number(),
        "tenant": pick(rng, &TENANTS),
        "tier": "simple",
        "metadata": metadata(rng, i),
    });
    (id, task)
}

/// A line of an OpenAI Batch API input file, published as is.
fn batch_line(rng: &mut StdRng, i: u64) -> (String, Value) {
    let id = format!("req-{i:06}");
    let product = one(rng, PRODUCTS);
    let line = json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": format!("Write a one-sentence product description of {product}.")}],
            "max_tokens": 60,
        },
    });
    (id, line)
}

/// A chat task whose long system message (a policy handbook) is shared by
/// every such task, so the provider can serve it from its prompt cache.
fn handbook_task(rng: &mut StdRng, i: u64, priority: Priority, handbook: &str) -> (String, Value) {
    let id = format!("t{i:06}");
    let question = format!(
        "{} (order #{})",
        one(rng, HANDBOOK_QUESTIONS),
        rng.random_range(100_000..999_999)
    );
    let task = json!({
        "task_id": id,
        "payload": {
            "messages": [
                {"role": "system", "content": handbook},
                {"role": "user", "content": question},
            ],
            "max_tokens": 200,
        },
        "priority": priority.number(),
        "tenant": "acme",
        "metadata": metadata(rng, i),
    });
    (id, task)
}

/// The bad inputs: each one gets a failed outcome and a dead letter.
fn bad_inputs() -> Vec<Message> {
    let json_msg = |id: &str, p: Priority, body: String| Message {
        priority: p,
        msg_id: id.to_owned(),
        content_type: "application/json",
        body: Bytes::from(body.into_bytes()),
    };
    let text = |t: &str| json!({"text": t, "options": {"language": "en"}});
    vec![
        json_msg(
            "bad-json",
            Priority::P3,
            r#"{"task_id": "bad-json", "type": "summarization", "payload": {"text": "cut off"#.into(),
        ),
        Message {
            priority: Priority::P2,
            msg_id: "bad-msgpack".into(),
            content_type: "application/msgpack",
            body: Bytes::from_static(&[0xc1, 0x00, 0xff]),
        },
        json_msg(
            "bad-type",
            Priority::P2,
            json!({"task_id": "bad-type", "type": "poetry", "payload": text("roses"), "priority": 2})
                .to_string(),
        ),
        json_msg(
            "bad-priority",
            Priority::P3,
            json!({"task_id": "bad-priority", "type": "classification", "payload": text("jump the queue"), "priority": 1})
                .to_string(),
        ),
        json_msg(
            "bad-model",
            Priority::P3,
            json!({"task_id": "bad-model", "type": "content_analysis", "payload": text("hello"), "model": "gpt-9-ultra"})
                .to_string(),
        ),
        json_msg(
            "bad-payload",
            Priority::P3,
            json!({"task_id": "bad-payload", "type": "summarization"}).to_string(),
        ),
        json_msg(
            "bad-task-id",
            Priority::P2,
            json!({"task_id": "not a valid id!", "type": "classification", "payload": text("x")})
                .to_string(),
        ),
    ]
}

fn weekly_metrics(rng: &mut StdRng) -> String {
    let week = rng.random_range(1..=52);
    let mut text = format!("Week {week} metrics, {}:\n", one(rng, COMPANY_WORDS));
    for metric in [
        "signups",
        "active accounts",
        "churned accounts",
        "support tickets",
        "median first response (min)",
        "NPS",
    ] {
        let value = rng.random_range(12..9_000);
        let change = rng.random_range(-25..=40);
        text.push_str(&format!(
            "- {metric}: {value} ({change:+}% week over week)\n"
        ));
    }
    let n = rng.random_range(2..=8);
    text.push_str("\nObservations: ");
    text.push_str(&sentences(rng, MEETING_SENTENCES, n));
    text
}

/// A support policy of about 6,000 characters, the same every time.
fn handbook() -> String {
    let mut text = String::from(
        "You are the support assistant of ACME Corp. Answer the customer's question using only the policy below. \
         Quote the section number you rely on. If the policy does not cover the question, say so and offer a human agent.\n\n\
         ACME CORP CUSTOMER SUPPORT POLICY (revision 14)\n\n",
    );
    let areas = [
        "hardware orders",
        "software subscriptions",
        "professional services",
        "gift cards",
        "marketplace items",
        "enterprise contracts",
    ];
    let mut section = 1;
    for (k, area) in areas.iter().enumerate() {
        let days = 14 + 7 * k;
        let hours = 24 + 12 * k;
        for clause in [
            format!("Refunds for {area}: a customer may ask for a full refund within {days} days of delivery, provided the item or service is returned or cancelled in the condition it was received. After {days} days, a refund needs the approval of a team lead and is limited to store credit."),
            format!("Response times for {area}: premium customers get a first answer within {} hours and standard customers within {hours} hours, counted in business hours of the customer's region.", hours / 4),
            format!("Escalation for {area}: when a case is reopened twice, or when the customer mentions legal action, hand the case to the escalation desk and tell the customer who will contact them and by when."),
            format!("Data requests for {area}: export and deletion requests are confirmed within {} days; never send account data to an e-mail address that is not on file.", 3 + k),
        ] {
            text.push_str(&format!("Section {section}. {clause}\n"));
            section += 1;
        }
    }
    text
}

const PRODUCTS: &[&str] = &[
    "the X200 headphones",
    "the Pro plan",
    "the mobile app",
    "the standing desk",
    "the espresso machine",
    "the billing dashboard",
    "the smart thermostat",
    "the trail running shoes",
];

const REVIEW_SENTENCES: &[&str] = &[
    "I have been using {p} for three weeks now.",
    "Setup of {p} took less than ten minutes.",
    "Battery life is noticeably worse than advertised.",
    "Customer support answered within an hour and fixed the problem.",
    "The price went up twice this year, which is frustrating.",
    "Honestly the best purchase I made this year.",
    "It stopped syncing after the last update.",
    "Shipping was fast but the box arrived dented.",
    "The documentation is thin; I had to search forums for answers.",
    "I would recommend {p} to anyone working from home.",
    "Compared to the previous version, {p} feels slower.",
    "The new design is cleaner and easier to read.",
    "Two of my colleagues bought {p} after trying mine.",
    "The refund process was painless.",
    "Build quality is excellent for the price.",
    "I had to contact support three times about the same issue.",
];

const TICKET_SUBJECTS: &[&str] = &[
    "Charged twice this month",
    "Cannot log in after password reset",
    "Feature request: export to CSV",
    "Package marked delivered but not received",
    "How do I change the account owner?",
    "App crashes when uploading photos",
    "Invoice shows the wrong VAT number",
    "Please add dark mode",
];

const TICKET_SENTENCES: &[&str] = &[
    "This happened again this morning.",
    "I attached a screenshot of the error message.",
    "Our team of twelve depends on this every day.",
    "The tracking number has not changed in five days.",
    "I already tried clearing the cache and reinstalling.",
    "Can you tell me when this will be fixed?",
    "We would pay extra for this feature.",
    "The card ending in 4242 was charged twice.",
    "My manager left the company and I need admin rights.",
    "It works on the web but not on Android.",
];

const MEETING_SENTENCES: &[&str] = &[
    "The team agreed to move the launch by one week to finish load testing.",
    "Revenue in the northern region grew eight percent quarter over quarter.",
    "Two enterprise customers asked for single sign-on before renewal.",
    "Support volume dropped after the new onboarding flow shipped.",
    "Marketing will run a smaller campaign focused on existing customers.",
    "The data team found that most churn happens in the first thirty days.",
    "Hiring for the platform team is behind plan; two roles are still open.",
    "Infrastructure costs rose because of the new analytics pipeline.",
    "Legal reviewed the new terms of service and requested minor changes.",
    "The mobile release is blocked on an app store review.",
    "Customer interviews point to pricing as the main objection.",
    "The pilot with the logistics partner will be extended to March.",
    "Security completed the annual penetration test with no critical findings.",
    "Action item: finance to share the updated forecast by Friday.",
];

const COMPANY_WORDS: &[&str] = &[
    "Northwind",
    "Bluefin",
    "Copperleaf",
    "Halvorsen",
    "Kestrel",
    "Lumen",
    "Oakridge",
    "Solvay",
    "Tidewater",
    "Vantage",
];

const CITIES: &[&str] = &[
    "Berlin", "Lyon", "Austin", "Osaka", "Porto", "Utrecht", "Leeds", "Denver",
];

const HANDBOOK_QUESTIONS: &[&str] = &[
    "Can I still return my headphones? They arrived 20 days ago.",
    "I want all my data deleted. How long does it take?",
    "Nobody has answered my ticket for two days and I am a premium customer.",
    "Can I get a refund on a gift card?",
    "This is the third time I reopen this case. What now?",
    "Our enterprise contract renewal was charged but we cancelled. Refund?",
    "Can you send my account export to my new private e-mail address?",
    "How fast do you answer standard customers about marketplace items?",
];

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

/// Publishes every message, `PUBLISH_WINDOW` in flight at a time.
async fn publish_all(
    js: jetstream::Context,
    subjects: [String; 3],
    messages: Vec<Message>,
    bar: ProgressBar,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    for chunk in messages.chunks(PUBLISH_WINDOW) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.msg_id.as_str());
            headers.insert("Content-Type", m.content_type);
            let subject = subjects[m.priority.index()].clone();
            let ack = js
                .publish_with_headers(subject.clone(), headers, m.body.clone())
                .await
                .with_context(|| format!("publishing {} to {subject}", m.msg_id))?;
            acks.push(ack);
        }
        for ack in acks {
            let ack = ack.await.context("waiting for a JetStream PubAck")?;
            if ack.duplicate {
                tally.duplicates += 1;
            } else {
                tally.accepted += 1;
            }
            bar.inc(1);
        }
    }
    Ok(tally)
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
    let prefix = &config.nats.subject_prefix;
    let mut results = client
        .subscribe(format!("{prefix}.results.>"))
        .await
        .context("subscribing to outcomes")?;
    let mut dead_letters = client
        .subscribe(format!("{prefix}.dlq.>"))
        .await
        .context("subscribing to dead letters")?;
    client
        .flush()
        .await
        .context("registering the subscriptions")?;
    let js = jetstream::new(client.clone());

    let subjects = Priority::ALL.map(|p| config.task_subject(p));
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

    let mut report = Report::with_prices(config.prices.clone());
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
                let Some(m) = m else { bail!("the outcome subscription closed") };
                match decode(&m) {
                    Ok(v) => {
                        if report.record(&v) {
                            last_outcome = Instant::now();
                            last_progress = last_outcome;
                            progress.completed(&v);
                        }
                    }
                    Err(e) => {
                        undecodable += 1;
                        tracing::warn!(subject = %m.subject, error = %e, "undecodable outcome");
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

/// Decodes an outcome by its Content-Type.
fn decode(m: &async_nats::Message) -> anyhow::Result<Value> {
    let msgpack = m
        .headers
        .as_ref()
        .and_then(|h| h.get("Content-Type"))
        .is_some_and(|v| v.as_str() == "application/msgpack");
    if msgpack {
        rmp_serde::from_slice(&m.payload).context("decoding a MessagePack outcome")
    } else {
        serde_json::from_slice(&m.payload).context("decoding a JSON outcome")
    }
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
    let result = read_stream_into(&jetstream::new(client.clone()), stream, report).await;
    let _ = client.drain().await;
    result
}

async fn read_stream_into(
    js: &jetstream::Context,
    stream: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("opening stream {stream}"))?;
    let total = s
        .info()
        .await
        .with_context(|| format!("reading the state of {stream}"))?
        .state
        .messages;
    if total <= report.outcomes() {
        return Ok(());
    }
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .with_context(|| format!("reading {stream}"))?;
    let mut messages = consumer
        .messages()
        .await
        .with_context(|| format!("reading {stream}"))?;
    for _ in 0..total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .with_context(|| format!("reading {stream} timed out"))?
            .with_context(|| format!("{stream} ended early"))?
            .with_context(|| format!("reading {stream}"))?;
        if let Ok(v) = decode(&m) {
            report.record(&v);
        }
    }
    Ok(())
}

/// Deletes the demo's streams and buckets from a shared server.
async fn remove_demo_objects(config: &Config) -> anyhow::Result<()> {
    let client = async_nats::connect(config.nats.url.as_str())
        .await
        .with_context(|| format!("connecting to {} to clean up", config.nats.url))?;
    let js = jetstream::new(client.clone());
    let n = &config.nats;
    let mut failed = Vec::new();
    for stream in [&n.tasks_stream, &n.results_stream, &n.dlq_stream] {
        if let Err(e) = js.delete_stream(stream).await {
            failed.push(format!("stream {stream}: {e}"));
        }
    }
    for bucket in [&n.checkpoints_bucket, &n.ledger_bucket] {
        if let Err(e) = js.delete_key_value(bucket).await {
            failed.push(format!("bucket {bucket}: {e}"));
        }
    }
    let _ = client.drain().await;
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("could not delete {}", failed.join("; "))
    }
}

/// Live progress: bars on a terminal, a line every few seconds otherwise.
struct Progress {
    published: ProgressBar,
    completed: [ProgressBar; 3],
    started: Instant,
    /// Print lines instead of bars.
    plain: bool,
    last_line: Duration,
}

impl Progress {
    fn new(messages: u64, per_priority: [u64; 3], terminal: bool, started: Instant) -> Progress {
        let target = if terminal {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        // Rate and ETA while running; the bar's message ("done in ...") after.
        let live = |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            if s.is_finished() {
                return;
            }
            let _ = write!(w, "{:>7}/s", group(s.per_sec().round() as u64));
            let len = s.len().unwrap_or(0);
            // Too early for an estimate before a twentieth is done.
            if s.pos() > 0 && s.pos() * 20 >= len && s.pos() < len {
                let _ = write!(w, "  eta {}s", s.eta().as_secs());
            }
        };
        let style = ProgressStyle::with_template(
            "{prefix:<12} {bar:30.cyan/blue} {human_pos:>7}/{human_len:<7} {live}{msg}",
        )
        .map(|s| s.with_key("live", live).progress_chars("##-"))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = |len: u64, name: &str| {
            let b = multi.add(ProgressBar::new(len));
            b.set_style(style.clone());
            b.set_prefix(name.to_owned());
            if len == 0 {
                b.finish_with_message("none");
            } else {
                b.enable_steady_tick(Duration::from_millis(200));
            }
            b
        };
        let published = bar(messages, "published");
        let completed = [
            bar(per_priority[0], "p1 premium"),
            bar(per_priority[1], "p2 standard"),
            bar(per_priority[2], "p3 bulk"),
        ];
        Progress {
            published,
            completed,
            started,
            plain: !terminal,
            last_line: Duration::ZERO,
        }
    }

    fn done_message(&self) -> String {
        format!("  done in {:.1} s", self.started.elapsed().as_secs_f64())
    }

    fn published_all(&self) {
        self.published.finish_with_message(self.done_message());
    }

    fn completed(&self, outcome: &Value) {
        let p = outcome["priority"]
            .as_i64()
            .and_then(Priority::from_number)
            .unwrap_or(Priority::P3);
        let bar = &self.completed[p.index()];
        bar.inc(1);
        if bar.length().is_some_and(|len| bar.position() >= len) {
            bar.finish_with_message(self.done_message());
        }
    }

    /// Sets the outcome bars from the report (after outcomes were recorded elsewhere).
    fn sync(&self, report: &Report) {
        for (p, n) in report.outcomes_by_priority() {
            if let Some(bar) =
                Priority::from_number(i64::from(p)).map(|p| &self.completed[p.index()])
            {
                bar.set_position(n);
                if bar.length().is_some_and(|len| n >= len) && !bar.is_finished() {
                    bar.finish_with_message(self.done_message());
                }
            }
        }
    }

    /// Prints a progress line every few seconds when there are no bars.
    fn tick(&mut self, report: &Report) {
        let elapsed = self.started.elapsed();
        if !self.plain || elapsed < self.last_line + PLAIN_PROGRESS_EVERY {
            return;
        }
        self.last_line = elapsed;
        println!("{}", self.line(elapsed, report));
    }

    fn line(&self, elapsed: Duration, report: &Report) -> String {
        let by =
            |b: &ProgressBar| format!("{}/{}", group(b.position()), group(b.length().unwrap_or(0)));
        let total: u64 = self.completed.iter().filter_map(ProgressBar::length).sum();
        format!(
            "  [{:>5.1}s] published {}, outcomes {}/{} (p1 {}, p2 {}, p3 {})",
            elapsed.as_secs_f64(),
            by(&self.published),
            group(report.outcomes()),
            group(total),
            by(&self.completed[0]),
            by(&self.completed[1]),
            by(&self.completed[2]),
        )
    }

    /// Leaves the bars on screen: finished, or abandoned where they stopped.
    fn finish(&self) {
        for b in std::iter::once(&self.published).chain(self.completed.iter()) {
            if !b.is_finished() {
                b.abandon();
            }
        }
        if !self.plain {
            // The cursor is left at the end of the last bar.
            println!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_reproducible_and_shaped_as_announced() {
        let a = Workload::generate(5000, 42);
        let b = Workload::generate(5000, 42);
        assert_eq!(a.tasks(), 5000);
        assert_eq!(a.messages.len(), 5003, "5000 tasks and 3 duplicates");
        assert_eq!(a.bad, 7);
        assert_eq!(a.per_priority, b.per_priority);
        assert!(a
            .messages
            .iter()
            .zip(&b.messages)
            .all(|(x, y)| x.msg_id == y.msg_id && x.body == y.body));
        let [p1, p2, p3] = a.per_priority;
        assert!((400..600).contains(&p1), "{p1}");
        assert!((1350..1650).contains(&p2), "{p2}");
        assert!((2800..3200).contains(&p3), "{p3}");
        assert!(a.msgpack > 500 && a.chat > 50 && a.batch_lines > 20 && a.long_context > 100);
        let ids: HashSet<&str> = a.messages.iter().map(|m| m.msg_id.as_str()).collect();
        assert_eq!(ids.len(), 5000, "duplicates reuse an id, nothing else does");
    }

    #[test]
    fn small_workloads_skip_bad_inputs_and_duplicates() {
        let w = Workload::generate(5, 1);
        assert_eq!(w.tasks(), 5);
        assert_eq!(w.messages.len(), 5);
        assert_eq!((w.bad, w.duplicates), (0, 0));
    }

    #[test]
    fn the_handbook_is_long_enough_to_be_cached() {
        // The simulator caches prompts of 1024 tokens (4096 characters) and more.
        assert!(handbook().len() > 5000, "{}", handbook().len());
    }

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
