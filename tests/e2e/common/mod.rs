//! Shared test helpers: a private nats-server per test, the simulated
//! provider, a test config, publishing tasks and reading outcomes back.
#![allow(dead_code)]

pub mod binary;
pub mod cluster;
pub mod jwt;
pub mod nats;
pub mod openapi;
pub mod process;
pub mod prometheus;
pub mod promql;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use batchd::client::read::read_stream;
use batchd::client::{decode_message, Outgoing, Publisher};
use batchd::config::Config;
use batchd::sim::{SimConfig, SimServer};
use serde_json::Value;

/// `[dispatch.circuit]` with a threshold no run reaches: transient failures
/// stay the tasks' own and spend their attempts.
pub const CIRCUIT_OFF: &str = "[dispatch.circuit]\nfailure_threshold = 100000\n";

/// The test config as TOML: `nats_url`, an OpenAI-compatible `base_url`,
/// short timers so failure paths finish quickly, and `extra` merged over it.
pub fn config_toml(nats_url: &str, base_url: &str, extra: &str) -> String {
    config_toml_as("openai", nats_url, base_url, extra)
}

/// [`config_toml`] with the provider named `provider`, serving every model
/// (`openai` then serves none). A name of its own gives a test route metrics
/// no other test in the process writes to.
pub fn config_toml_as(provider: &str, nats_url: &str, base_url: &str, extra: &str) -> String {
    let (openai_off, models) = if provider == "openai" {
        ("", String::new())
    } else {
        let all = Config::defaults().expect("default config").providers["openai"]
            .models
            .clone();
        (
            "[providers.openai]\nmodels = []\nbatch = false\n",
            format!("models = {all:?}"),
        )
    };
    // Batch jobs only where a test asks for them, whatever provider it names.
    let anthropic_off = if provider == "anthropic" {
        ""
    } else {
        "[providers.anthropic]\nbatch = false\n"
    };
    let base = format!(
        r#"
[nats]
url = "{nats_url}"
tasks_max_bytes = 268_435_456
[intake]
ack_wait_secs = 4
max_payload_bytes = 4096
backlog_interval_ms = 200
max_ack_pending = 500
[batching.p1]
max_size = 8
max_wait_ms = 10
[batching.p2]
max_size = 32
max_wait_ms = 20
[batching.p3]
max_size = 64
max_wait_ms = 40
[retry]
max_attempts = 4
base_delay_ms = 50
max_delay_ms = 400
[dispatch]
publish_retry_secs = 30
max_retry_after_secs = 2
{openai_off}[providers.{provider}]
{models}
base_url = "{base_url}"
base_url_env = "BATCHD_TEST_UNSET"
api_key_env = "BATCHD_TEST_UNSET"
api_key = "sk-test"
batch = false
{anthropic_off}"#
    );
    let mut table: toml::Table = base.parse().expect("base test config");
    batchd::config::merge(&mut table, extra.parse().expect("extra test config"));
    toml::to_string(&table).expect("serialize test config")
}

/// The test config (see [`config_toml`]).
pub fn config(nats_url: &str, base_url: &str) -> Config {
    config_with(nats_url, base_url, "")
}

/// The test config with extra TOML appended (later keys win).
pub fn config_with(nats_url: &str, base_url: &str, extra: &str) -> Config {
    Config::from_toml_str(&config_toml(nats_url, base_url, extra), "test")
        .expect("test config is valid")
}

/// Writes the test config to `dir/batchd.toml` (for the `batchd` binary).
pub fn config_file(
    dir: &std::path::Path,
    nats_url: &str,
    base_url: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("batchd.toml");
    std::fs::write(&path, config_toml(nats_url, base_url, extra)).expect("write config");
    path
}

/// A seed-shaped task body.
pub fn task(id: &str, priority: u8) -> Value {
    let types = [
        "content_analysis",
        "classification",
        "summarization",
        "data_enrichment",
        "report_generation",
    ];
    let n: usize = id.bytes().map(usize::from).sum();
    serde_json::json!({
        "task_id": id,
        "type": types[n % types.len()],
        "payload": {"text": format!("document {id}"), "options": {"language": "en", "labels": "a,b", "fields": "x", "style": "brief", "max_words": 50}},
        "priority": priority,
        "tenant": "acme",
        "metadata": {"n": n},
    })
}

/// The simulator's bill priced with the config's price table, in pico-dollars.
pub fn bill(sim: &SimServer, config: &Config) -> (batchd_actors::pricing::Picousd, u64) {
    let mut total = 0;
    let mut calls = 0;
    for (model, b) in sim.bill() {
        total += config
            .prices
            .cost_picousd(&model, &b.usage(), batchd_actors::task::RouteKind::Realtime)
            .expect("every served model has a price");
        calls += b.requests;
    }
    (total, calls)
}

/// How many requests the simulator recorded for each task (seed-shaped
/// tasks: the prompt ends with `document <task_id>`).
pub fn requests_per_task(sim: &SimServer) -> HashMap<String, usize> {
    let mut sent: HashMap<String, usize> = HashMap::new();
    for body in sim.recorded_requests() {
        let text = body["messages"][1]["content"].as_str().unwrap_or_default();
        let id = text.rsplit("document ").next().unwrap_or_default();
        *sent.entry(id.to_owned()).or_default() += 1;
    }
    sent
}

/// Asserts that each of the `n` tasks reached the provider and that each
/// whose outcome was among `done_before` (outcomes by subject, read before
/// a kill) reached it exactly once; returns the requests per task.
pub fn assert_finished_sent_once(
    sim: &SimServer,
    done_before: &HashMap<String, Vec<Value>>,
    n: usize,
) -> HashMap<String, usize> {
    let sent = requests_per_task(sim);
    assert_eq!(sent.len(), n, "every task reached the provider");
    for subject in done_before.keys() {
        let id = subject.trim_start_matches("batchd.results.");
        assert_eq!(
            sent[id], 1,
            "{id} finished before the kill but was sent {} times",
            sent[id]
        );
    }
    sent
}

/// Publishes one body and waits for its PubAck.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    body: Vec<u8>,
    content_type: Option<&str>,
    msg_id: Option<&str>,
) {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert("Content-Type", ct);
    }
    if let Some(id) = msg_id {
        headers.insert("Nats-Msg-Id", id);
    }
    js.publish_with_headers(subject.to_owned(), headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("puback");
}

/// Publishes `body` as JSON with no Content-Type and `Nats-Msg-Id` `msg_id`,
/// and waits for its PubAck.
pub async fn publish_json(js: &jetstream::Context, subject: &str, body: &Value, msg_id: &str) {
    let bytes = serde_json::to_vec(body).expect("json");
    publish(js, subject, bytes, None, Some(msg_id)).await;
}

/// Publishes many JSON tasks with a window of PubAcks, `msg_id` = task_id.
pub async fn publish_many(js: &jetstream::Context, tasks: &[(String, Value)]) {
    let outgoing = tasks.iter().map(|(subject, body)| Outgoing {
        subject: subject.clone(),
        msg_id: body["task_id"].as_str().unwrap_or_default().to_owned(),
        content_type: "application/json",
        body: serde_json::to_vec(body).expect("json").into(),
    });
    Publisher::new(js.clone())
        .publish_all(outgoing, |_| {})
        .await
        .expect("publish with PubAcks");
}

/// Decodes an outcome or dead letter by its Content-Type.
pub fn decode(msg: &async_nats::Message) -> Value {
    decode_message(msg).expect("an outcome or dead letter in JSON or MessagePack")
}

/// Waits until `stream` holds at least `n` messages, then returns them all
/// by subject. Panics with what it has after `timeout`.
pub async fn wait_for_messages(
    js: &jetstream::Context,
    stream: &str,
    n: u64,
    timeout: Duration,
) -> HashMap<String, Vec<Value>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut s = js.get_stream(stream).await.expect("stream");
    loop {
        let count = s.info().await.expect("info").state.messages;
        if count >= n {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{stream} has {count} of {n} messages after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    read_all(js, stream).await
}

/// Every message of a stream, by subject.
pub async fn read_all(js: &jetstream::Context, stream: &str) -> HashMap<String, Vec<Value>> {
    let mut out: HashMap<String, Vec<Value>> = HashMap::new();
    read_stream(js, stream, |subject, v: Result<Value, _>| {
        out.entry(subject.to_owned())
            .or_default()
            .push(v.expect("an outcome or dead letter in JSON or MessagePack"));
    })
    .await
    .expect("read the stream");
    out
}

/// Number of messages in a stream.
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    batchd::client::read::stream_len(js, stream)
        .await
        .expect("stream info")
}

/// Waits until `stream` holds at least `n` messages (at most a minute).
pub async fn wait_for_count(js: &async_nats::jetstream::Context, stream: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stream_len(js, stream).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stream} never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `stream` is empty (a work queue whose messages were all acked).
pub async fn wait_until_empty(js: &jetstream::Context, stream: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = stream_len(js, stream).await;
        if n == 0 {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{stream} still holds {n} messages after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private nats-server, the simulated provider and a running engine.
/// Bind every field when destructuring (`nats: _nats`): a field left to `..`
/// is dropped at once, and with it the server.
pub struct Stack {
    /// The server (stop and restart it at will).
    pub nats: nats::NatsServer,
    /// The provider.
    pub sim: SimServer,
    /// The engine and its client.
    pub running: batchd::app::Running,
    /// JetStream over the engine's client.
    pub js: jetstream::Context,
}

/// The simulator's defaults with `latency` before every answer.
pub fn sim_latency(latency: Duration) -> SimConfig {
    SimConfig {
        latency,
        ..SimConfig::default()
    }
}

/// A simulator answering in 20–40 ms that records every request body.
pub async fn recording_sim() -> SimServer {
    start_sim(SimConfig {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(20),
        record_requests: true,
        ..SimConfig::default()
    })
    .await
}

/// Requests per task id in recorded request bodies (the seed-shaped task's
/// text ends with `document <id>`).
pub fn sent_per_task(bodies: &[Value]) -> HashMap<String, usize> {
    let mut sent: HashMap<String, usize> = HashMap::new();
    for body in bodies {
        let id = body["messages"][1]["content"]
            .as_str()
            .unwrap_or_default()
            .rsplit("document ")
            .next()
            .unwrap_or_default()
            .to_owned();
        *sent.entry(id).or_default() += 1;
    }
    sent
}

/// Starts the simulated provider configured by `config` on a free port.
/// Polls a provider batch until it ends (20 s at most): its last status
/// and the statuses seen, in order.
pub async fn until_batch_ends(
    api: &dyn batchd_actors::ports::BatchApi,
    id: &str,
) -> (batchd_actors::ports::BatchJobStatus, Vec<String>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let b = api.retrieve(id).await.expect("retrieve");
        if seen.last() != Some(&b.status) {
            seen.push(b.status.clone());
        }
        if b.is_terminal() {
            return (b, seen);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "batch never ended: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn start_sim(config: SimConfig) -> SimServer {
    SimServer::start("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("start the simulator")
}

/// Starts a [`Stack`] with the simulator configured by `sim` and the test
/// config with `extra` TOML merged over it.
pub async fn stack(sim: SimConfig, extra: &str) -> Stack {
    stack_as("openai", sim, extra).await
}

/// [`stack`] with the provider named `provider` (see [`config_toml_as`]).
pub async fn stack_as(provider: &str, sim: SimConfig, extra: &str) -> Stack {
    stack_for(provider, sim, |_| extra.to_owned()).await
}

/// [`stack_as`] with the extra TOML made from the started simulator (for
/// its addresses).
pub async fn stack_for(
    provider: &str,
    sim: SimConfig,
    extra: impl FnOnce(&SimServer) -> String,
) -> Stack {
    let nats = nats::NatsServer::start().await;
    let sim = start_sim(sim).await;
    let extra = extra(&sim);
    let toml = config_toml_as(provider, &nats.url(), &sim.base_url(), &extra);
    let config = Config::from_toml_str(&toml, "test").expect("test config is valid");
    let providers = batchd::app::http_providers(&config).expect("providers");
    let running = batchd::app::start(&config, providers)
        .await
        .expect("start batchd");
    let js = jetstream::new(running.client.clone());
    Stack {
        nats,
        sim,
        running,
        js,
    }
}

/// `n` seed-shaped tasks `<prefix><i>` spread over the three priorities.
pub fn tasks(n: usize, prefix: &str) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            let p = [1u8, 2, 3][i % 3];
            (
                format!("batchd.tasks.p{p}"),
                task(&format!("{prefix}{i}"), p),
            )
        })
        .collect()
}

/// Asserts one outcome subject per task and one outcome per subject.
pub fn assert_exactly_one_each(outcomes: &HashMap<String, Vec<Value>>, n: usize) {
    assert_eq!(outcomes.len(), n, "one outcome subject per task");
    for (subject, list) in outcomes {
        assert_eq!(list.len(), 1, "{subject} has {} outcomes", list.len());
    }
}

/// Waits up to `timeout` for `n` outcomes in `BATCHD_RESULTS`, asserts
/// exactly one per task, and returns them by subject.
pub async fn wait_for_one_outcome_each(
    js: &jetstream::Context,
    n: usize,
    timeout: Duration,
) -> HashMap<String, Vec<Value>> {
    let outcomes = wait_for_messages(js, "BATCHD_RESULTS", n as u64, timeout).await;
    assert_exactly_one_each(&outcomes, n);
    outcomes
}

/// Publishes `n` tasks `<prefix><i>` (see [`tasks`]) and waits for exactly
/// one outcome each (see [`wait_for_one_outcome_each`]).
pub async fn run_tasks(
    js: &jetstream::Context,
    n: usize,
    prefix: &str,
    timeout: Duration,
) -> HashMap<String, Vec<Value>> {
    publish_many(js, &tasks(n, prefix)).await;
    wait_for_one_outcome_each(js, n, timeout).await
}

/// For tests that run the `batchd` binary: writes the test config to a
/// temporary directory and creates the topology so tasks can be published
/// before batchd starts. Keep the directory alive while the binary runs.
pub async fn binary_setup(
    nats: &nats::NatsServer,
    sim: &SimServer,
) -> (tempfile::TempDir, std::path::PathBuf, jetstream::Context) {
    binary_setup_with(nats, sim, "").await
}

/// [`binary_setup`] with `extra` TOML merged over the test config.
pub async fn binary_setup_with(
    nats: &nats::NatsServer,
    sim: &SimServer,
    extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf, jetstream::Context) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(dir.path(), &nats.url(), &sim.base_url(), extra);
    let config = Config::load(&path).expect("load the test config");
    let client = nats.client().await;
    batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("create the topology");
    (dir, path, jetstream::new(client))
}
