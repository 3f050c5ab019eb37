//! In-memory fakes for engine tests, shared by every test binary under
//! `actors/tests/`: a miniature JetStream (nak = redeliver with
//! delivered+1), a recording sink, a scripted provider, test settings and a
//! [`Rig`] that starts the engine over them.
#![allow(dead_code)] // each test binary uses its own part of the fakes

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::backoff::RetryPolicy;
use batchd_actors::batching::BatchPolicy;
use batchd_actors::clock::Clock;
use batchd_actors::context::Ports;
use batchd_actors::lease::{AckError, Acker};
use batchd_actors::memory_ledger::MemoryLedger;
use batchd_actors::offpeak::OffPeak;
pub use batchd_actors::ownership::MemoryOwnership;
use batchd_actors::ports::{
    Backlog, Completion, Delivery, Encoded, MemoryAttempts, MemoryBoard, MemoryCheckpoints,
    OutcomeSink, Provider, ProviderError, Requeue, SinkError, SourceError, TaskSource,
};
use batchd_actors::pricing::{ModelPrice, PriceTable};
use batchd_actors::route::{RateLimitInfo, RouteSettings};
use batchd_actors::routing::{Catalog, TaskType, TierModels};
use batchd_actors::settings::{EngineSettings, RestartPolicy};
use batchd_actors::task::{Encoding, Priority, Tier, Usage};
use batchd_actors::Engine;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A delivery as a source hands it over.
type Arrival = Delivery<Box<dyn Acker>>;

// ---------- a miniature JetStream ----------

#[derive(Default)]
struct Log {
    acks: Mutex<Vec<String>>,
    naks: Mutex<Vec<String>>,
    requeues: Mutex<Vec<String>>,
}

struct Queue {
    tx: mpsc::UnboundedSender<Arrival>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Arrival>>>,
}

struct FakeAcker {
    id: String,
    priority: Priority,
    body: Bytes,
    delivered: u64,
    seq: u64,
    tx: mpsc::UnboundedSender<Arrival>,
    log: Arc<Log>,
}

#[async_trait]
impl Acker for FakeAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.log.acks.lock().unwrap().push(self.id.clone());
        Ok(())
    }
    async fn nak(&self, delay: Option<Duration>) -> Result<(), AckError> {
        self.log.naks.lock().unwrap().push(self.id.clone());
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let d = delivery(
            &self.id,
            self.priority,
            self.body.clone(),
            self.delivered + 1,
            self.seq,
            &self.tx,
            &self.log,
        );
        let _ = self.tx.send(d);
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), AckError> {
        Ok(())
    }
}

fn delivery(
    id: &str,
    priority: Priority,
    body: Bytes,
    delivered: u64,
    seq: u64,
    tx: &mpsc::UnboundedSender<Arrival>,
    log: &Arc<Log>,
) -> Arrival {
    let acker = FakeAcker {
        id: id.to_owned(),
        priority,
        body: body.clone(),
        delivered,
        seq,
        tx: tx.clone(),
        log: log.clone(),
    };
    Delivery {
        priority,
        subject: format!("batchd.tasks.{}", priority.token()),
        content_type: None,
        body,
        delivered,
        stream_sequence: seq,
        published_at: chrono::Utc::now(),
        generation: 0,
        requeued: false,
        route: None,
        pending: None,
        hold: Box::new(acker),
    }
}

pub struct FakeSource {
    queues: [Queue; 3],
    log: Arc<Log>,
    seq: AtomicU64,
    depths: [AtomicU64; 3],
}

impl FakeSource {
    fn new() -> Arc<FakeSource> {
        let q = || {
            let (tx, rx) = mpsc::unbounded_channel();
            Queue {
                tx,
                rx: Arc::new(tokio::sync::Mutex::new(rx)),
            }
        };
        Arc::new(FakeSource {
            queues: [q(), q(), q()],
            log: Arc::default(),
            seq: AtomicU64::new(1),
            depths: Default::default(),
        })
    }

    /// Sets the depth `backlog` reports for one priority.
    pub fn set_depth(&self, priority: Priority, depth: u64) {
        self.depths[priority.index()].store(depth, Ordering::Relaxed);
    }

    pub fn publish(&self, priority: Priority, body: Value) {
        self.publish_with_pending(priority, body, None);
    }

    /// Publishes as JetStream would report it with `pending` messages behind it.
    pub fn publish_with_pending(&self, priority: Priority, body: Value, pending: Option<u64>) {
        let id = body["task_id"].as_str().unwrap_or("?").to_owned();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let q = &self.queues[priority.index()];
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
        let mut d = delivery(&id, priority, bytes, 1, seq, &q.tx, &self.log);
        d.pending = pending;
        q.tx.send(d).unwrap();
    }

    /// Publishes a message as JetStream redelivers it (after a crash, say).
    pub fn publish_redelivered(&self, priority: Priority, body: Value, delivered: u64) {
        let id = body["task_id"].as_str().unwrap_or("?").to_owned();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let q = &self.queues[priority.index()];
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
        let d = delivery(&id, priority, bytes, delivered, seq, &q.tx, &self.log);
        q.tx.send(d).unwrap();
    }

    pub fn acks(&self) -> Vec<String> {
        self.log.acks.lock().unwrap().clone()
    }

    pub fn naks(&self) -> usize {
        self.log.naks.lock().unwrap().len()
    }

    pub fn requeues(&self) -> Vec<String> {
        self.log.requeues.lock().unwrap().clone()
    }
}

#[async_trait]
impl TaskSource for FakeSource {
    async fn open(
        &self,
        priority: Priority,
    ) -> Result<BoxStream<'static, Result<Arrival, SourceError>>, SourceError> {
        let rx = self.queues[priority.index()].rx.clone();
        Ok(futures::stream::unfold(rx, |rx| async move {
            let next = rx.lock().await.recv().await;
            next.map(|d| (Ok(d), rx))
        })
        .boxed())
    }

    async fn backlog(&self, priority: Priority) -> Result<Backlog, SourceError> {
        Ok(Backlog {
            depth: self.depths[priority.index()].load(Ordering::Relaxed),
            oldest_age: None,
        })
    }

    async fn requeue(&self, copy: Requeue) -> Result<(), SourceError> {
        let body: Value = serde_json::from_slice(&copy.body).unwrap();
        self.log
            .requeues
            .lock()
            .unwrap()
            .push(body["task_id"].as_str().unwrap_or("?").to_owned());
        let priority = match copy.subject.rsplit('.').next() {
            Some("p1") => Priority::P1,
            Some("p2") => Priority::P2,
            _ => Priority::P3,
        };
        let id = body["task_id"].as_str().unwrap_or("?").to_owned();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let q = &self.queues[priority.index()];
        let mut d = delivery(&id, priority, copy.body, 1, seq, &q.tx, &self.log);
        d.requeued = true;
        q.tx.send(d).unwrap();
        Ok(())
    }
}

#[derive(Default)]
pub struct FakeSink {
    pub outcomes: Mutex<HashMap<String, Vec<Value>>>,
    pub dead: Mutex<HashMap<String, Vec<Value>>>,
}

impl FakeSink {
    /// Records an outcome as an earlier process published it.
    pub fn record(&self, id: &str, outcome: Value) {
        let mut o = self.outcomes.lock().unwrap();
        o.entry(id.to_owned()).or_default().push(outcome);
    }
    pub fn copies(&self, id: &str) -> usize {
        self.outcomes.lock().unwrap().get(id).map_or(0, Vec::len)
    }
    pub fn outcome(&self, id: &str) -> Option<Value> {
        self.outcomes
            .lock()
            .unwrap()
            .get(id)
            .and_then(|v| v.first().cloned())
    }
    pub fn outcome_count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }
    pub fn max_copies(&self) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
    }
}

#[async_trait]
impl OutcomeSink for FakeSink {
    async fn publish_outcome(&self, outcome: &Encoded<'_>) -> Result<bool, SinkError> {
        let mut o = self.outcomes.lock().unwrap();
        let list = o.entry(outcome.task_id.to_owned()).or_default();
        list.push(serde_json::from_slice(&outcome.body).unwrap());
        Ok(list.len() > 1)
    }
    async fn publish_dead_letter(&self, dead_letter: &Encoded<'_>) -> Result<(), SinkError> {
        let mut d = self.dead.lock().unwrap();
        d.entry(dead_letter.task_id.to_owned())
            .or_default()
            .push(serde_json::from_slice(&dead_letter.body).unwrap());
        Ok(())
    }
    async fn publish_reply(&self, _s: &str, _b: Bytes, _e: Encoding) -> Result<(), SinkError> {
        Ok(())
    }
    async fn outcome_exists(&self, task_id: &str, _generation: u32) -> Result<bool, SinkError> {
        Ok(self.outcomes.lock().unwrap().contains_key(task_id))
    }
}

pub type Script = dyn Fn(&Value) -> Result<Completion, ProviderError> + Send + Sync;

pub struct FakeProvider {
    script: Box<Script>,
    delay: Duration,
    calls: Mutex<Vec<(String, Instant)>>,
}

impl FakeProvider {
    pub fn new(
        delay: Duration,
        script: impl Fn(&Value) -> Result<Completion, ProviderError> + Send + Sync + 'static,
    ) -> Arc<FakeProvider> {
        Arc::new(FakeProvider {
            script: Box::new(script),
            delay,
            calls: Mutex::default(),
        })
    }
    pub fn calls(&self) -> Vec<(String, Instant)> {
        self.calls.lock().unwrap().clone()
    }
}

pub fn ok() -> Result<Completion, ProviderError> {
    Ok(Completion {
        output: Some("answer".into()),
        finish_reason: Some("stop".into()),
        usage: Usage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 100,
            ..Usage::default()
        },
        limits: Default::default(),
        service_tier: None,
    })
}

/// A provider that answers every call with [`ok`] after `delay`.
pub fn healthy(delay: Duration) -> Arc<FakeProvider> {
    FakeProvider::new(delay, |_| ok())
}

/// A provider that fails every call with `error` after `delay`.
pub fn failing(delay: Duration, error: ProviderError) -> Arc<FakeProvider> {
    FakeProvider::new(delay, move |_| Err(error.clone()))
}

/// A provider whose first call fails with `error`; every later call gets [`ok`].
pub fn failing_once(error: ProviderError) -> Arc<FakeProvider> {
    let first = AtomicBool::new(true);
    FakeProvider::new(Duration::ZERO, move |_| {
        if first.swap(false, Ordering::SeqCst) {
            Err(error.clone())
        } else {
            ok()
        }
    })
}

/// A provider that fails calls with `error` until `at`, then answers [`ok`]
/// (50 ms a call).
pub fn down_until(at: Instant, error: ProviderError) -> Arc<FakeProvider> {
    FakeProvider::new(Duration::from_millis(50), move |_| {
        if Instant::now() < at {
            Err(error.clone())
        } else {
            ok()
        }
    })
}

/// A transient failure (5xx) with `status`.
pub fn transient(status: u16, message: &str) -> ProviderError {
    ProviderError::Transient {
        status: Some(status),
        message: message.into(),
    }
}

/// A rejection (4xx) with `status`.
pub fn rejected(status: u16, message: &str) -> ProviderError {
    ProviderError::Rejected {
        status,
        message: message.into(),
    }
}

/// A 429 asking to wait `retry_after`.
pub fn rate_limited(retry_after: Duration) -> ProviderError {
    ProviderError::RateLimited {
        limits: RateLimitInfo {
            retry_after: Some(retry_after),
            ..RateLimitInfo::default()
        },
        message: "slow down".into(),
    }
}

#[async_trait]
impl Provider for FakeProvider {
    async fn complete(&self, request: &Value) -> Result<Completion, ProviderError> {
        let content = request["messages"][1]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        self.calls.lock().unwrap().push((content, Instant::now()));
        tokio::time::sleep(self.delay).await;
        (self.script)(request)
    }
}

// ---------- the engine under test ----------

pub fn settings() -> EngineSettings {
    let mut task_types = BTreeMap::new();
    task_types.insert(
        "echo".to_owned(),
        TaskType {
            system_prompt: "sys".into(),
            template: "{text}".into(),
            default_tier: Tier::Simple,
            max_tokens: 10,
            route: None,
        },
    );
    let mut models = BTreeMap::new();
    models.insert(
        "m".to_owned(),
        ModelPrice {
            input: 1.0,
            cached_input: 0.5,
            output: 2.0,
            cache_write: None,
        },
    );
    EngineSettings {
        catalog: Catalog {
            task_types,
            tiers: TierModels {
                simple: "m".into(),
                standard: "m".into(),
                complex: "m".into(),
                auto_simple_max_chars: 100,
                auto_standard_max_chars: 1000,
                rules: Vec::new(),
                classifier: Default::default(),
            },
            model_providers: [("m".to_owned(), "fake".to_owned())].into_iter().collect(),
            batch_providers: Default::default(),
            marks_cache_prefix: Default::default(),
            route_policy: Default::default(),
            service_tiers: Default::default(),
        },
        batching: [
            BatchPolicy {
                max_size: 4,
                max_wait_ms: 10,
                seal_when_drained: true,
                depth_steps: Vec::new(),
            },
            BatchPolicy {
                max_size: 8,
                max_wait_ms: 100,
                seal_when_drained: true,
                depth_steps: Vec::new(),
            },
            BatchPolicy {
                max_size: 100,
                max_wait_ms: 1000,
                seal_when_drained: true,
                depth_steps: Vec::new(),
            },
        ],
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay_ms: 100,
            max_delay_ms: 1000,
        },
        prices: PriceTable {
            as_of: "2026-01-01".into(),
            batch_discount: 0.5,
            priority_multiplier: 1.75,
            models,
        },
        max_payload_bytes: 10_000,
        reply_to: batchd_actors::codec::ReplyPolicy::default_for("batchd"),
        route: RouteSettings {
            max_concurrency: 4,
            initial_concurrency: 4,
            ..RouteSettings::default()
        },
        route_limits: HashMap::new(),
        request_timeout: Duration::from_secs(30),
        claim_ttl: Duration::from_secs(15),
        claims: batchd_actors::peers::ClaimMode::Always,
        park_after: Duration::from_secs(5),
        park_keep: 2,
        publish_retry: Duration::from_secs(5),
        lease_heartbeat: Duration::from_secs(10),
        backlog_interval: Duration::from_secs(60),
        restart: RestartPolicy {
            max_restarts: 5,
            within_secs: 60,
        },
        replica: "test-replica".into(),
        route_refresh: Duration::from_secs(5),
        seed: 1,
        budgets: Default::default(),
        ledger: Default::default(),
        offpeak: OffPeak::default(),
        clock: Clock::system(),
        preemption: Default::default(),
        targets: Default::default(),
        batch_api: Default::default(),
        dedupe_window: None,
        caching: Default::default(),
    }
}

pub struct Rig {
    pub engine: Engine,
    pub attempts: Arc<MemoryAttempts>,
    pub ledger: Arc<MemoryLedger>,
    pub board: Arc<MemoryBoard>,
    pub checkpoints: Arc<MemoryCheckpoints>,
    pub owners: Arc<MemoryOwnership>,
    pub source: Arc<FakeSource>,
    pub sink: Arc<FakeSink>,
    pub provider: Arc<FakeProvider>,
}

pub async fn rig(settings: EngineSettings, provider: Arc<FakeProvider>) -> Rig {
    rig_with_ledger(settings, provider, Arc::new(MemoryLedger::default())).await
}

/// A rig over a given ledger (one that outlives an engine, for restarts).
pub async fn rig_with_ledger(
    settings: EngineSettings,
    provider: Arc<FakeProvider>,
    ledger: Arc<MemoryLedger>,
) -> Rig {
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let sink = Arc::new(FakeSink::default());
    let owners = Arc::new(MemoryOwnership::default());
    rig_over(settings, provider, ledger, checkpoints, sink, owners).await
}

/// A rig that starts where a killed process left off: over its checkpoints
/// and the outcomes it had published.
pub async fn rig_after_crash(
    settings: EngineSettings,
    provider: Arc<FakeProvider>,
    checkpoints: Arc<MemoryCheckpoints>,
    sink: Arc<FakeSink>,
) -> Rig {
    let owners = Arc::new(MemoryOwnership::default());
    rig_after_crash_with_owners(settings, provider, checkpoints, sink, owners).await
}

/// [`rig_after_crash`] over an ownership store other replicas wrote to.
pub async fn rig_after_crash_with_owners(
    settings: EngineSettings,
    provider: Arc<FakeProvider>,
    checkpoints: Arc<MemoryCheckpoints>,
    sink: Arc<FakeSink>,
    owners: Arc<MemoryOwnership>,
) -> Rig {
    let ledger = Arc::new(MemoryLedger::default());
    rig_over(settings, provider, ledger, checkpoints, sink, owners).await
}

async fn rig_over(
    settings: EngineSettings,
    provider: Arc<FakeProvider>,
    ledger: Arc<MemoryLedger>,
    checkpoints: Arc<MemoryCheckpoints>,
    sink: Arc<FakeSink>,
    owners: Arc<MemoryOwnership>,
) -> Rig {
    let source = FakeSource::new();
    let attempts = Arc::new(MemoryAttempts::default());
    let board = Arc::new(MemoryBoard::default());
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("fake".into(), provider.clone());
    let ports = Ports {
        source: source.clone(),
        sink: sink.clone(),
        attempts: attempts.clone(),
        ledger: ledger.clone(),
        board: board.clone(),
        checkpoints: checkpoints.clone(),
        owners: owners.clone(),
        providers,
        jobs: Arc::new(batchd_actors::ports::MemoryJobs::default()),
        batch_apis: Default::default(),
    };
    let engine = Engine::start(settings, ports).await.unwrap();
    Rig {
        engine,
        attempts,
        ledger,
        board,
        checkpoints,
        owners,
        source,
        sink,
        provider,
    }
}

pub fn task(id: &str, text: &str) -> Value {
    json!({"task_id": id, "type": "echo", "payload": {"text": text}})
}

/// Lets the engine run (paused time auto-advances while everything waits)
/// until `done` holds; panics after `limit` of virtual time.
pub async fn until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
