//! The narrow I/O traits the engine talks through. `src/` implements them
//! over JetStream and HTTP; `actors/tests` implements them in memory.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde_json::Value;

use crate::lease::{Acker, Lease, LeaseKeeper};
use crate::ledger::{CallRecord, CallSheet, DayTotals};
use crate::peers::ReplicaEvent;
use crate::route::limits::RateLimitInfo;
use crate::route::{ReplicaHeartbeat, RouteState};
use crate::task::{Encoding, Priority, RouteKind, Usage};

/// One delivered task message. A source hands it over with its [`Acker`];
/// the engine takes it in with [`Delivery::lease`], so from then on it is
/// held by a [`Lease`] (nak on drop, heartbeats).
#[derive(Debug)]
pub struct Delivery<H = Lease> {
    /// The priority of the subject it came on.
    pub priority: Priority,
    /// The subject it came on.
    pub subject: String,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
    /// How many times JetStream has delivered it (1 on first delivery).
    pub delivered: u64,
    /// The stream sequence (identifies a message whose body is unreadable).
    pub stream_sequence: u64,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// The replay generation from the `Batchd-Generation` header (0 when absent).
    pub generation: u32,
    /// True for a copy the engine requeued (it carries `Batchd-Published-At`):
    /// not a new task, and the attempts its task spent are in the store.
    pub requeued: bool,
    /// The route kind a requeued copy must take (`Batchd-Route`).
    pub route: Option<RouteKind>,
    /// Messages still waiting for this consumer after this one, when known
    /// (0: the queue is drained, no point holding a batch open for more).
    pub pending: Option<u64>,
    /// The hold on it: the source's acker, then the engine's lease.
    pub hold: H,
}

impl Delivery<Box<dyn Acker>> {
    /// Takes the message into the engine: its acker becomes a lease that
    /// `keeper` heartbeats and that naks the message when dropped unsettled.
    pub fn lease(self, keeper: &LeaseKeeper) -> Delivery {
        Delivery {
            priority: self.priority,
            subject: self.subject,
            content_type: self.content_type,
            body: self.body,
            delivered: self.delivered,
            stream_sequence: self.stream_sequence,
            published_at: self.published_at,
            generation: self.generation,
            requeued: self.requeued,
            route: self.route,
            pending: self.pending,
            hold: Lease::new(self.hold, Some(keeper)),
        }
    }
}

impl<H> Delivery<H> {
    /// True the first time this task reaches the engine: neither a
    /// redelivery nor a requeued copy.
    pub fn is_first(&self) -> bool {
        self.delivered <= 1 && !self.requeued
    }
}

/// Errors from the task source.
#[derive(Debug, thiserror::Error)]
#[error("task source: {0}")]
pub struct SourceError(pub String);

/// What waits in one priority's queue.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Messages not yet finished (pending plus in flight).
    pub depth: u64,
    /// Age of the oldest unfinished message.
    pub oldest_age: Option<Duration>,
}

/// Where tasks come from: one durable consumer per priority.
#[async_trait]
pub trait TaskSource: Send + Sync + 'static {
    /// Opens the delivery stream of one priority's consumer. The stream
    /// survives server restarts (it reconnects); it ends only on shutdown.
    async fn open(
        &self,
        priority: Priority,
    ) -> Result<BoxStream<'static, Result<Delivery<Box<dyn Acker>>, SourceError>>, SourceError>;

    /// The current backlog of one priority.
    async fn backlog(&self, priority: Priority) -> Result<Backlog, SourceError>;

    /// Publishes a copy of a task message at the back of its queue (PubAck
    /// awaited), so a task that cannot go anywhere for now stops holding a
    /// place among the messages in flight. The caller then acks the original.
    async fn requeue(&self, copy: Requeue) -> Result<(), SourceError>;
}

/// A task message to publish again at the back of its queue.
#[derive(Debug, Clone)]
pub struct Requeue {
    /// The subject it arrived on.
    pub subject: String,
    /// The body, unchanged.
    pub body: Bytes,
    /// Its `Content-Type`.
    pub content_type: Option<String>,
    /// Its replay generation.
    pub generation: u32,
    /// When it was first published: the copy keeps the task's age.
    pub published_at: DateTime<Utc>,
    /// The route kind the copy must take (sent as `Batchd-Route`), when the
    /// engine decided it: `realtime` for the tasks of a batch job cancelled
    /// when it outlasted its priority's patience.
    pub route: Option<RouteKind>,
}

/// The header that carries the route kind a requeued copy must take.
pub const ROUTE_HEADER: &str = "Batchd-Route";

/// The header that carries a requeued task's first publish time (RFC 3339).
pub const PUBLISHED_AT_HEADER: &str = "Batchd-Published-At";

/// Errors from the outcome sink.
#[derive(Debug, thiserror::Error)]
#[error("outcome sink: {0}")]
pub struct SinkError(pub String);

/// An outcome or dead letter of one run of a task, encoded for the sink.
#[derive(Debug, Clone)]
pub struct Encoded<'a> {
    /// The task's id: the last token of the subject.
    pub task_id: &'a str,
    /// The run's generation (0 for a first run).
    pub generation: u32,
    /// The encoded outcome or dead letter.
    pub body: Bytes,
    /// How `body` is encoded.
    pub encoding: Encoding,
}

impl Encoded<'_> {
    /// Its `Nats-Msg-Id` (see [`message_id`]).
    pub fn message_id(&self) -> String {
        message_id(self.task_id, self.generation)
    }
}

/// Where outcomes and dead letters go.
#[async_trait]
pub trait OutcomeSink: Send + Sync + 'static {
    /// Publishes an outcome on `results.<task_id>` (with `Nats-Msg-Id`
    /// [`Encoded::message_id`]) and waits for its PubAck. `Ok(true)` when the
    /// stream already had it.
    async fn publish_outcome(&self, outcome: &Encoded<'_>) -> Result<bool, SinkError>;

    /// Publishes a dead letter on `dlq.<task_id>` and waits for its PubAck.
    async fn publish_dead_letter(&self, dead_letter: &Encoded<'_>) -> Result<(), SinkError>;

    /// Publishes an outcome to a producer's `reply_to` (core NATS, best effort).
    async fn publish_reply(
        &self,
        subject: &str,
        body: Bytes,
        encoding: Encoding,
    ) -> Result<(), SinkError>;

    /// True when the kept outcome of `task_id` is of `generation` or later
    /// (any outcome counts for generation 0).
    async fn outcome_exists(&self, task_id: &str, generation: u32) -> Result<bool, SinkError>;

    /// [`OutcomeSink::outcome_exists`] for each `(task_id, generation)` of
    /// `tasks`: one answer each, in order. An adapter that can look many up
    /// in one request (the Dispatcher asks for a whole batch) does; this
    /// default asks one at a time.
    async fn outcomes_exist(&self, tasks: &[(&str, u32)]) -> Vec<Result<bool, SinkError>> {
        let mut answers = Vec::with_capacity(tasks.len());
        for (task_id, generation) in tasks {
            answers.push(self.outcome_exists(task_id, *generation).await);
        }
        answers
    }
}

/// The header that marks a replayed task message with its generation.
pub const GENERATION_HEADER: &str = "Batchd-Generation";

/// The `Nats-Msg-Id` of a task's outcome and dead letter: the task id for a
/// first run, `<task_id>:g<N>` for its N-th replay, so a replay's outcome is
/// not dropped as a duplicate of the first.
pub fn message_id(task_id: &str, generation: u32) -> String {
    if generation == 0 {
        task_id.to_owned()
    } else {
        format!("{task_id}:g{generation}")
    }
}

/// Errors from the attempt store.
#[derive(Debug, thiserror::Error)]
#[error("attempt store: {0}")]
pub struct StoreError(pub String);

/// Where the attempts a task has spent are kept, so the count survives a
/// crash and does not depend on how often JetStream delivered the message.
/// Written only when an attempt is spent (a transient provider failure), read
/// only for a redelivered message: the happy path never touches it.
#[async_trait]
pub trait AttemptStore: Send + Sync + 'static {
    /// Attempts recorded for `task_id` (0 when none).
    async fn get(&self, task_id: &str) -> Result<u32, StoreError>;
    /// Records that `task_id` has spent `attempts`.
    async fn set(&self, task_id: &str, attempts: u32) -> Result<(), StoreError>;
    /// Forgets `task_id` (its outcome is durable).
    async fn clear(&self, task_id: &str) -> Result<(), StoreError>;
}

/// An [`AttemptStore`] in memory: for tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryAttempts(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl MemoryAttempts {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl AttemptStore for MemoryAttempts {
    async fn get(&self, task_id: &str) -> Result<u32, StoreError> {
        Ok(self.map().get(task_id).copied().unwrap_or(0))
    }
    async fn set(&self, task_id: &str, attempts: u32) -> Result<(), StoreError> {
        self.map().insert(task_id.to_owned(), attempts);
        Ok(())
    }
    async fn clear(&self, task_id: &str) -> Result<(), StoreError> {
        self.map().remove(task_id);
        Ok(())
    }
}

/// Errors from the ledger store.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A revision-checked write found another revision (or an existing key).
    #[error("ledger: {0} changed since it was read")]
    Conflict(String),
    /// Anything else.
    #[error("ledger: {0}")]
    Store(String),
}

/// A stream of call sheets in write order.
pub type SheetStream = BoxStream<'static, Result<CallSheet, LedgerError>>;

/// Where calls and spend are recorded: sheets of call records
/// (`sheet.<ULID>`, each written once, see [`crate::ledger`]) and daily
/// totals per tenant (`day.<day>.<tenant>`, revision-checked).
#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Stores one sheet of call records under a new key. Its revision.
    async fn write_sheet(&self, records: &[CallRecord]) -> Result<u64, LedgerError>;
    /// As [`LedgerStore::write_sheet`], handing the records over: a store
    /// may keep them for its own watch, which then needs not decode the
    /// sheet it wrote.
    async fn write_owned_sheet(&self, records: Vec<CallRecord>) -> Result<u64, LedgerError> {
        self.write_sheet(&records).await
    }
    /// Stores a sheet under `key` (`sheet.<...>`) unless that key exists
    /// (`Conflict`): for records that may be written again after a restart
    /// (a provider job's lines), so that they are stored once. Its revision.
    async fn create_sheet(&self, key: &str, records: &[CallRecord]) -> Result<u64, LedgerError>;
    /// Every sheet, in write order: those stored now, then each write as it
    /// happens.
    async fn watch_sheets(&self) -> Result<SheetStream, LedgerError>;
    /// The totals at `key` and their revision.
    async fn read_day(&self, key: &str) -> Result<Option<(DayTotals, u64)>, LedgerError>;
    /// Writes the totals at `key` if still at `revision` (`None`: only if
    /// absent). The new revision.
    async fn write_day(
        &self,
        key: &str,
        totals: &DayTotals,
        revision: Option<u64>,
    ) -> Result<u64, LedgerError>;
    /// Every daily total of a day starting with `prefix` (`YYYY-MM`, `YYYY-MM-DD`
    /// or empty), with its key and revision.
    async fn days(&self, prefix: &str) -> Result<Vec<(String, DayTotals, u64)>, LedgerError>;
}

/// Errors from the route board.
#[derive(Debug, thiserror::Error)]
#[error("route board: {0}")]
pub struct BoardError(pub String);

/// Where a replica publishes the state of its routes (paused, circuit open,
/// limits), so that any machine can see it. Best effort: the engine logs a
/// failed write and tries again, it never waits on one.
#[async_trait]
pub trait RouteBoard: Send + Sync + 'static {
    /// Stores `state` under `key` (see [`crate::route::route_key`]),
    /// replacing what was there.
    async fn put(&self, key: &str, state: &RouteState) -> Result<(), BoardError>;
    /// Removes `key`: the replica no longer drives that route (or, for a
    /// heartbeat key, has stopped).
    async fn remove(&self, key: &str) -> Result<(), BoardError>;
    /// Stores this replica's heartbeat under [`crate::route::heartbeat_key`].
    async fn beat(&self, beat: &ReplicaHeartbeat) -> Result<(), BoardError>;
    /// Every replica's heartbeat and route state: those stored now, then
    /// [`ReplicaEvent::Loaded`], then each write (and each heartbeat's
    /// removal) as it happens.
    async fn watch_board(&self) -> Result<ReplicaStream, BoardError>;
}

/// What [`RouteBoard::watch_board`] yields.
pub type ReplicaStream = BoxStream<'static, Result<ReplicaEvent, BoardError>>;

/// A [`RouteBoard`] in memory: for tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryBoard {
    routes: std::sync::Mutex<std::collections::BTreeMap<String, RouteState>>,
    beats: std::sync::Mutex<std::collections::BTreeMap<String, ReplicaHeartbeat>>,
    watchers: std::sync::Mutex<Vec<ReplicaWatcher>>,
}

type ReplicaWatcher = tokio::sync::mpsc::UnboundedSender<Result<ReplicaEvent, BoardError>>;

impl MemoryBoard {
    /// The route states stored, by key.
    pub fn entries(&self) -> std::collections::BTreeMap<String, RouteState> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The heartbeats stored, by key.
    pub fn heartbeats(&self) -> std::collections::BTreeMap<String, ReplicaHeartbeat> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn tell(&self, event: ReplicaEvent) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w.send(Ok(event.clone())).is_ok());
    }
}

#[async_trait]
impl RouteBoard for MemoryBoard {
    async fn put(&self, key: &str, state: &RouteState) -> Result<(), BoardError> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), state.clone());
        self.tell(ReplicaEvent::Route(state.clone()));
        Ok(())
    }
    async fn remove(&self, key: &str) -> Result<(), BoardError> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        let gone = self
            .beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if gone.is_some() {
            self.tell(ReplicaEvent::Gone(key.to_owned()));
        }
        Ok(())
    }
    async fn beat(&self, beat: &ReplicaHeartbeat) -> Result<(), BoardError> {
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(crate::route::heartbeat_key(&beat.replica), beat.clone());
        self.tell(ReplicaEvent::Beat(beat.clone()));
        Ok(())
    }
    async fn watch_board(&self) -> Result<ReplicaStream, BoardError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Under the watchers' lock, so no beat falls between the two.
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for beat in self.heartbeats().into_values() {
            let _ = tx.send(Ok(ReplicaEvent::Beat(beat)));
        }
        for state in self.entries().into_values() {
            let _ = tx.send(Ok(ReplicaEvent::Route(state)));
        }
        let _ = tx.send(Ok(ReplicaEvent::Loaded));
        watchers.push(tx);
        let mut rx = rx;
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }
}

/// A successful chat completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The assistant's text.
    pub output: Option<String>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
    /// Tokens used.
    pub usage: Usage,
    /// The rate-limit headers that came with it.
    pub limits: RateLimitInfo,
    /// The service tier the answer says served it (`service_tier`), when
    /// it says.
    pub service_tier: Option<crate::task::ServiceTier>,
}

/// How a provider request failed, which decides what happens to the task.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// 429: pause the route, try again after the headers' wait.
    #[error("rate limited (retry after {:?}): {message}", limits.retry_after)]
    RateLimited {
        /// The rate-limit headers, `Retry-After` included.
        limits: RateLimitInfo,
        /// The provider's message.
        message: String,
    },
    /// 429 `insufficient_quota`: the account is out of credit; no wait helps.
    #[error("quota exhausted: {message}")]
    QuotaExhausted {
        /// The provider's message.
        message: String,
    },
    /// 429 `resource_unavailable` to a `service_tier: "flex"` call: flex
    /// capacity is short right now. Not billed, not a rate limit and not
    /// an attempt: the call falls back to the default tier or a batch job.
    #[error("flex capacity unavailable: {message}")]
    FlexUnavailable {
        /// The provider's message.
        message: String,
    },
    /// No answer within the request timeout: try again later.
    #[error("transient provider failure: {message}")]
    Timeout {
        /// What timed out, and after how long.
        message: String,
    },
    /// 5xx, 408, 409, connection errors: try again later.
    #[error("transient provider failure{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        /// HTTP status, when there was a response.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
    /// 4xx other than 429: the request itself is refused; do not retry.
    #[error("provider rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
}

/// An OpenAI-compatible chat completions endpoint.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Sends one chat completion request (the body includes `model`).
    async fn complete(&self, request: &Value) -> Result<Completion, ProviderError>;

    /// Which part of a request the provider's prompt cache can serve.
    fn cached_prefix(&self) -> CachedPrefix {
        CachedPrefix::Any
    }
}

/// What a provider's prompt cache keeps of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedPrefix {
    /// Any long prompt's beginning (OpenAI).
    Any,
    /// Only the shared prefix the adapter marks (Anthropic's
    /// `cache_control`): the system prompt, and a typed task's template
    /// head where the route's provider gets it as its own part
    /// ([`crate::routing::Catalog::marks_cache_prefix`]); a chat payload's
    /// system prompt alone.
    Marked,
}

/// The version of the checkpoint layout this engine writes.
pub const CHECKPOINT_VERSION: u32 = 1;

/// Where a preempted batch stood: written when it is preempted, deleted when
/// it completes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The layout version ([`CHECKPOINT_VERSION`]).
    pub version: u32,
    /// The batch's id (`b_<ULID>`), also its key.
    pub batch_id: String,
    /// Its route's provider.
    pub provider: String,
    /// Its route's model.
    pub model: String,
    /// Its priority (2 or 3).
    pub priority: u8,
    /// Tasks the batch is done with: outcome published, or handed on to a
    /// retry or a requeue.
    pub finished: Vec<String>,
    /// Tasks still to finish, their call in flight or not yet sent.
    pub remaining: Vec<String>,
    /// Attempts each remaining task had spent when the batch started.
    pub attempts: std::collections::BTreeMap<String, u32>,
    /// When it was preempted.
    pub preempted_at: DateTime<Utc>,
    /// Why (`p1_waiting`).
    pub reason: String,
}

/// Errors from the checkpoint store.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint store: {0}")]
pub struct CheckpointError(pub String);

/// Where checkpoints of preempted batches are kept, one per batch id.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// Stores `checkpoint` under its batch id, replacing what was there.
    async fn put(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError>;
    /// Removes the checkpoint of `batch_id` (absent is fine).
    async fn delete(&self, batch_id: &str) -> Result<(), CheckpointError>;
    /// Every readable checkpoint, by batch id.
    async fn list(&self) -> Result<Vec<Checkpoint>, CheckpointError>;
    /// Deletes the entries it cannot read (another layout); their keys.
    async fn drop_unreadable(&self) -> Result<Vec<String>, CheckpointError> {
        Ok(Vec::new())
    }
}

/// A [`CheckpointStore`] in memory: for tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryCheckpoints {
    stored: std::sync::Mutex<std::collections::BTreeMap<String, Checkpoint>>,
    written: std::sync::atomic::AtomicUsize,
}

impl MemoryCheckpoints {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Checkpoint>> {
        self.stored.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is stored now, by batch id.
    pub fn entries(&self) -> std::collections::BTreeMap<String, Checkpoint> {
        self.map().clone()
    }

    /// How many checkpoints were ever written.
    pub fn written(&self) -> usize {
        self.written.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[async_trait]
impl CheckpointStore for MemoryCheckpoints {
    async fn put(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        self.map()
            .insert(checkpoint.batch_id.clone(), checkpoint.clone());
        self.written
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
    async fn delete(&self, batch_id: &str) -> Result<(), CheckpointError> {
        self.map().remove(batch_id);
        Ok(())
    }
    async fn list(&self) -> Result<Vec<Checkpoint>, CheckpointError> {
        Ok(self.map().values().cloned().collect())
    }
}

/// A provider batch job as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchJobStatus {
    /// The provider's batch id.
    pub id: String,
    /// OpenAI's `validating`, `in_progress`, `finalizing`, `completed`,
    /// `failed`, `expired`, `cancelling` or `cancelled`; Anthropic's
    /// `in_progress`, `canceling` (reported as `cancelling`) or `ended`.
    pub status: String,
    /// The file of answered lines, once there is one (OpenAI).
    pub output_file_id: Option<String>,
    /// The file of failed lines, once there is one (OpenAI).
    pub error_file_id: Option<String>,
    /// The `metadata` given at creation (`null` where the provider keeps none).
    pub metadata: Value,
}

impl BatchJobStatus {
    /// True once the job will change no more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled" | "ended"
        )
    }
}

/// A provider's batch job API: OpenAI's Files and Batches, or Anthropic's
/// Message Batches. The engine hands it the job's lines as OpenAI batch
/// input lines (`custom_id`, `body` = the chat request) and reads back one
/// [`LineResult`](crate::provider_jobs::LineResult) per answered line;
/// each adapter speaks its provider's wire format. Failures read like a
/// call's ([`ProviderError`]): transient ones are tried again later, a
/// rejection fails the job's tasks.
#[async_trait]
pub trait BatchApi: Send + Sync + 'static {
    /// The `custom_id` a task's line carries at the provider, and the key
    /// of its result (default: the task id itself).
    fn custom_id(&self, task_id: &str) -> String {
        task_id.to_owned()
    }
    /// Uploads a JSONL input file (`purpose=batch`); its file id. A
    /// provider that takes the requests with the creation uploads nothing
    /// and answers a fixed id.
    async fn upload(&self, filename: &str, jsonl: Bytes) -> Result<String, ProviderError>;
    /// Creates a batch from an uploaded file (or, for a provider without
    /// files, from `jsonl`, the same lines), tagged with `metadata` where
    /// the provider keeps it.
    async fn create(
        &self,
        input_file_id: &str,
        jsonl: &Bytes,
        endpoint: &str,
        completion_window: &str,
        metadata: &Value,
    ) -> Result<BatchJobStatus, ProviderError>;
    /// The batches created most recently (newest first), to find one whose
    /// creation was not recorded by its `metadata` tag (empty where the
    /// provider keeps no tag).
    async fn recent(&self) -> Result<Vec<BatchJobStatus>, ProviderError>;
    /// A batch's current status.
    async fn retrieve(&self, batch_id: &str) -> Result<BatchJobStatus, ProviderError>;
    /// Asks the provider to cancel a batch; it ends `cancelled` (OpenAI) or
    /// `ended` (Anthropic) later, with the lines answered so far.
    async fn cancel(&self, batch_id: &str) -> Result<BatchJobStatus, ProviderError>;
    /// The results of an ended batch by `custom_id`; a line left
    /// unanswered (expired, cancelled) is absent.
    async fn results(
        &self,
        batch: &BatchJobStatus,
    ) -> Result<std::collections::HashMap<String, crate::provider_jobs::LineResult>, ProviderError>;
    /// Deletes a file (absent is fine; nothing for a provider without files).
    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError>;
}

/// Errors from the job store.
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct JobStoreError(pub String);

/// Where provider batch jobs are recorded, one record per job id, from
/// before their tasks' messages are acked until every task has its outcome
/// or is back in its queue.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores `job` under its id, replacing what was there.
    async fn put(&self, job: &crate::provider_jobs::ProviderJob) -> Result<(), JobStoreError>;
    /// Removes the record of `job_id` (absent is fine).
    async fn delete(&self, job_id: &str) -> Result<(), JobStoreError>;
    /// Every readable record.
    async fn list(&self) -> Result<Vec<crate::provider_jobs::ProviderJob>, JobStoreError>;
}

/// A [`JobStore`] in memory: for tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryJobs(
    std::sync::Mutex<std::collections::BTreeMap<String, crate::provider_jobs::ProviderJob>>,
);

impl MemoryJobs {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::BTreeMap<String, crate::provider_jobs::ProviderJob>,
    > {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl JobStore for MemoryJobs {
    async fn put(&self, job: &crate::provider_jobs::ProviderJob) -> Result<(), JobStoreError> {
        self.map().insert(job.id.clone(), job.clone());
        Ok(())
    }
    async fn delete(&self, job_id: &str) -> Result<(), JobStoreError> {
        self.map().remove(job_id);
        Ok(())
    }
    async fn list(&self) -> Result<Vec<crate::provider_jobs::ProviderJob>, JobStoreError> {
        Ok(self.map().values().cloned().collect())
    }
}
