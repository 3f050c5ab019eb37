//! Building outcomes and dead letters, and making them durable before the
//! task's message is acked (guarantee 1). Shared by the Intake (invalid and
//! exhausted tasks) and the Dispatcher (provider results).

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::Utc;
use serde_json::Value;

use crate::codec::{self, Rejection};
use crate::context::EngineContext;
use crate::lease::Lease;
use crate::messages::Accepted;
use crate::metrics;
use crate::ports::{Delivery, Encoded, SinkError};
use crate::pricing::Picousd;
use crate::routing::TierChoice;
use crate::task::{
    timestamp, DeadLetter, Encoding, ErrorKind, Outcome, Priority, RouteKind, Task, TaskError,
};

/// An outcome ready to publish, with its dead letter when it failed.
#[derive(Debug)]
pub struct Final {
    /// The outcome.
    pub outcome: Outcome,
    /// Its dead letter, for failures.
    pub dead_letter: Option<DeadLetter>,
    /// The encoding to publish in.
    pub encoding: Encoding,
    /// The producer's extra subject.
    pub reply_to: Option<String>,
    /// When the task was created (for the latency histogram).
    pub created_at: chrono::DateTime<Utc>,
}

/// A failed outcome for a task that could be decoded.
pub fn failed(
    task: &Task,
    error: TaskError,
    attempts: u32,
    model: Option<&str>,
    provider: Option<&str>,
    batch_id: Option<&str>,
) -> Final {
    let now = Utc::now();
    let total = elapsed_ms(task.created_at, now);
    let error = TaskError {
        message: codec::bounded(&error.message),
        ..error
    };
    let outcome = Outcome::failure(
        task.task_id.clone(),
        error.clone(),
        task.priority.number(),
        task.tenant.clone(),
        total,
        timestamp(now),
    );
    Final {
        outcome: Outcome {
            model: model.map(str::to_owned).or_else(|| task.model.clone()),
            provider: provider.map(str::to_owned),
            // Only a task that reached a provider has a route.
            route: provider.map(|_| RouteKind::Realtime),
            service_tier: None,
            attempts,
            batch_id: batch_id.map(str::to_owned),
            metadata: task.metadata.clone(),
            generation: task.generation,
            ..outcome
        },
        dead_letter: Some(DeadLetter {
            task: task.original.to_value(),
            error,
            attempts,
            dead_at: timestamp(now),
            subject: String::new(),
            raw_base64: None,
        }),
        encoding: task.encoding,
        reply_to: task.reply_to.clone(),
        created_at: task.created_at,
    }
}

/// The failed outcome and dead letter of a message that is not a valid task.
/// A message whose task id can't be read is answered under [`unreadable_id`].
pub fn rejected(d: &Delivery, r: Rejection) -> Final {
    let now = Utc::now();
    let task_id = r
        .task_id
        .clone()
        .unwrap_or_else(|| unreadable_id(d.priority, d.stream_sequence, d.published_at));
    let error = TaskError::new(ErrorKind::InvalidRequest, codec::bounded(&r.message));
    let raw_base64 = r
        .original
        .is_none()
        .then(|| base64::engine::general_purpose::STANDARD.encode(&d.body));
    let outcome = Outcome::failure(
        task_id,
        error.clone(),
        d.priority.number(),
        r.tenant.unwrap_or_else(|| "default".into()),
        elapsed_ms(d.published_at, now),
        timestamp(now),
    );
    Final {
        outcome: Outcome {
            metadata: r.metadata,
            generation: d.generation,
            ..outcome
        },
        dead_letter: Some(DeadLetter {
            task: r.original.unwrap_or(Value::Null),
            error,
            attempts: 0,
            dead_at: timestamp(now),
            subject: d.subject.clone(),
            raw_base64,
        }),
        encoding: r.encoding,
        reply_to: r.reply_to,
        created_at: d.published_at,
    }
}

/// The id used for a message whose own task id is unreadable:
/// `invalid~p<N>~<stream seq>~<publish time, Unix ms>`. `~` is a valid subject
/// token character but never part of a valid task id, so it cannot collide
/// with a producer's id; the publish time keeps it unique when the stream is
/// recreated and its sequence starts again; a redelivery gets the same id.
pub fn unreadable_id(
    p: Priority,
    stream_sequence: u64,
    published_at: chrono::DateTime<Utc>,
) -> String {
    format!(
        "invalid~{}~{stream_sequence}~{}",
        p.token(),
        published_at.timestamp_millis()
    )
}

/// Milliseconds from `from` to `to`, zero if negative.
pub fn elapsed_ms(from: chrono::DateTime<Utc>, to: chrono::DateTime<Utc>) -> u64 {
    u64::try_from((to - from).num_milliseconds()).unwrap_or(0)
}

/// Publishes the outcome and then its dead letter (if any), each with a
/// PubAck, then acks the message. When the stream stays unreachable past
/// `publish_retry`, the message is left to redelivery instead: the outcome
/// may be missing, never the task.
pub async fn deliver(ctx: &EngineContext, lease: Lease, f: Final, subject: &str) {
    match publish(ctx, &f, subject).await {
        Ok(duplicate) => {
            if let Err(e) = lease.ack().await {
                tracing::warn!(task_id = %f.outcome.task_id, error = %e, "ack failed; the redelivery will find the outcome and skip");
            }
            if !duplicate {
                count_completed(ctx, &f);
            }
        }
        Err(e) => {
            tracing::error!(task_id = %f.outcome.task_id, error = %e, "outcome not durable; task handed back for redelivery");
            lease.abandon();
        }
    }
}

/// Counts a task finished now in the completion metrics.
fn count_completed(ctx: &EngineContext, f: &Final) {
    let p = Priority::from_number(i64::from(f.outcome.priority)).unwrap_or(Priority::P3);
    let latency = Duration::from_millis(elapsed_ms(f.created_at, Utc::now()));
    // A label value only from the catalog: a producer's model name never
    // becomes a series.
    let model = f
        .outcome
        .model
        .as_deref()
        .filter(|m| ctx.settings.catalog.model_providers.contains_key(*m))
        .unwrap_or("");
    metrics::task_completed(p, f.outcome.status, model, latency);
    ctx.targets
        .lock()
        .finished(p, latency, tokio::time::Instant::now());
    if let Some(e) = &f.outcome.error {
        metrics::dead_lettered(e.kind.as_str());
    }
}

/// Publishes the outcome (and dead letter) of a task whose message was
/// acked already (a provider job's task): no lease to settle. An outcome
/// already kept for the task (of its generation or later) is left alone.
/// True when the outcome is durable (published now or before).
pub async fn deliver_detached(ctx: &EngineContext, f: Final, subject: &str) -> bool {
    let (task_id, generation) = (f.outcome.task_id.as_str(), f.outcome.generation);
    match ctx.ports.sink.outcome_exists(task_id, generation).await {
        Ok(true) => return true,
        Ok(false) => {}
        Err(e) => {
            tracing::debug!(task_id = %task_id, error = %e, "outcome lookup failed; publishing (a duplicate is dropped by its id)")
        }
    }
    match publish(ctx, &f, subject).await {
        Ok(duplicate) => {
            if !duplicate {
                count_completed(ctx, &f);
            }
            true
        }
        Err(e) => {
            tracing::error!(task_id = %f.outcome.task_id, error = %e, "outcome of a provider job's task not durable; the job stays recorded and is settled again at the next start");
            false
        }
    }
}

/// [`deliver`] for a terminal verdict reached without a provider answer
/// (`max_retries`, `expired`): when an outcome already exists, that one is
/// kept and the message is only acked.
pub async fn deliver_unless_done(ctx: &EngineContext, lease: Lease, f: Final, subject: &str) {
    let (task_id, generation) = (f.outcome.task_id.clone(), f.outcome.generation);
    if let Some(lease) = unless_done(ctx, lease, &task_id, generation).await {
        deliver(ctx, lease, f, subject).await;
    }
}

/// Looks for the kept outcome of `task_id` (of `generation` or later)
/// before the engine spends anything on it. When one exists the message is
/// acked; when the lookup fails it is handed back for a later try. Either
/// way `None`; `Some(lease)` means no outcome exists: go on.
pub async fn unless_done(
    ctx: &EngineContext,
    lease: Lease,
    task_id: &str,
    generation: u32,
) -> Option<Lease> {
    let answer = ctx.ports.sink.outcome_exists(task_id, generation).await;
    unless_known_done(lease, task_id, answer).await
}

/// [`unless_done`] with the lookup's answer in hand (the Dispatcher looks up
/// a whole batch in one request).
pub async fn unless_known_done(
    lease: Lease,
    task_id: &str,
    answer: Result<bool, SinkError>,
) -> Option<Lease> {
    match answer {
        Ok(false) => Some(lease),
        Ok(true) => {
            tracing::debug!(task_id = %task_id, "outcome already published; skipping");
            let _ = lease.ack().await;
            None
        }
        Err(e) => {
            tracing::warn!(task_id = %task_id, error = %e, "could not check for an existing outcome; handing back");
            let _ = lease.nak(Some(Duration::from_secs(1))).await;
            None
        }
    }
}

async fn publish(ctx: &EngineContext, f: &Final, subject: &str) -> Result<bool, SinkError> {
    let sink = &ctx.ports.sink;
    let id = f.outcome.task_id.as_str();
    let outcome = Encoded {
        task_id: id,
        generation: f.outcome.generation,
        body: encode(&f.outcome, f.encoding)?,
        encoding: f.encoding,
    };
    let duplicate = retrying(ctx, || sink.publish_outcome(&outcome)).await?;
    // After the outcome, and only when this outcome is the one kept: a dead
    // letter never exists for a task whose kept outcome succeeded.
    if let (Some(dl), false) = (&f.dead_letter, duplicate) {
        let mut dl = dl.clone();
        if dl.subject.is_empty() {
            dl.subject = subject.to_owned();
        }
        let dead_letter = Encoded {
            body: encode(&dl, f.encoding)?,
            ..outcome.clone()
        };
        retrying(ctx, || sink.publish_dead_letter(&dead_letter)).await?;
    }
    if let (Some(reply_to), false) = (&f.reply_to, duplicate) {
        if let Err(e) = sink.publish_reply(reply_to, outcome.body, f.encoding).await {
            tracing::warn!(task_id = %id, error = %e, "reply_to publish failed; the outcome is in the results stream");
        }
    }
    Ok(duplicate)
}

fn encode<T: serde::Serialize>(value: &T, encoding: Encoding) -> Result<Bytes, SinkError> {
    codec::encode(value, encoding)
        .map(Bytes::from)
        .map_err(|e| SinkError(e.to_string()))
}

/// Retries a publish with backoff until it succeeds or `publish_retry` has passed.
async fn retrying<T, F, Fut>(ctx: &EngineContext, mut op: F) -> Result<T, SinkError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SinkError>>,
{
    let give_up = tokio::time::Instant::now() + ctx.settings.publish_retry;
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() + wait > give_up => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "publish failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What the task paid the tier classifier, in its tier choice.
pub fn classifier_picousd(tier: Option<&TierChoice>) -> Picousd {
    tier.map_or(0, |c| c.classifier_picousd)
}

/// An outcome's `classifier_cost_usd`: present when the task paid for a
/// classifier call.
pub fn classifier_usd(picousd: Picousd) -> Option<f64> {
    (picousd > 0).then(|| crate::pricing::usd(picousd))
}

impl Final {
    /// Counts the tier classifier's call of `a` on a failed outcome (which
    /// spent nothing else): its cost is the outcome's.
    pub fn charge_classifier(mut self, a: &Accepted) -> Final {
        let paid = classifier_picousd(a.plan.tier.as_ref());
        if paid > 0 {
            self.outcome.classifier_cost_usd = classifier_usd(paid);
            self.outcome.cost_usd += crate::pricing::usd(paid);
        }
        self
    }
}

/// Fails an accepted task that never reached a provider (out of attempts,
/// past its deadline): its outcome is delivered unless one exists, then its
/// claim is released.
pub fn fail_accepted(ctx: &std::sync::Arc<EngineContext>, a: Accepted, error: TaskError) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let f = failed(&a.task, error, a.attempts_before, None, None, None).charge_classifier(&a);
        deliver_unless_done(&ctx, a.lease, f, &a.subject).await;
        drop(a.claim);
    });
}
