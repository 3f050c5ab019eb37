//! The engine against in-memory fakes under paused tokio time: a miniature
//! JetStream (nak = redeliver with delivered+1), a recording sink and a
//! scripted provider. Deterministic: no sleeps, no real clocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::backoff::RetryPolicy;
use batchd_actors::batching::BatchPolicy;
use batchd_actors::context::Ports;
use batchd_actors::lease::{AckError, Acker, Lease, LeaseKeeper};
use batchd_actors::messages::ActorKind;
use batchd_actors::ports::{
    Backlog, Completion, Delivery, OutcomeSink, Provider, ProviderError, SinkError, SourceError,
    TaskSource,
};
use batchd_actors::pricing::{ModelPrice, PriceTable};
use batchd_actors::routing::{Catalog, TaskType, TierModels};
use batchd_actors::settings::{EngineSettings, RestartPolicy};
use batchd_actors::task::{Encoding, Priority, Tier, Usage};
use batchd_actors::{Engine, EngineError};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

// ---------- a miniature JetStream ----------

#[derive(Default)]
struct Log {
    acks: Mutex<Vec<String>>,
    naks: Mutex<Vec<String>>,
}

struct Queue {
    tx: mpsc::UnboundedSender<Delivery>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>>,
}

struct FakeAcker {
    id: String,
    priority: Priority,
    body: Bytes,
    delivered: u64,
    seq: u64,
    tx: mpsc::UnboundedSender<Delivery>,
    keeper: LeaseKeeper,
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
            &self.keeper,
            &self.log,
        );
        let _ = self.tx.send(d);
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), AckError> {
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn delivery(
    id: &str,
    priority: Priority,
    body: Bytes,
    delivered: u64,
    seq: u64,
    tx: &mpsc::UnboundedSender<Delivery>,
    keeper: &LeaseKeeper,
    log: &Arc<Log>,
) -> Delivery {
    let acker = FakeAcker {
        id: id.to_owned(),
        priority,
        body: body.clone(),
        delivered,
        seq,
        tx: tx.clone(),
        keeper: keeper.clone(),
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
        pending: None,
        lease: Lease::new(Box::new(acker), Some(keeper)),
    }
}

struct FakeSource {
    queues: [Queue; 3],
    keeper: LeaseKeeper,
    log: Arc<Log>,
    seq: AtomicU64,
}

impl FakeSource {
    fn new(keeper: LeaseKeeper) -> Arc<FakeSource> {
        let q = || {
            let (tx, rx) = mpsc::unbounded_channel();
            Queue {
                tx,
                rx: Arc::new(tokio::sync::Mutex::new(rx)),
            }
        };
        Arc::new(FakeSource {
            queues: [q(), q(), q()],
            keeper,
            log: Arc::default(),
            seq: AtomicU64::new(1),
        })
    }

    fn publish(&self, priority: Priority, body: Value) {
        self.publish_with_pending(priority, body, None);
    }

    /// Publishes as JetStream would report it with `pending` messages behind it.
    fn publish_with_pending(&self, priority: Priority, body: Value, pending: Option<u64>) {
        let id = body["task_id"].as_str().unwrap_or("?").to_owned();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let q = &self.queues[priority.index()];
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
        let mut d = delivery(&id, priority, bytes, 1, seq, &q.tx, &self.keeper, &self.log);
        d.pending = pending;
        q.tx.send(d).unwrap();
    }

    fn acks(&self) -> Vec<String> {
        self.log.acks.lock().unwrap().clone()
    }

    fn naks(&self) -> usize {
        self.log.naks.lock().unwrap().len()
    }
}

#[async_trait]
impl TaskSource for FakeSource {
    async fn open(
        &self,
        priority: Priority,
    ) -> Result<BoxStream<'static, Result<Delivery, SourceError>>, SourceError> {
        let rx = self.queues[priority.index()].rx.clone();
        Ok(futures::stream::unfold(rx, |rx| async move {
            let next = rx.lock().await.recv().await;
            next.map(|d| (Ok(d), rx))
        })
        .boxed())
    }

    async fn backlog(&self, _priority: Priority) -> Result<Backlog, SourceError> {
        Ok(Backlog::default())
    }
}

#[derive(Default)]
struct FakeSink {
    outcomes: Mutex<HashMap<String, Vec<Value>>>,
    dead: Mutex<HashMap<String, Vec<Value>>>,
}

impl FakeSink {
    fn outcome(&self, id: &str) -> Option<Value> {
        self.outcomes
            .lock()
            .unwrap()
            .get(id)
            .and_then(|v| v.first().cloned())
    }
    fn outcome_count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }
    fn max_copies(&self) -> usize {
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
    async fn publish_outcome(
        &self,
        task_id: &str,
        body: Bytes,
        _e: Encoding,
    ) -> Result<bool, SinkError> {
        let mut o = self.outcomes.lock().unwrap();
        let list = o.entry(task_id.to_owned()).or_default();
        list.push(serde_json::from_slice(&body).unwrap());
        Ok(list.len() > 1)
    }
    async fn publish_dead_letter(
        &self,
        id: &str,
        body: Bytes,
        _e: Encoding,
    ) -> Result<(), SinkError> {
        let mut d = self.dead.lock().unwrap();
        d.entry(id.to_owned())
            .or_default()
            .push(serde_json::from_slice(&body).unwrap());
        Ok(())
    }
    async fn publish_reply(&self, _s: &str, _b: Bytes, _e: Encoding) -> Result<(), SinkError> {
        Ok(())
    }
    async fn outcome_exists(&self, task_id: &str) -> Result<bool, SinkError> {
        Ok(self.outcomes.lock().unwrap().contains_key(task_id))
    }
}

type Script = dyn Fn(&Value) -> Result<Completion, ProviderError> + Send + Sync;

struct FakeProvider {
    script: Box<Script>,
    delay: Duration,
    calls: Mutex<Vec<(String, Instant)>>,
}

impl FakeProvider {
    fn new(
        delay: Duration,
        script: impl Fn(&Value) -> Result<Completion, ProviderError> + Send + Sync + 'static,
    ) -> Arc<FakeProvider> {
        Arc::new(FakeProvider {
            script: Box::new(script),
            delay,
            calls: Mutex::default(),
        })
    }
    fn calls(&self) -> Vec<(String, Instant)> {
        self.calls.lock().unwrap().clone()
    }
}

fn ok() -> Result<Completion, ProviderError> {
    Ok(Completion {
        output: Some("answer".into()),
        finish_reason: Some("stop".into()),
        usage: Usage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 100,
        },
    })
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

fn settings() -> EngineSettings {
    let mut task_types = BTreeMap::new();
    task_types.insert(
        "echo".to_owned(),
        TaskType {
            system_prompt: "sys".into(),
            template: "{text}".into(),
            default_tier: Tier::Simple,
            max_tokens: 10,
        },
    );
    let mut models = BTreeMap::new();
    models.insert(
        "m".to_owned(),
        ModelPrice {
            input: 1.0,
            cached_input: 0.5,
            output: 2.0,
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
            },
            model_providers: [("m".to_owned(), "fake".to_owned())].into_iter().collect(),
        },
        batching: [
            BatchPolicy {
                max_size: 4,
                max_wait_ms: 10,
                seal_when_drained: true,
            },
            BatchPolicy {
                max_size: 8,
                max_wait_ms: 100,
                seal_when_drained: true,
            },
            BatchPolicy {
                max_size: 100,
                max_wait_ms: 1000,
                seal_when_drained: true,
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
            models,
        },
        max_payload_bytes: 10_000,
        route_concurrency: 4,
        p1_reserved: 1,
        request_timeout: Duration::from_secs(30),
        rate_limit_patience: Duration::from_secs(600),
        max_retry_after: Duration::from_secs(60),
        publish_retry: Duration::from_secs(5),
        lease_heartbeat: Duration::from_secs(10),
        backlog_interval: Duration::from_secs(60),
        restart: RestartPolicy {
            max_restarts: 5,
            within_secs: 60,
        },
        seed: 1,
    }
}

struct Rig {
    engine: Engine,
    source: Arc<FakeSource>,
    sink: Arc<FakeSink>,
    provider: Arc<FakeProvider>,
}

async fn rig(settings: EngineSettings, provider: Arc<FakeProvider>) -> Rig {
    let keeper = LeaseKeeper::default();
    let source = FakeSource::new(keeper.clone());
    let sink = Arc::new(FakeSink::default());
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("fake".into(), provider.clone());
    let ports = Ports {
        source: source.clone(),
        sink: sink.clone(),
        providers,
        keeper,
    };
    let engine = Engine::start(settings, ports).await.unwrap();
    Rig {
        engine,
        source,
        sink,
        provider,
    }
}

fn task(id: &str, text: &str) -> Value {
    json!({"task_id": id, "type": "echo", "payload": {"text": text}})
}

/// Lets the engine run (paused time auto-advances while everything waits)
/// until `done` holds; panics after `limit` of virtual time.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn every_task_gets_one_outcome_and_one_ack() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_millis(5), |_| ok()),
    )
    .await;
    for i in 0..100 {
        let p = Priority::ALL[i % 3];
        r.source.publish(p, task(&format!("t{i}"), "x"));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 100).await;
    assert_eq!(r.sink.outcome_count(), 100);
    assert_eq!(r.sink.max_copies(), 1);
    let o = r.sink.outcome("t7").unwrap();
    assert_eq!(o["status"], "succeeded");
    // 1000 input at $1/M + 100 output at $2/M
    assert!((o["cost_usd"].as_f64().unwrap() - 0.0012).abs() < 1e-12);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_seals_when_its_max_wait_elapses() {
    let r = rig(settings(), FakeProvider::new(Duration::ZERO, |_| ok())).await;
    let start = Instant::now();
    for i in 0..3 {
        r.source.publish(Priority::P3, task(&format!("w{i}"), "x"));
    }
    until(Duration::from_secs(5), || r.sink.outcome_count() == 3).await;
    let calls = r.provider.calls();
    assert_eq!(calls.len(), 3);
    for (_, at) in &calls {
        let waited = *at - start;
        assert!(
            waited >= Duration::from_millis(1000),
            "sent after {waited:?}, before max_wait"
        );
        assert!(
            waited < Duration::from_millis(1100),
            "sent after {waited:?}"
        );
    }
    let ids: Vec<Value> = (0..3)
        .map(|i| r.sink.outcome(&format!("w{i}")).unwrap()["batch_id"].clone())
        .collect();
    assert!(ids.iter().all(|b| *b == ids[0]), "one batch: {ids:?}");
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_seals_at_once() {
    let mut s = settings();
    s.batching[2] = BatchPolicy {
        max_size: 4,
        max_wait_ms: 60_000,
        seal_when_drained: true,
    };
    let r = rig(s, FakeProvider::new(Duration::ZERO, |_| ok())).await;
    let start = Instant::now();
    for i in 0..4 {
        r.source.publish(Priority::P3, task(&format!("f{i}"), "x"));
    }
    until(Duration::from_secs(5), || r.sink.outcome_count() == 4).await;
    assert!(Instant::now() - start < Duration::from_secs(1));
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_rejected_task_does_not_fail_its_batch() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::ZERO, |req| {
            if req["messages"][1]["content"] == "bad" {
                Err(ProviderError::Rejected {
                    status: 400,
                    message: "nope".into(),
                })
            } else {
                ok()
            }
        }),
    )
    .await;
    for (i, text) in ["a", "bad", "c", "d"].iter().enumerate() {
        r.source.publish(Priority::P1, task(&format!("r{i}"), text));
    }
    until(Duration::from_secs(5), || r.source.acks().len() == 4).await;
    let bad = r.sink.outcome("r1").unwrap();
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["error"]["kind"], "provider_rejected");
    assert_eq!(bad["error"]["status_code"], 400);
    assert!(r.sink.dead.lock().unwrap().contains_key("r1"));
    for id in ["r0", "r2", "r3"] {
        assert_eq!(r.sink.outcome(id).unwrap()["status"], "succeeded");
    }
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_until_attempts_run_out() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::ZERO, |_| {
            Err(ProviderError::Transient {
                status: Some(503),
                message: "down".into(),
            })
        }),
    )
    .await;
    r.source.publish(Priority::P2, task("flaky", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 1).await;
    let o = r.sink.outcome("flaky").unwrap();
    assert_eq!(o["error"]["kind"], "max_retries");
    assert_eq!(o["attempts"], 3);
    assert_eq!(r.provider.calls().len(), 3, "max_attempts = 3");
    assert_eq!(r.source.naks(), 2, "two hand-backs before the last attempt");
    assert_eq!(
        r.sink.dead.lock().unwrap()["flaky"][0]["error"]["kind"],
        "max_retries"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_then_success_succeeds_on_the_second_attempt() {
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let r = rig(
        settings(),
        FakeProvider::new(Duration::ZERO, move |_| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(ProviderError::Transient {
                    status: Some(500),
                    message: "oops".into(),
                })
            } else {
                ok()
            }
        }),
    )
    .await;
    r.source.publish(Priority::P1, task("once", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 1).await;
    let o = r.sink.outcome("once").unwrap();
    assert_eq!(o["status"], "succeeded");
    assert_eq!(o["attempts"], 2);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_route_waits_out_retry_after_in_place() {
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let r = rig(
        settings(),
        FakeProvider::new(Duration::ZERO, move |_| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(ProviderError::RateLimited {
                    retry_after: Duration::from_secs(7),
                    message: "slow down".into(),
                })
            } else {
                ok()
            }
        }),
    )
    .await;
    let start = Instant::now();
    r.source.publish(Priority::P1, task("rl", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 1).await;
    assert!(
        Instant::now() - start >= Duration::from_secs(7),
        "Retry-After honoured"
    );
    let o = r.sink.outcome("rl").unwrap();
    assert_eq!(o["status"], "succeeded");
    assert_eq!(o["attempts"], 1, "a 429 does not spend an attempt");
    assert_eq!(r.source.naks(), 0);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_whose_outcome_exists_is_acked_without_calling_the_provider() {
    let r = rig(settings(), FakeProvider::new(Duration::ZERO, |_| ok())).await;
    r.sink
        .outcomes
        .lock()
        .unwrap()
        .insert("done".into(), vec![json!({"status": "succeeded"})]);
    r.source.publish(Priority::P1, task("done", "x"));
    until(Duration::from_secs(5), || {
        r.source.acks() == vec!["done".to_owned()]
    })
    .await;
    assert!(r.provider.calls().is_empty());
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_copies_of_one_task_call_the_provider_once() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_millis(500), |_| ok()),
    )
    .await;
    r.source.publish(Priority::P1, task("twin", "x"));
    r.source.publish(Priority::P1, task("twin", "x"));
    until(Duration::from_secs(10), || r.source.acks().len() == 2).await;
    assert_eq!(r.provider.calls().len(), 1);
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_tasks_get_an_outcome_and_a_dead_letter_while_good_ones_flow() {
    let r = rig(settings(), FakeProvider::new(Duration::ZERO, |_| ok())).await;
    r.source.publish(
        Priority::P2,
        json!({"task_id": "u1", "type": "poem", "payload": {"text": "x"}}),
    );
    r.source.publish(
        Priority::P2,
        json!({"task_id": "u2", "type": "echo", "payload": {"text": "x"}, "priority": 3}),
    );
    r.source
        .publish(Priority::P2, json!({"payload": {"text": "x"}}));
    r.source.publish(Priority::P2, task("good", "x"));
    until(Duration::from_secs(5), || r.source.acks().len() == 4).await;
    assert!(r.sink.outcome("u1").unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown task type"));
    assert!(r.sink.outcome("u2").unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("p2 subject"));
    let unreadable = r
        .sink
        .outcome("invalid-p2-3")
        .expect("synthetic id for a task without one");
    assert_eq!(unreadable["error"]["kind"], "invalid_request");
    assert_eq!(
        r.sink.dead.lock().unwrap()["invalid-p2-3"][0]["subject"],
        "batchd.tasks.p2"
    );
    assert_eq!(r.sink.outcome("good").unwrap()["status"], "succeeded");
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_actor_is_restarted_and_no_task_is_lost() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_millis(20), |_| ok()),
    )
    .await;
    for i in 0..60 {
        r.source
            .publish(Priority::ALL[i % 3], task(&format!("p{i}"), "x"));
    }
    for kind in [
        ActorKind::Assembler,
        ActorKind::Dispatcher,
        ActorKind::Intake,
    ] {
        tokio::time::sleep(Duration::from_millis(15)).await;
        r.engine.inject_fault(kind);
    }
    for i in 60..120 {
        r.source
            .publish(Priority::ALL[i % 3], task(&format!("p{i}"), "x"));
    }
    until(Duration::from_secs(60), || r.sink.outcome_count() == 120).await;
    until(Duration::from_secs(60), || r.source.acks().len() >= 120).await;
    assert_eq!(r.sink.max_copies(), 1);
    assert!(
        r.source.naks() > 0,
        "the crashed assembler's open batches were handed back"
    );
    assert!(r.engine.is_running());
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn restarts_beyond_the_intensity_limit_stop_the_engine() {
    let mut s = settings();
    s.restart = RestartPolicy {
        max_restarts: 2,
        within_secs: 60,
    };
    let mut r = rig(s, FakeProvider::new(Duration::ZERO, |_| ok())).await;
    for _ in 0..3 {
        r.engine.inject_fault(ActorKind::Assembler);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), r.engine.wait()).await;
    assert!(
        matches!(stopped, Ok(Err(EngineError::Escalated))),
        "{stopped:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn priority_one_does_not_queue_behind_a_route_full_of_bulk_work() {
    // route_concurrency 4, one permit reserved for p1; each request takes 1 s.
    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_secs(1), |_| ok()),
    )
    .await;
    for i in 0..40 {
        r.source
            .publish(Priority::P3, task(&format!("bulk{i}"), "x"));
    }
    // Let the bulk batch seal and fill the route.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = Instant::now();
    r.source.publish(Priority::P1, task("vip", "x"));
    until(Duration::from_secs(30), || r.sink.outcome("vip").is_some()).await;
    let waited = Instant::now() - start;
    assert!(
        waited < Duration::from_millis(1100),
        "p1 waited {waited:?} behind bulk work"
    );
    assert!(
        r.sink.outcome_count() < 20,
        "bulk work was still queued when p1 finished"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_seals_at_once_when_its_queue_is_drained() {
    let r = rig(settings(), FakeProvider::new(Duration::ZERO, |_| ok())).await;
    let start = Instant::now();
    // p3 waits up to 1 s for a full batch of 100; the last of these three
    // reports an empty queue behind it.
    for (i, pending) in [Some(2), Some(1), Some(0)].into_iter().enumerate() {
        r.source
            .publish_with_pending(Priority::P3, task(&format!("d{i}"), "x"), pending);
    }
    until(Duration::from_secs(5), || r.sink.outcome_count() == 3).await;
    let waited = Instant::now() - start;
    assert!(
        waited < Duration::from_millis(100),
        "sealed after {waited:?}"
    );
    let batches: std::collections::HashSet<String> = (0..3)
        .map(|i| {
            r.sink.outcome(&format!("d{i}")).unwrap()["batch_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(batches.len(), 1, "the three travelled together");
    r.engine.shutdown().await;
}
