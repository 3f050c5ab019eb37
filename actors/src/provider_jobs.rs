//! # Provider batch jobs
//!
//! The `batch_api` route: a sealed batch of tasks whose route kind is
//! `batch_api` ([`crate::route_policy`]) becomes one or more provider batch
//! jobs (OpenAI's Batch API or Anthropic's Message Batches, through
//! [`BatchApi`]), each a JSONL input file per (model, endpoint) with
//! `custom_id` = task id, split at the file limits (50,000 requests, 200 MB
//! by default).
//!
//! Before that, each task passes the realtime route's budget check
//! (`dispatcher::within_budget`): a tenant over its budget gets no new job;
//! its tasks fail `budget_exceeded` or are held, by their priority's
//! `on_exceeded`.
//!
//! A job is **recorded** in the [`JobStore`] (KV `batchd-jobs`) with what
//! each task's outcome needs and its original message, *before* the tasks'
//! JetStream messages are acked: a job that runs for hours holds no place
//! in `max_ack_pending`. The record says which step the job reached:
//!
//! 1. `recorded`: the input file is uploaded from the record;
//! 2. `uploaded` (file id kept): before creating the batch, the provider's
//!    recent batches are searched for one tagged with this job's id (a
//!    creation whose answer was lost to a crash), so a job is never
//!    submitted twice;
//! 3. `created` (batch id kept): the batch is polled with a doubling wait
//!    (`poll_initial` to `poll_max`).
//!
//! When the batch ends its output and error files are read and mapped by
//! `custom_id`, never by order. Each answered line is its task's own
//! outcome, priced at the batch discount and recorded in the ledger; a line
//! the provider refused (4xx) fails that task alone (`provider_rejected`
//! and a dead letter); a line that failed transiently (5xx) spends one
//! attempt and goes back to its queue, or fails `max_retries` when its
//! attempts are spent; a line left unanswered (the job `expired` or was
//! `cancelled`) goes back to its queue without spending an attempt. Then
//! the files and the record are deleted.
//!
//! A task whose `deadline` has passed when its job ends gets `expired`
//! whatever its line says (an answered line is still recorded in the
//! ledger, and its cost and usage go in the outcome): the deadline is the
//! latest useful completion, and a job is not cancelled for one task.
//!
//! On start, and every `dispatch.claim_ttl_secs` after, the engine looks at
//! every recorded job ([`resume`]) and drives those nobody drives. Exactly
//! one replica drives a job: it takes the ownership record `job.<job id>`
//! (KV `batchd-owners`, see [`crate::ownership`]) first and renews it while
//! it drives the job; the others leave the job alone until the record
//! expires (its owner died), then one of them takes it over and resumes
//! the job from its recorded step. A replica that finds its record taken
//! over (its renewals failed for a whole TTL) stops driving the job.
//! Outcomes carry `Nats-Msg-Id`, so a job whose results were being
//! published when the process died publishes no duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::Instrument as _;

use crate::completion::{parse_chat_completion, parse_error_body};
use crate::context::EngineContext;
use crate::ledger::{day_of, CallRecord, CallState};
use crate::messages::{Accepted, Batch};
use crate::metrics;
use crate::outcome::{self, elapsed_ms, Final};
use crate::ownership::{Acquired, Held, OwnershipError};
use crate::ports::{BatchApi, BatchJobStatus, Completion, ProviderError, Requeue};
use crate::pricing::Picousd;
use crate::task::{
    timestamp, DeadLetter, Encoding, ErrorKind, Outcome, Priority, RouteKind, Status, TaskError,
    Tier, Timings, Usage,
};

/// The version of the job record layout this engine writes.
pub const JOB_VERSION: u32 = 1;

/// The endpoint every job's lines go to.
pub const CHAT_ENDPOINT: &str = "/v1/chat/completions";

/// The `metadata` key that tags a provider batch with its job id.
pub const JOB_TAG: &str = "batchd_job";

/// Which step a job has reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum JobStep {
    /// Recorded; the input file is not uploaded yet.
    Recorded,
    /// The input file is uploaded; the batch is not known to exist.
    Uploaded {
        /// The input file.
        input_file_id: String,
    },
    /// The batch exists.
    Created {
        /// The input file.
        input_file_id: String,
        /// The provider's batch id.
        provider_batch_id: String,
    },
}

/// One task of a job: what its outcome needs and what puts it back in its queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobTask {
    /// The task id, also the line's `custom_id`.
    pub task_id: String,
    /// The request body of its line (`model` included).
    pub request: Value,
    /// Priority number.
    pub priority: u8,
    /// Tenant.
    pub tenant: String,
    /// Extra subject for its outcome.
    pub reply_to: Option<String>,
    /// Echoed in the outcome.
    pub metadata: Option<Value>,
    /// Attempts spent before this job.
    pub attempts: u32,
    /// The producer's `retry_count`.
    pub retry_count: u32,
    /// Replay generation.
    pub generation: u32,
    /// When the task was created.
    pub created_at: DateTime<Utc>,
    /// When its message was first published.
    pub published_at: DateTime<Utc>,
    /// The subject it arrived on.
    pub subject: String,
    /// Its message's `Content-Type`.
    pub content_type: Option<String>,
    /// Its message body, base64.
    pub body_base64: String,
    /// The task body as received (for its dead letter).
    pub original: Value,
    /// True when its outcome is MessagePack.
    pub msgpack: bool,
    /// The tier its model was picked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Why that tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_reason: Option<String>,
    /// What the task paid the tier classifier (added to its outcome's cost).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub classifier_picousd: Picousd,
    /// With dedupe on: the task of the same job whose identical request
    /// line this task shares (it has no line of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<String>,
}

/// A provider batch job, as recorded in the job store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderJob {
    /// Layout version ([`JOB_VERSION`]).
    pub version: u32,
    /// `j_<ULID>`, also its key.
    pub id: String,
    /// The provider (config section) it went to.
    pub provider: String,
    /// Its model.
    pub model: String,
    /// Its endpoint.
    pub endpoint: String,
    /// The engine batch it was assembled from.
    pub batch_id: String,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Where it stands.
    #[serde(flatten)]
    pub step: JobStep,
    /// Its tasks.
    pub tasks: Vec<JobTask>,
    /// When a job of priority-2 work has waited long enough (its
    /// priority's patience, `batching.batch_api.p2_patience_secs`): the
    /// batch is then cancelled and its unanswered tasks go realtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_at: Option<DateTime<Utc>>,
    /// True once that cancel was asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
}

impl ProviderJob {
    /// The JSONL input file: one request line per task that shares no
    /// other's line, `custom_id` = task id.
    pub fn input_file(&self) -> Bytes {
        let mut out = Vec::new();
        for t in self.tasks.iter().filter(|t| t.shares.is_none()) {
            out.extend_from_slice(input_line(&t.task_id, &t.request, &self.endpoint).as_bytes());
            out.push(b'\n');
        }
        Bytes::from(out)
    }
}

/// Marks each task whose request repeats an earlier task's exactly as
/// sharing that task's line.
pub fn mark_shared(tasks: &mut [JobTask]) {
    let mut first: HashMap<String, String> = HashMap::new();
    for t in tasks {
        let request = t.request.to_string();
        match first.get(&request) {
            Some(id) => t.shares = Some(id.clone()),
            None => {
                first.insert(request, t.task_id.clone());
            }
        }
    }
}

/// One line of a Batch API input file.
pub fn input_line(custom_id: &str, request: &Value, endpoint: &str) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": request}).to_string()
}

/// Splits tasks into files of at most `max_requests` lines and `max_bytes`
/// bytes (a single line larger than `max_bytes` still gets a file of its own).
pub fn split<T>(
    items: Vec<T>,
    size: impl Fn(&T) -> usize,
    max_requests: usize,
    max_bytes: usize,
) -> Vec<Vec<T>> {
    let mut files: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item) + 1;
        let start_new = match files.last() {
            None => true,
            Some(f) => f.len() >= max_requests.max(1) || (!f.is_empty() && bytes + n > max_bytes),
        };
        if start_new {
            files.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        if let Some(f) = files.last_mut() {
            f.push(item);
        }
    }
    files
}

/// How one line of a finished job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum LineResult {
    /// Answered with a usable completion.
    Answered(Completion),
    /// Refused or failed: the status (when the line had a response) and
    /// why. An answer without a usable completion reads as a 500.
    Failed {
        /// HTTP status of the line's response, if any.
        status: Option<u16>,
        /// The provider's message.
        message: String,
    },
}

impl LineResult {
    /// A 2xx answer's completion, or the transient failure it is when it
    /// has none (as on the realtime route).
    pub fn from_answer(parsed: Result<Completion, String>) -> LineResult {
        match parsed {
            Ok(c) => LineResult::Answered(c),
            Err(message) => LineResult::Failed {
                status: Some(500),
                message,
            },
        }
    }
}

/// Reads OpenAI's output and error files into results by `custom_id`.
/// Lines that cannot be read, or that report an expiry, are left out:
/// their tasks count as unanswered.
pub fn read_results(files: &[&[u8]]) -> HashMap<String, LineResult> {
    let mut out = HashMap::new();
    for file in files {
        for line in String::from_utf8_lossy(file).lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(id) = v.get("custom_id").and_then(Value::as_str) else {
                continue;
            };
            let response = v.get("response").filter(|r| !r.is_null());
            let status = response
                .and_then(|r| r.get("status_code"))
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok());
            let result = match (status, response) {
                (Some(s), Some(r)) if (200..300).contains(&s) => {
                    let body = r.get("body").map(Value::to_string).unwrap_or_default();
                    LineResult::from_answer(parse_chat_completion(body.as_bytes()))
                }
                (Some(s), Some(r)) => {
                    let body = r.get("body").map(Value::to_string).unwrap_or_default();
                    LineResult::Failed {
                        status: Some(s),
                        message: parse_error_body(body.as_bytes()).1,
                    }
                }
                _ => {
                    let error = v.get("error").cloned().unwrap_or(Value::Null);
                    let code = error.get("code").and_then(Value::as_str).unwrap_or("");
                    if code == "batch_expired" || code == "batch_cancelled" {
                        continue;
                    }
                    let message = error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("the line failed")
                        .to_owned();
                    LineResult::Failed {
                        status: None,
                        message: format!("{code}: {message}"),
                    }
                }
            };
            out.insert(id.to_owned(), result);
        }
    }
    out
}

/// Takes a sealed `batch_api` batch: records its jobs, acks the tasks'
/// messages, and drives the jobs on tasks of their own.
pub fn submit(ctx: Arc<EngineContext>, batch: Batch) {
    let span = tracing::info_span!(
        "provider_job",
        batch_id = %batch.id,
        route = %format_args!("{}/{}", batch.key.route.provider, batch.key.route.model),
        size = batch.tasks.len(),
    );
    tokio::spawn(async move { record_and_start(ctx, batch).await }.instrument(span));
}

async fn record_and_start(ctx: Arc<EngineContext>, batch: Batch) {
    let mut unsettled = Vec::new();
    for mut a in batch.tasks {
        // A task whose outcome exists is acked and skipped, as on the realtime route.
        if let Some(lease) =
            outcome::unless_done(&ctx, a.lease, &a.task.task_id, a.task.generation).await
        {
            a.lease = lease;
            unsettled.push(a);
        }
    }
    // The realtime route's budget check, before any job is recorded: a
    // tenant over its budget gets no new job (its tasks fail or are held).
    let open: Vec<Accepted> = futures::future::join_all(
        unsettled
            .into_iter()
            .map(|a| crate::dispatcher::within_budget(&ctx, a)),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    if open.is_empty() {
        return;
    }
    let s = &ctx.settings.batch_api;
    let endpoint = CHAT_ENDPOINT;
    let files = split(
        open,
        |a: &Accepted| input_line(&a.task.task_id, &a.plan.request, endpoint).len(),
        s.max_requests_per_file,
        s.max_file_bytes,
    );
    for tasks in files {
        let mut job = ProviderJob {
            version: JOB_VERSION,
            id: format!("j_{}", ulid::Ulid::new()),
            provider: batch.key.route.provider.clone(),
            model: batch.key.route.model.clone(),
            endpoint: endpoint.to_owned(),
            batch_id: batch.id.clone(),
            recorded_at: ctx.clock.now(),
            step: JobStep::Recorded,
            tasks: tasks.iter().map(job_task).collect(),
            cancel_at: patience_end(&ctx, &tasks),
            cancelled: false,
        };
        if ctx.settings.dedupe_window.is_some() {
            mark_shared(&mut job.tasks);
        }
        if let Err(e) = ctx.ports.jobs.put(&job).await {
            // Not recorded: the leases nak on drop and the tasks come back.
            tracing::error!(job_id = %job.id, error = %e, "provider job not recorded; its tasks are handed back");
            continue;
        }
        for a in tasks {
            if let Err(e) = a.lease.ack().await {
                tracing::warn!(task_id = %a.task.task_id, error = %e, "ack after recording its job failed; a redelivery finds the job's outcome");
            }
        }
        tracing::info!(job_id = %job.id, tasks = job.tasks.len(), "provider job recorded");
        let ctx = ctx.clone();
        tokio::spawn(own_and_drive(ctx, job, false));
    }
}

/// When a job of these tasks is cancelled for taking too long: for
/// priority-2 work, its patience after now; `None` for priority 3, which
/// waits for the provider's completion window.
fn patience_end(ctx: &EngineContext, tasks: &[Accepted]) -> Option<DateTime<Utc>> {
    let patience = ctx.settings.catalog.route_policy.p2_patience?;
    if !tasks.iter().any(|a| a.task.priority == Priority::P2) {
        return None;
    }
    let patience = chrono::Duration::from_std(patience).ok()?;
    Some(ctx.clock.now() + patience)
}

fn job_task(a: &Accepted) -> JobTask {
    let t = &a.task;
    JobTask {
        task_id: t.task_id.clone(),
        request: a.plan.request.clone(),
        priority: t.priority.number(),
        tenant: t.tenant.clone(),
        reply_to: t.reply_to.clone(),
        metadata: t.metadata.clone(),
        attempts: a.attempts_before,
        retry_count: t.retry_count,
        generation: t.generation,
        created_at: t.created_at,
        published_at: a.published_at,
        subject: a.subject.clone(),
        content_type: a.content_type.clone(),
        body_base64: base64::engine::general_purpose::STANDARD.encode(&a.body),
        original: t.original.to_value(),
        msgpack: t.encoding == Encoding::MessagePack,
        tier: a.plan.tier.as_ref().map(|c| c.tier),
        tier_reason: a.plan.tier.as_ref().map(|c| c.reason.clone()),
        classifier_picousd: outcome::classifier_picousd(a.plan.tier.as_ref()),
        shares: None,
    }
}

/// Drives every recorded job nobody drives: at engine start, then every
/// `claim_ttl` (a job whose owner died is taken over once its ownership
/// record expires). Returns when the engine stops.
pub async fn resume(ctx: Arc<EngineContext>) {
    loop {
        match ctx.ports.jobs.list().await {
            Ok(jobs) => {
                for job in jobs {
                    if !ctx.driving_jobs.is_driving(&job.id) {
                        tokio::spawn(own_and_drive(ctx.clone(), job, true));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "recorded provider jobs not listed; looking again later")
            }
        }
        if !pause(&ctx, ctx.settings.claim_ttl).await {
            return;
        }
    }
}

/// The ownership key of a provider job.
pub fn owner_key(job_id: &str) -> String {
    format!("job.{job_id}")
}

/// The jobs this replica drives now.
#[derive(Debug, Default)]
pub struct DrivingJobs(std::sync::Mutex<std::collections::HashSet<String>>);

impl DrivingJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while this replica drives `job_id`.
    pub fn is_driving(&self, job_id: &str) -> bool {
        self.lock().contains(job_id)
    }

    /// Marks `job_id` driven; false when it already was.
    fn start(&self, job_id: &str) -> bool {
        self.lock().insert(job_id.to_owned())
    }

    fn end(&self, job_id: &str) {
        self.lock().remove(job_id);
    }
}

/// Drives `job` if this replica can take its ownership record, renewing it
/// meanwhile; stops driving when the record is taken over. `found`: the job
/// was found recorded (by an earlier run, or another replica).
async fn own_and_drive(ctx: Arc<EngineContext>, job: ProviderJob, found: bool) {
    let id = job.id.clone();
    if !ctx.driving_jobs.start(&id) {
        return;
    }
    match ctx.call_owners.acquire(&owner_key(&id)).await {
        Ok(Acquired::Taken(held)) => {
            if found {
                tracing::info!(job_id = %id, step = ?job.step, tasks = job.tasks.len(), "resuming a recorded provider job");
            }
            let (lost_tx, lost) = tokio::sync::oneshot::channel();
            let keeper = tokio::spawn(keep_job(ctx.clone(), held, lost_tx));
            tokio::select! {
                () = drive(ctx.clone(), job) => {}
                Ok(()) = lost => {
                    tracing::warn!(job_id = %id, "provider job taken over by another replica (this one's renewals failed for a whole TTL); no longer driven here");
                }
            }
            keeper.abort();
        }
        Ok(Acquired::HeldBy(record)) => {
            tracing::debug!(job_id = %id, owner = %record.owner, "provider job driven by another replica");
        }
        Err(e) => {
            tracing::warn!(job_id = %id, error = %e, "provider job's ownership not taken; looking again later");
        }
    }
    ctx.driving_jobs.end(&id);
}

/// Renews a job's ownership record every third of its TTL; tells `lost`
/// when another replica has taken it over.
async fn keep_job(ctx: Arc<EngineContext>, mut held: Held, lost: tokio::sync::oneshot::Sender<()>) {
    loop {
        tokio::time::sleep(ctx.call_owners.renew_every()).await;
        match ctx.call_owners.renew(&held).await {
            Ok(h) => held = h,
            Err(OwnershipError::Conflict(_)) => {
                let _ = lost.send(());
                return;
            }
            Err(e) => {
                tracing::warn!(key = %held.key, error = %e, "provider job's ownership not renewed; trying again");
            }
        }
    }
}

/// Waits `wait` unless the engine stops first (then false).
async fn pause(ctx: &EngineContext, wait: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = ctx.stopping() => false,
    }
}

/// Drives one job from its recorded step to the end. Stops quietly when the
/// engine stops: the record stays, and the next start resumes it.
async fn drive(ctx: Arc<EngineContext>, mut job: ProviderJob) {
    let Some(api) = ctx.ports.batch_apis.get(&job.provider).cloned() else {
        tracing::error!(job_id = %job.id, provider = %job.provider, "no batch API for the job's provider; the job waits for a config that has one");
        return;
    };
    let s = ctx.settings.batch_api.clone();
    let mut wait = s.poll_initial;
    let backoff = |wait: Duration| (wait * 2).min(s.poll_max);
    let status = loop {
        let step = match &job.step {
            JobStep::Recorded => {
                match api
                    .upload(&format!("{}.jsonl", job.id), job.input_file())
                    .await
                {
                    Ok(input_file_id) => JobStep::Uploaded { input_file_id },
                    Err(e) => {
                        if let Some(done) = refused(&ctx, &job, &e).await {
                            return done;
                        }
                        tracing::warn!(job_id = %job.id, error = %e, "input file not uploaded; trying again");
                        wait = backoff(wait);
                        if !pause(&ctx, wait).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            JobStep::Uploaded { input_file_id } => {
                match find_or_create(api.as_ref(), &job, input_file_id, &s.completion_window).await
                {
                    Ok(b) => JobStep::Created {
                        input_file_id: input_file_id.clone(),
                        provider_batch_id: b.id,
                    },
                    Err(e) => {
                        if let Some(done) = refused(&ctx, &job, &e).await {
                            return done;
                        }
                        tracing::warn!(job_id = %job.id, error = %e, "batch not created; trying again");
                        wait = backoff(wait);
                        if !pause(&ctx, wait).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            JobStep::Created {
                provider_batch_id, ..
            } => {
                let provider_batch_id = provider_batch_id.clone();
                let now = ctx.clock.now();
                if !job.cancelled && job.cancel_at.is_some_and(|at| at <= now) {
                    match api.cancel(&provider_batch_id).await {
                        Ok(_) => {
                            tracing::info!(job_id = %job.id, batch_id = %provider_batch_id, "provider job outlasted its patience: cancelled; its unanswered tasks go realtime");
                            metrics::batch_job_cancelled(&job.provider, &job.model);
                            job.cancelled = true;
                            if let Err(e) = ctx.ports.jobs.put(&job).await {
                                tracing::warn!(job_id = %job.id, error = %e, "job's cancel not recorded; a restart asks again");
                            }
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(job_id = %job.id, error = %e, "batch not cancelled; trying again")
                        }
                    }
                }
                // Look again no later than the patience's end.
                let until_cancel = job
                    .cancel_at
                    .filter(|_| !job.cancelled)
                    .and_then(|at| (at - now).to_std().ok());
                let wait_now =
                    until_cancel.map_or(wait, |u| wait.min(u.max(Duration::from_millis(10))));
                match api.retrieve(&provider_batch_id).await {
                    Ok(b) if b.is_terminal() => break b,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(job_id = %job.id, error = %e, "batch status not read; trying again")
                    }
                }
                if !pause(&ctx, wait_now).await {
                    return;
                }
                wait = backoff(wait);
                continue;
            }
        };
        job.step = step;
        if let Err(e) = ctx.ports.jobs.put(&job).await {
            tracing::warn!(job_id = %job.id, error = %e, "job step not recorded; a restart redoes it");
        }
        wait = s.poll_initial;
    };
    finish(&ctx, api.as_ref(), job, status).await;
}

/// A provider refusal (4xx) of the upload or creation fails the job's
/// tasks; anything else is tried again (`None`).
async fn refused(ctx: &EngineContext, job: &ProviderJob, e: &ProviderError) -> Option<()> {
    let ProviderError::Rejected { status, message } = e else {
        return None;
    };
    tracing::error!(job_id = %job.id, status, %message, "the provider refused the job; its tasks fail");
    for t in &job.tasks {
        let mut error = TaskError::new(ErrorKind::ProviderRejected, message.clone());
        error.status_code = Some(*status);
        publish_failure(ctx, job, t, error, t.attempts, None).await;
    }
    forget(ctx, job).await;
    Some(())
}

/// The batch created for this job: one found among the provider's recent
/// batches by its tag (a creation whose answer was lost), else a new one.
async fn find_or_create(
    api: &dyn BatchApi,
    job: &ProviderJob,
    input_file_id: &str,
    window: &str,
) -> Result<BatchJobStatus, ProviderError> {
    let recent = api.recent().await?;
    if let Some(b) = recent
        .into_iter()
        .find(|b| b.metadata.get(JOB_TAG).and_then(Value::as_str) == Some(job.id.as_str()))
    {
        tracing::info!(job_id = %job.id, batch_id = %b.id, "found the job's batch created before a restart");
        return Ok(b);
    }
    let b = api
        .create(
            input_file_id,
            &job.input_file(),
            &job.endpoint,
            window,
            &json!({ JOB_TAG: job.id }),
        )
        .await?;
    tracing::info!(job_id = %job.id, batch_id = %b.id, "provider batch created");
    Ok(b)
}

/// Reads the ended job's results and settles each task.
async fn finish(ctx: &EngineContext, api: &dyn BatchApi, job: ProviderJob, status: BatchJobStatus) {
    let results = loop {
        match api.results(&status).await {
            Ok(results) => break results,
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "results of an ended job not read; trying again");
                if !pause(ctx, ctx.settings.batch_api.poll_initial).await {
                    return;
                }
            }
        }
    };
    tracing::info!(job_id = %job.id, status = %status.status, answered = results.len(), tasks = job.tasks.len(), "provider job ended");
    let now = ctx.clock.now();
    for t in &job.tasks {
        // A line shared with another task of the job (dedupe) is read
        // under that task's id, and billed to it.
        let line = t.shares.as_deref().unwrap_or(&t.task_id);
        let shared = t
            .shares
            .as_deref()
            .and_then(|id| job.tasks.iter().find(|s| s.task_id == id));
        let result = results.get(&api.custom_id(line));
        if let Some(deadline) = deadline_of(t).filter(|d| *d <= now) {
            expired(ctx, &job, t, result.filter(|_| shared.is_none()), deadline).await;
            continue;
        }
        match result {
            Some(LineResult::Answered(completion)) => {
                answered(ctx, &job, t, completion, shared).await
            }
            Some(LineResult::Failed { status, message }) => {
                line_failed(ctx, &job, t, *status, message).await;
            }
            // Left unanswered: back to its queue; realtime when the job was
            // cancelled for outlasting its patience.
            None => {
                let route = job.cancelled.then_some(RouteKind::Realtime);
                requeue(ctx, t, t.attempts, route).await
            }
        }
    }
    let mut leftovers: Vec<&String> = [&status.output_file_id, &status.error_file_id]
        .into_iter()
        .flatten()
        .collect();
    if let JobStep::Created { input_file_id, .. } = &job.step {
        leftovers.push(input_file_id);
    }
    for id in leftovers {
        if let Err(e) = api.delete_file(id).await {
            tracing::debug!(job_id = %job.id, file_id = %id, error = %e, "file of an ended job not deleted");
        }
    }
    forget(ctx, &job).await;
}

async fn forget(ctx: &EngineContext, job: &ProviderJob) {
    if let Err(e) = ctx.ports.jobs.delete(&job.id).await {
        tracing::warn!(job_id = %job.id, error = %e, "record of an ended job not deleted; a restart settles its tasks again (their outcomes are kept once)");
    }
}

fn priority(t: &JobTask) -> Priority {
    Priority::from_number(i64::from(t.priority)).unwrap_or(Priority::P3)
}

fn encoding(t: &JobTask) -> Encoding {
    if t.msgpack {
        Encoding::MessagePack
    } else {
        Encoding::Json
    }
}

/// The ledger id of a line's call: the same on every settling of the job,
/// so a job settled again after a restart is not counted twice.
fn call_id(job: &ProviderJob, t: &JobTask) -> String {
    format!(
        "{}.g{}.a{}.{}",
        t.task_id,
        t.generation,
        t.attempts.saturating_add(1),
        job.id.trim_start_matches("j_")
    )
}

/// The task's `deadline`, read from its body as received.
fn deadline_of(t: &JobTask) -> Option<DateTime<Utc>> {
    t.original
        .get("deadline")
        .and_then(Value::as_str)
        .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
        .map(|d| d.with_timezone(&Utc))
}

/// A task whose deadline passed while its job ran: `expired`, whatever its
/// line says. An answered line was billed: it is recorded in the ledger and
/// its usage and cost go in the outcome, so outcomes still add up to the bill.
async fn expired(
    ctx: &EngineContext,
    job: &ProviderJob,
    t: &JobTask,
    result: Option<&LineResult>,
    deadline: DateTime<Utc>,
) {
    let (spent, attempts) = match result {
        Some(LineResult::Answered(c)) => (
            Some((c.usage, record_line(ctx, job, t, c.usage, false).await)),
            t.attempts.saturating_add(1),
        ),
        _ => (None, t.attempts),
    };
    let error = TaskError::new(
        ErrorKind::Expired,
        format!(
            "the task's deadline ({}) passed while its provider batch job ran",
            timestamp(deadline)
        ),
    );
    publish_failure(ctx, job, t, error, attempts, spent).await;
}

/// Records an answered line's call in the ledger at the batch price; its
/// cost. With `shared`, the line was another task's: recorded as a shared
/// answer that saved the line's cost, and its own cost is 0.
async fn record_line(
    ctx: &EngineContext,
    job: &ProviderJob,
    t: &JobTask,
    usage: Usage,
    shared: bool,
) -> crate::pricing::Picousd {
    let now = ctx.clock.now();
    let prices = &ctx.settings.prices;
    let terms = crate::pricing::Terms::BATCH_JOB;
    let cost = prices
        .call_cost_picousd(&job.model, &usage, terms)
        .unwrap_or(0);
    let reference = t.tier.map(|_| ctx.settings.catalog.tiers.complex.as_str());
    let tiering_saved = prices.saving_against(reference, &job.model, &usage, terms, cost);
    let mut record = CallRecord {
        call_id: call_id(job, t),
        state: CallState::Started,
        task_id: t.task_id.clone(),
        tenant: t.tenant.clone(),
        model: job.model.clone(),
        priority: t.priority,
        route: RouteKind::BatchApi,
        service_tier: crate::task::ServiceTier::Default,
        started_at: job.recorded_at,
        day: day_of(now),
        estimate_picousd: cost,
        usage: Usage::default(),
        cost_picousd: 0,
        lapsed: false,
        tiering_saved_picousd: 0,
        dedupe_saved_picousd: 0,
    };
    record.finish(usage, cost, now);
    record.tiering_saved_picousd = tiering_saved;
    if shared {
        record = record.shared(cost, now);
    }
    // Keyed by the line's call id: a line read again after a restart is
    // stored (and counted) once.
    let key = format!("{}{}", crate::ledger::SHEET_PREFIX, record.call_id);
    match ctx
        .ports
        .ledger
        .create_sheet(&key, std::slice::from_ref(&record))
        .await
    {
        Ok(_) | Err(crate::ports::LedgerError::Conflict(_)) => {}
        Err(e) => {
            tracing::warn!(call_id = %record.call_id, error = %e, "batch line not recorded in the ledger")
        }
    }
    if shared {
        0
    } else {
        cost
    }
}

/// Settles an answered line's task; `shared` is the task whose line it
/// shares, if any (then the call is that task's: cost 0, nothing in the ledger).
async fn answered(
    ctx: &EngineContext,
    job: &ProviderJob,
    t: &JobTask,
    completion: &Completion,
    shared: Option<&JobTask>,
) {
    let mut completion = completion.clone();
    if let Some(source) = shared {
        record_line(ctx, job, t, completion.usage, true).await;
        completion.usage = Usage::default();
        metrics::deduplicated();
        let shared_call = call_id(job, source);
        return settled(ctx, job, t, completion, 0, Some(shared_call)).await;
    }
    let cost = record_line(ctx, job, t, completion.usage, false).await;
    settled(ctx, job, t, completion, cost, None).await;
}

fn is_zero(n: &Picousd) -> bool {
    *n == 0
}

/// Publishes an answered task's outcome; `shared_call` names the call of
/// another task whose answer it is.
async fn settled(
    ctx: &EngineContext,
    job: &ProviderJob,
    t: &JobTask,
    completion: Completion,
    cost: crate::pricing::Picousd,
    shared_call: Option<String>,
) {
    let cost_usd = crate::pricing::usd(cost);
    let is_shared = shared_call.is_some();
    let completed = Utc::now();
    let total_ms = elapsed_ms(t.created_at, completed);
    let processing_ms = elapsed_ms(job.recorded_at, completed).min(total_ms);
    let outcome = Outcome {
        task_id: t.task_id.clone(),
        status: Status::Succeeded,
        output: completion.output,
        finish_reason: completion.finish_reason,
        error: None,
        model: Some(job.model.clone()),
        provider: Some(job.provider.clone()),
        route: Some(RouteKind::BatchApi),
        service_tier: None,
        tier: t.tier,
        tier_reason: t.tier_reason.clone(),
        classifier_cost_usd: outcome::classifier_usd(t.classifier_picousd),
        shared_call: shared_call.is_some(),
        call_id: shared_call,
        usage: completion.usage,
        cost_usd: crate::pricing::usd(cost.saturating_add(t.classifier_picousd)),
        attempts: t.attempts.saturating_add(u32::from(!is_shared)),
        batch_id: Some(job.batch_id.clone()),
        priority: t.priority,
        tenant: t.tenant.clone(),
        timings: Timings {
            queued_ms: total_ms.saturating_sub(processing_ms),
            processing_ms,
            total_ms,
        },
        metadata: t.metadata.clone(),
        generation: t.generation,
        completed_at: timestamp(completed),
    };
    let f = Final {
        outcome,
        dead_letter: None,
        encoding: encoding(t),
        reply_to: t.reply_to.clone(),
        created_at: t.created_at,
    };
    if outcome::deliver_detached(ctx, f, &t.subject).await {
        metrics::spent(
            &job.model,
            &t.tenant,
            priority(t),
            cost_usd,
            &completion.usage,
        );
        clear_attempts(ctx, t).await;
    }
}

async fn line_failed(
    ctx: &EngineContext,
    job: &ProviderJob,
    t: &JobTask,
    status: Option<u16>,
    message: &str,
) {
    let transient = matches!(status, None | Some(408 | 409 | 429 | 500..=599));
    let attempts = t.attempts.saturating_add(1);
    if !transient {
        let mut error = TaskError::new(ErrorKind::ProviderRejected, message);
        error.status_code = status;
        publish_failure(ctx, job, t, error, attempts, None).await;
        return;
    }
    if let Err(e) = ctx.ports.attempts.set(&t.task_id, attempts).await {
        tracing::warn!(task_id = %t.task_id, error = %e, "attempt count not stored");
    }
    if attempts >= ctx.settings.retry.max_attempts {
        let mut error = TaskError::new(
            ErrorKind::MaxRetries,
            format!("gave up after {attempts} attempts; last error: {message}"),
        );
        error.status_code = status;
        publish_failure(ctx, job, t, error, attempts, None).await;
        return;
    }
    metrics::retried("server_error");
    requeue(ctx, t, attempts, None).await;
}

/// Publishes a task's failure and dead letter; `spent` is the usage and
/// cost of a line that was answered (and billed) all the same.
async fn publish_failure(
    ctx: &EngineContext,
    job: &ProviderJob,
    t: &JobTask,
    error: TaskError,
    attempts: u32,
    spent: Option<(Usage, crate::pricing::Picousd)>,
) {
    let now = Utc::now();
    let error = TaskError {
        message: crate::codec::bounded(&error.message),
        ..error
    };
    let base = Outcome::failure(
        t.task_id.clone(),
        error.clone(),
        t.priority,
        t.tenant.clone(),
        elapsed_ms(t.created_at, now),
        timestamp(now),
    );
    let f = Final {
        outcome: Outcome {
            model: Some(job.model.clone()),
            provider: Some(job.provider.clone()),
            route: Some(RouteKind::BatchApi),
            service_tier: None,
            tier: t.tier,
            tier_reason: t.tier_reason.clone(),
            classifier_cost_usd: outcome::classifier_usd(t.classifier_picousd),
            attempts,
            batch_id: Some(job.batch_id.clone()),
            metadata: t.metadata.clone(),
            generation: t.generation,
            usage: spent.map(|(u, _)| u).unwrap_or_default(),
            cost_usd: crate::pricing::usd(
                spent
                    .map_or(0, |(_, c)| c)
                    .saturating_add(t.classifier_picousd),
            ),
            ..base
        },
        dead_letter: Some(DeadLetter {
            task: t.original.clone(),
            error,
            attempts,
            dead_at: timestamp(now),
            subject: t.subject.clone(),
            raw_base64: None,
        }),
        encoding: encoding(t),
        reply_to: t.reply_to.clone(),
        created_at: t.created_at,
    };
    if outcome::deliver_detached(ctx, f, &t.subject).await {
        if let Some((usage, cost)) = spent {
            metrics::spent(
                &job.model,
                &t.tenant,
                priority(t),
                crate::pricing::usd(cost),
                &usage,
            );
        }
        clear_attempts(ctx, t).await;
    }
}

async fn clear_attempts(ctx: &EngineContext, t: &JobTask) {
    if t.attempts > t.retry_count {
        let _ = ctx.ports.attempts.clear(&t.task_id).await;
    }
}

/// Puts a task back in its queue (its original message, published again).
async fn requeue(ctx: &EngineContext, t: &JobTask, attempts: u32, route: Option<RouteKind>) {
    let Ok(body) = base64::engine::general_purpose::STANDARD.decode(&t.body_base64) else {
        tracing::error!(task_id = %t.task_id, "a job task's message is unreadable; it cannot be requeued");
        return;
    };
    let copy = Requeue {
        subject: t.subject.clone(),
        body: Bytes::from(body),
        content_type: t.content_type.clone(),
        generation: t.generation,
        published_at: t.published_at,
        route,
    };
    loop {
        match ctx.ports.source.requeue(copy.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(task_id = %t.task_id, error = %e, "task of an ended job not requeued; trying again");
                if !pause(ctx, Duration::from_secs(1)).await {
                    return;
                }
            }
        }
    }
    tracing::debug!(task_id = %t.task_id, attempts, "task of a provider job back in its queue");
    metrics::parked();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_split_at_the_request_and_byte_limits() {
        let sizes = vec![10usize, 10, 10, 10, 10];
        let by_count = split(sizes.clone(), |n| *n, 2, 1_000);
        assert_eq!(by_count.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        // 11 bytes a line (newline included): three fit in 33.
        let by_bytes = split(sizes, |n| *n, 100, 33);
        assert_eq!(by_bytes.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
        let oversized = split(vec![50usize, 1], |n| *n, 100, 10);
        assert_eq!(oversized.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
        assert!(split(Vec::<usize>::new(), |n| *n, 1, 1).is_empty());
    }

    #[test]
    fn results_are_mapped_by_custom_id_whatever_their_order() {
        let answer = |text: &str| {
            json!({"custom_id": text, "response": {"status_code": 200, "body": {
                "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1}}}, "error": null})
            .to_string()
        };
        let output = format!(
            "{}\n{}\n{}\n",
            answer("b"),
            answer("a"),
            r#"{"custom_id":"e","response":{"status_code":200,"body":{"choices":[]}},"error":null}"#
        );
        let errors = br#"{"id":"r3","custom_id":"c","response":{"status_code":400,"body":{"error":{"message":"bad","type":"invalid_request_error"}}},"error":null}
{"id":"r4","custom_id":"d","response":null,"error":{"code":"batch_expired","message":"late"}}
not json
"#;
        let r = read_results(&[output.as_bytes(), errors]);
        let text = |id: &str| match &r[id] {
            LineResult::Answered(c) => c.output.clone(),
            other => panic!("{id}: {other:?}"),
        };
        assert_eq!(text("a").as_deref(), Some("a"));
        assert_eq!(text("b").as_deref(), Some("b"));
        assert!(
            matches!(&r["c"], LineResult::Failed { status: Some(400), message } if message.contains("bad"))
        );
        assert!(
            matches!(
                &r["e"],
                LineResult::Failed {
                    status: Some(500),
                    ..
                }
            ),
            "a 200 without a usable answer is a transient failure"
        );
        assert!(!r.contains_key("d"), "an expired line is unanswered");
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn a_job_record_round_trips_with_its_step() {
        let job = ProviderJob {
            version: JOB_VERSION,
            id: "j_1".into(),
            provider: "openai".into(),
            model: "m".into(),
            endpoint: CHAT_ENDPOINT.into(),
            batch_id: "b_1".into(),
            recorded_at: DateTime::<Utc>::UNIX_EPOCH,
            step: JobStep::Created {
                input_file_id: "file-1".into(),
                provider_batch_id: "batch_1".into(),
            },
            tasks: Vec::new(),
            cancel_at: None,
            cancelled: false,
        };
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["step"], "created");
        assert_eq!(v["batch_id"], "b_1");
        assert_eq!(v["provider_batch_id"], "batch_1");
        let back: ProviderJob = serde_json::from_value(v).unwrap();
        assert_eq!(back, job);
    }
}
