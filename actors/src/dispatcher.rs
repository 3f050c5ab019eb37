//! # Dispatcher
//!
//! Owns the provider calls. Each sealed batch is driven by its own task, and
//! each task of a batch on its own, so one bad task never fails a batch. A
//! task's call goes through three parts, each testable alone:
//!
//! - the **route** ([`crate::route::RouteGate`], one per provider and model,
//!   kept in [`Routes`] so it outlives a Dispatcher restart): admission by
//!   priority under an adaptive concurrency limit, a learned or configured
//!   rate budget, pauses and a circuit breaker;
//! - [`classify`]: what a failure means (retry, rate limit, route down,
//!   permanent);
//! - [`outcome`]: the one place outcomes are built and made durable.
//!
//! What happens to a task:
//!
//! - an outcome already in the results stream → ack and skip (no double billing);
//! - its tenant over budget → `budget_exceeded` + dead letter, or held and
//!   requeued until the period ends (per priority, no attempt spent);
//! - every request is recorded in the ledger before it goes out (`started`,
//!   with an estimate) and after its answer (`finished`, exact), in sheets
//!   shared with the calls going out at the same moment, see
//!   [`crate::ledger`] and [`crate::call_sheets`];
//! - a task of a group sharing a prompt prefix long enough for the
//!   provider's cache, not warm on its route, waits (holding no slot) for
//!   the group's first call to be answered, so it reads the prefix from the
//!   cache ([`crate::prompt_warmth`]);
//! - its call claimed by another replica ([`crate::call_claim`], taken beside
//!   the ledger record) → handed back to JetStream until that claim lapses
//!   (no call, no attempt);
//! - success → outcome with usage and cost, then ack;
//! - 429 → the route pauses and learns; the task waits at the route (no attempt);
//! - 401/403, 404, 429 `insufficient_quota` → the route's circuit opens; the
//!   task waits for it to close (no attempt);
//! - 5xx / 408 / 409 / timeout / connection error → one attempt spent (durable
//!   in the attempt store), the task waits in the RetryScheduler, or gets
//!   `max_retries` + dead letter once attempts are spent; a failure that
//!   opens the circuit, or happens while it is open, spends none;
//! - other 4xx → `provider_rejected` + dead letter;
//! - a deadline that passes while the task waits → `expired`.
//!
//! Receives: [`DispatcherMsg`]. Sends: outcomes and dead letters to the sink,
//! retries to the RetryScheduler.
//!
//! On restart: batches already running finish on their own tasks; the routes
//! live in the shared context, so a new incarnation neither doubles a
//! route's concurrency nor forgets its pause or circuit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::batch_control::BatchControl;
use crate::budgets::{OnExceeded, Verdict as BudgetVerdict};
use crate::call_claim::{self, ClaimCheck, ClaimGuard};
use crate::context::EngineContext;
use crate::dedupe::{self, Dedupe, Join, SharedAnswer};
use crate::ledger::{new_call_id, CallRecord, CallState};
use crate::messages::{Accepted, AssemblerMsg, Batch, DispatcherMsg, RetryMsg};
use crate::metrics;
use crate::outcome::{self, deliver, deliver_unless_done, elapsed_ms, Final};
use crate::ports::{CachedPrefix, Completion, Provider, ProviderError, Requeue};
use crate::pricing::Terms;
use crate::prompt_warmth::{self, WarmPrefixes, Warmup};
use crate::retry_scheduler::{classify, RouteFault, Verdict};
use crate::route::{CallReport, CircuitReason, CircuitState, Report, RouteGate};
use crate::routing::Route;
use crate::task::{
    timestamp, ErrorKind, Outcome, RouteKind, ServiceTier, Status, TaskError, Timings,
};

/// The Dispatcher actor.
pub struct Dispatcher;

/// One route: its provider and its gate.
pub struct RouteEntry {
    /// Provider and model.
    pub route: Route,
    pub(crate) provider: Arc<dyn Provider>,
    /// Admission, budget and circuit.
    pub gate: RouteGate,
    /// Tasks waiting for admission on this route.
    waiting: AtomicUsize,
    /// Prompt prefixes warmed, or being warmed, on this route.
    warmth: Arc<WarmPrefixes>,
}

/// One task's place among a route's waiting tasks.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    counted: bool,
}

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting {
            count,
            counted: true,
        }
    }

    /// Leaves the count if more than `keep` wait: true when this task may go.
    fn leave_if_more_than(&mut self, keep: usize) -> bool {
        let left = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > keep).then(|| n - 1)
            })
            .is_ok();
        if left {
            self.counted = false;
        }
        left
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Every route the engine has used, shared by all Dispatcher incarnations.
#[derive(Default)]
pub struct Routes(Mutex<HashMap<Route, Arc<RouteEntry>>>);

impl Routes {
    pub(crate) fn get_or_create(
        &self,
        ctx: &EngineContext,
        route: &Route,
    ) -> Option<Arc<RouteEntry>> {
        let mut routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = routes.get(route) {
            return Some(r.clone());
        }
        let provider = ctx.ports.providers.get(&route.provider)?.clone();
        let entry = Arc::new(RouteEntry {
            route: route.clone(),
            provider,
            gate: RouteGate::new(ctx.settings.route_settings(&route.model)),
            waiting: AtomicUsize::new(0),
            warmth: Arc::default(),
        });
        entry
            .gate
            .signal_priority_one_waiting(ctx.p1_waiting.clone());
        // Other replicas driving this route already: its part from the start.
        entry
            .gate
            .set_sharing(ctx.peers.sharing(&route.label(), ctx.settings.clock.now()));
        routes.insert(route.clone(), entry.clone());
        Some(entry)
    }

    /// True when another route of `route`'s provider has its circuit open
    /// because the provider is unavailable: a failure here is most likely
    /// the same outage, even where this route has seen too few calls to
    /// tell by itself.
    fn provider_unavailable(&self, route: &Route) -> bool {
        let routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        routes.iter().any(|(other, entry)| {
            other.provider == route.provider
                && other != route
                && entry.gate.status().circuit == Some(CircuitReason::Unavailable)
        })
    }

    /// Every route, for metrics and status.
    pub fn all(&self) -> Vec<Arc<RouteEntry>> {
        let routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        routes.values().cloned().collect()
    }
}

/// The Dispatcher's state.
pub struct DispatcherState {
    ctx: Arc<EngineContext>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Drop for DispatcherState {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = Arc<EngineContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<DispatcherMsg>,
        ctx: Arc<EngineContext>,
    ) -> Result<DispatcherState, ActorProcessingErr> {
        let sampler = tokio::spawn(sample_routes(ctx.clone()));
        Ok(DispatcherState { ctx, sampler })
    }

    async fn handle(
        &self,
        _myself: ActorRef<DispatcherMsg>,
        msg: DispatcherMsg,
        state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DispatcherMsg::Dispatch(batch) => state.dispatch(batch),
            DispatcherMsg::InjectFault => panic!("fault injected into the dispatcher"),
        }
        Ok(())
    }
}

/// Keeps the per-route gauges true: a pause or a circuit shows while it
/// lasts and clears when it ends, not at the next success.
async fn sample_routes(ctx: Arc<EngineContext>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for r in ctx.routes.all() {
            let s = r.gate.status();
            let (provider, model) = (r.route.provider.as_str(), r.route.model.as_str());
            metrics::route_status(
                provider,
                model,
                &metrics::RouteGauges {
                    paused: s.paused_until.is_some(),
                    concurrency_limit: s.concurrency_limit,
                    rpm_limit: s.rpm_limit,
                    tpm_limit: s.tpm_limit,
                    circuit: s.circuit.map(CircuitReason::as_str),
                },
            );
        }
    }
}

impl DispatcherState {
    fn dispatch(&mut self, batch: Batch) {
        let priority = batch.key.priority;
        metrics::batch_sealed(
            priority,
            batch.key.kind,
            batch.tasks.len(),
            batch.fill_ratio,
        );
        if batch.key.kind == RouteKind::BatchApi {
            crate::provider_jobs::submit(self.ctx.clone(), batch);
            return;
        }
        let Some(route) = self.ctx.routes.get_or_create(&self.ctx, &batch.key.route) else {
            // Routing only produces configured providers; reaching here is a wiring bug.
            tracing::error!(provider = %batch.key.route.provider, "no such provider; tasks handed back");
            return;
        };
        let ctx = self.ctx.clone();
        // Every line about this batch carries its id, route and size; every
        // line about one of its tasks carries the task id as well.
        let span = tracing::info_span!(
            "batch",
            batch_id = %batch.id,
            route = %format_args!("{}/{}", batch.key.route.provider, batch.key.route.model),
            priority = priority.number(),
            size = batch.tasks.len(),
        );
        tokio::spawn(
            async move {
                tracing::debug!("batch dispatched");
                let batch_id = Arc::<str>::from(batch.id);
                let control = ctx.batches.start(
                    batch_id.clone(),
                    route.route.clone(),
                    priority,
                    batch
                        .tasks
                        .iter()
                        .map(|a| (a.task.task_id.clone(), a.attempts_before)),
                );
                if let Some(resumed) = batch.resumed {
                    control.adopt_checkpoint(resumed.finished);
                }
                let warmups = plan_warmups(&ctx, &route, priority, &batch.tasks);
                // Whether each task's outcome exists, asked for the whole
                // batch at once: no round trip per task.
                let known: Vec<(&str, u32)> = batch
                    .tasks
                    .iter()
                    .map(|a| (a.task.task_id.as_str(), a.task.generation))
                    .collect();
                let mut done = ctx.ports.sink.outcomes_exist(&known).await;
                done.resize_with(known.len(), || {
                    Err(crate::ports::SinkError(
                        "no answer in the batch's lookup".into(),
                    ))
                });
                drop(known);
                let work =
                    batch
                        .tasks
                        .into_iter()
                        .zip(warmups)
                        .zip(done)
                        .map(|((a, warmup), done)| {
                            let task_span = tracing::info_span!("task", task_id = %a.task.task_id);
                            let (ctx, route, control) =
                                (ctx.clone(), route.clone(), control.clone());
                            async move {
                                let task_id = a.task.task_id.clone();
                                run_task(ctx, route, control.clone(), a, warmup, done).await;
                                control.task_done(&task_id);
                            }
                            .instrument(task_span)
                        });
                futures::future::join_all(work).await;
                ctx.batches.end(&batch_id);
                if control.was_checkpointed() {
                    if let Err(e) = ctx.ports.checkpoints.delete(&batch_id).await {
                        tracing::warn!(error = %e, "checkpoint of a completed batch not deleted");
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// One [`Warmup`] per task of a realtime batch: tasks are grouped by
/// shared prefix; a group whose prefix the route's provider can cache, and
/// that the route has not warmed lately, sends one task ahead. Groups are
/// planned apart, so none holds back another.
fn plan_warmups(
    ctx: &EngineContext,
    route: &RouteEntry,
    priority: crate::task::Priority,
    tasks: &[Accepted],
) -> Vec<Warmup> {
    let caching = &ctx.settings.caching;
    let scope = route.provider.cached_prefix();
    let cacheable = |a: &Accepted| {
        caching.worth_warming(match scope {
            CachedPrefix::Any | CachedPrefix::Marked => a.plan.prefix_chars,
        })
    };
    // Prefix → the indices of its tasks, in batch order.
    let mut groups: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, a) in tasks.iter().enumerate() {
        if cacheable(a) {
            groups.entry(a.plan.prefix).or_default().push(i);
        }
    }
    let mut warmups: Vec<Warmup> = tasks.iter().map(|_| Warmup::Now).collect();
    let now = Instant::now();
    for (prefix, members) in groups {
        let plan = route.warmth.plan(prefix, priority, members.len(), now);
        for (i, w) in members.into_iter().zip(plan) {
            warmups[i] = w;
        }
    }
    warmups
}

/// A rough count of the tokens a request will use (prompt text at about four
/// characters a token, plus its output limit), so a tokens-per-minute budget
/// is respected before the provider reports the real count.
pub fn estimate_tokens(request: &Value) -> u64 {
    let prompt_chars: usize = message_chars(request).sum();
    (prompt_chars as u64 / 4)
        .saturating_add(output_limit(request).unwrap_or(256))
        .saturating_add(8)
}

/// The characters of each message's content.
fn message_chars(request: &Value) -> impl Iterator<Item = usize> + '_ {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match &m["content"] {
            Value::String(s) => s.len(),
            other => other.to_string().len(),
        })
}

/// The request's output limit, when it sets one.
fn output_limit(request: &Value) -> Option<u64> {
    request["max_completion_tokens"]
        .as_u64()
        .or_else(|| request["max_tokens"].as_u64())
}

/// Upper bounds of a request's prompt and output tokens for the cost
/// estimate of a call in flight: a token per three bytes, eight framing
/// tokens a message, and the output limit (4096 when the request sets none).
pub fn bound_tokens(request: &Value) -> (u64, u64) {
    let prompt = message_chars(request)
        .map(|c| (c as u64).div_ceil(3).saturating_add(8))
        .fold(8u64, u64::saturating_add);
    (prompt, output_limit(request).unwrap_or(4096))
}

/// How one task's calls ended.
enum Ending {
    Answered(Completion),
    /// Answered by a call made for an identical request.
    Shared(Arc<SharedAnswer>),
    /// The error and the attempts to report.
    Failed(TaskError, u32),
    Expired,
}

async fn run_task(
    ctx: Arc<EngineContext>,
    route: Arc<RouteEntry>,
    batch: Arc<BatchControl>,
    mut a: Accepted,
    warmup: Warmup,
    done: Result<bool, crate::ports::SinkError>,
) {
    // Dropped on any return before the call: the followers go.
    let (mut warm_lead, mut warm_follow) = match warmup {
        Warmup::Now => (None, None),
        Warmup::Lead(lead) => (Some(lead), None),
        Warmup::Follow(done) => (None, Some(done)),
    };
    let batch_id = batch.id.clone();
    let task_id = a.task.task_id.clone();
    let Some(lease) = outcome::unless_known_done(a.lease, &task_id, done).await else {
        return;
    };
    a.lease = lease;
    let Some(mut a) = within_budget(&ctx, a).await else {
        return;
    };
    let dispatched_at = Utc::now();
    metrics::task_dispatched(
        a.task.priority,
        Duration::from_millis(elapsed_ms(a.task.created_at, dispatched_at)),
    );
    let (provider, model) = (route.route.provider.as_str(), route.route.model.as_str());
    let est_tokens = estimate_tokens(&a.plan.request);
    let deadline = a.task.deadline.and_then(|dl| {
        let left = (dl - ctx.settings.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        Instant::now().checked_add(left)
    });
    let mut waited = Duration::ZERO;
    let dedupe_key_of = |request: &Value| {
        ctx.settings
            .dedupe_window
            .map(|_| Dedupe::key(provider, request))
    };
    let mut dedupe_key = dedupe_key_of(&a.plan.request);
    // Renews this replica's claim on its call until the task is done
    // here (its outcome durable, or handed on); dropped on every return.
    let mut _claim_guard: Option<ClaimGuard> = None;
    let ending = loop {
        // A preempted batch launches no new call: its task waits here, its
        // lease heartbeated, no attempt spent, until the batch resumes.
        tokio::select! {
            () = batch.until_running() => {}
            () = sleep_until_opt(deadline) => break Ending::Expired,
            () = ctx.stopping() => return,
        }
        // The group's lead warms the provider's prompt cache first.
        if let Some(done) = warm_follow.take() {
            tokio::select! {
                () = prompt_warmth::follow(done, ctx.settings.caching.warm_wait) => {}
                () = sleep_until_opt(deadline) => break Ending::Expired,
                () = ctx.stopping() => return,
            }
        }
        // An identical request already called for: no place at the gate.
        if let Some(rx) = dedupe_key
            .as_deref()
            .and_then(|k| ctx.dedupe.follow_existing(k))
        {
            match follow_shared(&ctx, rx, deadline).await {
                Followed::Ended(ending) => break ending,
                Followed::CallAlone => {}
                Followed::Stopping => return,
            }
        }
        let mut place = Waiting::new(&route.waiting);
        let permit = tokio::select! {
            permit = route.gate.admit_in_turn(a.task.priority, est_tokens, batch.is_resumed()) => permit,
            // Preempted while waiting at the gate: leave its queue.
            () = batch.until_paused() => continue,
            () = sleep_until_opt(deadline) => break Ending::Expired,
            // Shutting down: a task still waiting for its route is handed
            // back (its lease naks on drop) rather than held to the end.
            () = ctx.stopping() => return,
            () = park_due(&ctx, &route, &mut place) => {
                match park(&ctx, &a).await {
                    Ok(()) => {
                        let _ = a.lease.ack().await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(task_id = %task_id, error = %e, "could not requeue a task of a route that is down; it keeps waiting");
                        continue;
                    }
                }
            }
        };
        drop(place);
        let lead = match dedupe_key.clone().map(|k| ctx.dedupe.join(k)) {
            None | Some(Join::Off) => None,
            Some(Join::Lead(lead)) => Some(lead),
            Some(Join::Follow(rx)) => {
                drop(permit);
                match follow_shared(&ctx, rx, deadline).await {
                    Followed::Ended(ending) => break ending,
                    Followed::CallAlone => continue,
                    Followed::Stopping => return,
                }
            }
        };
        let _call = batch.call();
        waited += permit.waited();
        let probe = permit.is_probe();
        // The claim across replicas and the ledger record, side by side.
        let (call, claim) = tokio::join!(
            start_call(&ctx, &a, model),
            call_claim::claim(&ctx, &task_id, a.task.generation)
        );
        let wait = match claim {
            ClaimCheck::Ours(guard) => {
                _claim_guard = Some(guard);
                None
            }
            ClaimCheck::Elsewhere { owner, wait } => {
                tracing::debug!(task_id = %task_id, %owner, ?wait, "call claimed by another replica; handed back");
                metrics::claimed_elsewhere();
                Some(wait)
            }
            ClaimCheck::Unknown { wait } => Some(wait),
        };
        if let Some(wait) = wait {
            // Another replica is calling for this task, or nobody can say:
            // no call, no attempt; back to JetStream for a while.
            discard_call(&ctx, call).await;
            drop(permit);
            let _ = a.lease.nak(Some(wait)).await;
            return;
        }
        let started = Instant::now();
        let timeout = call_timeout(&ctx, provider, a.plan.service_tier);
        let result = tokio::time::timeout(timeout, route.provider.complete(&a.plan.request))
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::Timeout {
                    message: format!("no answer within {timeout:?}"),
                })
            });
        let latency = started.elapsed();
        if let Some(warm) = warm_lead.take() {
            warm.finish(
                result.is_ok(),
                Instant::now(),
                ctx.settings.caching.warm_ttl,
            );
        }
        if let (Some(lead), Ok(c)) = (lead, &result) {
            lead.answer(SharedAnswer {
                call_id: call.0.call_id.clone(),
                completion: c.clone(),
            });
        }
        finish_call(&ctx, call, &result, a.price_multiplier, reference(&ctx, &a)).await;
        let error = match result {
            Ok(c) => {
                metrics::provider_request(provider, model, "ok", latency);
                let tokens = c.usage.input_tokens.saturating_add(c.usage.output_tokens);
                route.gate.report(
                    permit,
                    CallReport::Success {
                        latency,
                        limits: c.limits.clone(),
                        tokens,
                    },
                );
                break Ending::Answered(c);
            }
            Err(e) => e,
        };
        let attempts = a.attempts_before.saturating_add(1);
        let verdict = classify(&error, attempts, &ctx.settings.retry);
        metrics::provider_request(provider, model, verdict_label(verdict), latency);
        match verdict {
            Verdict::RateLimited => {
                metrics::rate_limited(provider, model);
                let limits = match &error {
                    ProviderError::RateLimited { limits, .. } => limits.clone(),
                    _ => Default::default(),
                };
                route
                    .gate
                    .report(permit, CallReport::RateLimited { limits });
                tracing::debug!(task_id = %task_id, %error, "rate limited; waiting at the route");
            }
            Verdict::RouteDown(fault) => {
                let reason = circuit_reason(fault);
                let report = route
                    .gate
                    .report(permit, CallReport::RouteFailure { reason });
                if opened(&report) && !probe {
                    tracing::error!(provider, model, reason = reason.as_str(), %error, "route circuit open: no calls until a probe succeeds; its tasks wait");
                } else if opened(&report) {
                    tracing::debug!(provider, model, reason = reason.as_str(), %error, "probe failed; route circuit open again");
                }
            }
            Verdict::FlexUnavailable => {
                // Not the route's trouble: no pause, no attempt, no bill.
                route.gate.report(permit, CallReport::Neutral);
                let to = a.plan.on_flex_refusal;
                metrics::flex_fallback(
                    provider,
                    model,
                    match to {
                        RouteKind::Realtime => "standard",
                        RouteKind::BatchApi => "batch_api",
                    },
                );
                tracing::debug!(task_id = %task_id, to = to.as_str(), "flex capacity unavailable; falling back");
                a.plan.leave_flex(to);
                if to == RouteKind::BatchApi {
                    match ctx.directory.assembler() {
                        Some(asm) => {
                            let _ = asm.cast(AssemblerMsg::Task(Box::new(a)));
                        }
                        // No assembler: the lease naks on drop.
                        None => drop(a),
                    }
                    return;
                }
                dedupe_key = dedupe_key_of(&a.plan.request);
            }
            Verdict::Permanent => {
                route.gate.report(permit, CallReport::Neutral);
                let (status, message) = match &error {
                    ProviderError::Rejected {
                        status, message, ..
                    } => (Some(*status), message.clone()),
                    other => (None, other.to_string()),
                };
                let mut e = TaskError::new(ErrorKind::ProviderRejected, message);
                e.status_code = status;
                break Ending::Failed(e, attempts);
            }
            Verdict::Retry | Verdict::Exhausted => {
                let report = route.gate.report(permit, CallReport::Transient { latency });
                if opened(&report) && !probe {
                    tracing::error!(provider, model, reason = CircuitReason::Unavailable.as_str(), %error, "route circuit open after consecutive failures: no calls until a probe succeeds; its tasks wait");
                } else if opened(&report) {
                    tracing::debug!(provider, model, %error, "probe failed; route circuit open again");
                }
                // A failure that is the route's (a probe, one that opened the
                // circuit, one landing while it is open) spends no attempt;
                // nor does one while the provider is down on another route:
                // the call goes again until this route's circuit opens too.
                if probe
                    || opened(&report)
                    || route.gate.status().circuit.is_some()
                    || ctx.routes.provider_unavailable(&route.route)
                {
                    continue;
                }
                a.attempts_before = attempts;
                if let Err(e) = ctx.ports.attempts.set(&task_id, attempts).await {
                    tracing::warn!(task_id = %task_id, error = %e, "attempt count not stored; a crash now would not count it");
                }
                if verdict == Verdict::Exhausted {
                    let status = match &error {
                        ProviderError::Transient { status, .. } => *status,
                        _ => None,
                    };
                    let mut e = TaskError::new(
                        ErrorKind::MaxRetries,
                        format!("gave up after {attempts} attempts; last error: {error}"),
                    );
                    e.status_code = status;
                    break Ending::Failed(e, attempts);
                }
                let delay = ctx.with_rng(|rng| ctx.settings.retry.delay(attempts, rng));
                tracing::debug!(task_id = %task_id, %error, ?delay, "transient failure; retry later");
                metrics::retried(retry_reason(&error));
                match ctx.directory.retry_scheduler() {
                    Some(r) => {
                        let _ = r.cast(RetryMsg::Schedule {
                            task: Box::new(a),
                            delay,
                        });
                    }
                    // No scheduler: the lease naks on drop; the attempt is stored.
                    None => drop(a),
                }
                return;
            }
        }
    };
    let processing = (Utc::now() - dispatched_at)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .saturating_sub(waited);
    let processing_ms = u64::try_from(processing.as_millis()).unwrap_or(u64::MAX);
    let spent_stored = a.attempts_before > a.task.retry_count;
    let f = match ending {
        Ending::Answered(c) => succeeded(&ctx, &a, c, provider, model, &batch_id, processing_ms),
        Ending::Shared(s) => {
            metrics::deduplicated();
            record_shared(&ctx, &a, model, &s.completion).await;
            // The call's cost is its own task's: this one spent nothing.
            let completion = Completion {
                usage: Default::default(),
                ..s.completion.clone()
            };
            let mut f = succeeded(
                &ctx,
                &a,
                completion,
                provider,
                model,
                &batch_id,
                processing_ms,
            );
            f.outcome.shared_call = true;
            f.outcome.call_id = Some(s.call_id.clone());
            f.outcome.attempts = a.attempts_before;
            f
        }
        Ending::Failed(error, attempts) => {
            // A failure never replaces an outcome that exists by now.
            let f = outcome::failed(
                &a.task,
                error,
                attempts,
                Some(model),
                Some(provider),
                Some(&batch_id),
            )
            .charge_classifier(&a);
            deliver_unless_done(&ctx, a.lease, f, &a.subject).await;
            clear_attempts(&ctx, &task_id, spent_stored).await;
            return;
        }
        Ending::Expired => {
            let error = TaskError::new(
                ErrorKind::Expired,
                "the task's deadline passed while it waited for its route",
            );
            let f = outcome::failed(&a.task, error, a.attempts_before, None, None, None)
                .charge_classifier(&a);
            deliver_unless_done(&ctx, a.lease, f, &a.subject).await;
            return;
        }
    };
    deliver(&ctx, a.lease, f, &a.subject).await;
    clear_attempts(&ctx, &task_id, spent_stored).await;
}

/// What a task that waited for a shared call does next.
enum Followed {
    Ended(Ending),
    /// The call went without an answer: this task calls for itself.
    CallAlone,
    Stopping,
}

/// Waits for the answer of a call made for an identical request.
async fn follow_shared(
    ctx: &EngineContext,
    rx: tokio::sync::watch::Receiver<Option<Arc<SharedAnswer>>>,
    deadline: Option<Instant>,
) -> Followed {
    tokio::select! {
        answer = dedupe::follow(rx) => match answer {
            Some(s) => Followed::Ended(Ending::Shared(s)),
            None => Followed::CallAlone,
        },
        () = sleep_until_opt(deadline) => Followed::Ended(Ending::Expired),
        () = ctx.stopping() => Followed::Stopping,
    }
}

/// Checks the task's tenant against its budget. Within it: the task goes on.
/// Over it, by the priority's setting: a `budget_exceeded` outcome and dead
/// letter, or a hold (the task waits up to `hold_recheck`, at most until the
/// period ends, then is requeued at the back of its queue if still over;
/// no attempt is spent). `None` when the task went no further.
pub(crate) async fn within_budget(ctx: &EngineContext, a: Accepted) -> Option<Accepted> {
    let budgets = &ctx.settings.budgets;
    if budgets.is_unlimited() {
        return Some(a);
    }
    tokio::select! {
        () = ctx.spend.loaded() => {}
        // Shutting down: the lease naks on drop; the task comes back.
        () = ctx.stopping() => return None,
    }
    let verdict = || budgets.check(&a.task.tenant, a.task.priority, &ctx.spend, ctx.clock.now());
    let BudgetVerdict::Exceeded {
        period,
        spent_usd,
        limit_usd,
        resets_at,
        action,
    } = verdict()
    else {
        return Some(a);
    };
    match action {
        OnExceeded::Reject => {
            let error = TaskError::new(
                ErrorKind::BudgetExceeded,
                format!(
                    "tenant {} spent {spent_usd:.6} USD of its {} budget of {limit_usd} USD; it resets at {}",
                    crate::codec::quote(&a.task.tenant),
                    period.as_str(),
                    timestamp(resets_at)
                ),
            );
            let f = outcome::failed(&a.task, error, a.attempts_before, None, None, None)
                .charge_classifier(&a);
            deliver_unless_done(ctx, a.lease, f, &a.subject).await;
            None
        }
        OnExceeded::Hold => {
            let until_reset = (resets_at - ctx.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            let wait = budgets.hold_recheck.min(until_reset);
            tracing::debug!(task_id = %a.task.task_id, tenant = %a.task.tenant, period = period.as_str(), ?wait, "budget spent; holding the task");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // Shutting down: the lease naks on drop; the task comes back.
                () = ctx.stopping() => return None,
            }
            if matches!(verdict(), BudgetVerdict::Within) {
                return Some(a);
            }
            match park(ctx, &a).await {
                Ok(()) => {
                    let _ = a.lease.ack().await;
                }
                Err(e) => {
                    tracing::warn!(task_id = %a.task.task_id, error = %e, "could not requeue a held task; it is handed back");
                }
            }
            None
        }
    }
}

/// A request's ledger record, and whether its start is stored.
pub(crate) type Call = (CallRecord, bool);

/// Records a request as started, with its estimated cost, before it goes
/// out. A store that fails does not stop the call: its final record is
/// written all the same.
async fn start_call(ctx: &EngineContext, a: &Accepted, model: &str) -> Call {
    let call_id = new_call_id(
        &a.task.task_id,
        a.task.generation,
        a.attempts_before.saturating_add(1),
    );
    record_start(
        ctx,
        &a.task,
        call_id,
        model,
        &a.plan.request,
        a.plan.service_tier,
    )
    .await
}

/// Records the request `request` of `task` as started under `call_id`
/// (see [`start_call`]); also used for the tier classifier's calls.
pub(crate) async fn record_start(
    ctx: &EngineContext,
    task: &crate::task::Task,
    call_id: String,
    model: &str,
    request: &Value,
    service_tier: ServiceTier,
) -> Call {
    let now = ctx.clock.now();
    let (prompt, output) = bound_tokens(request);
    let estimate = ctx
        .settings
        .prices
        .tier_estimate_picousd(model, prompt, output, service_tier)
        .unwrap_or(0);
    let mut record = CallRecord::started(
        &task.task_id,
        call_id,
        &task.tenant,
        model,
        task.priority.number(),
        now,
        estimate,
    );
    record.service_tier = service_tier;
    match ctx.calls.record(record.clone()).await {
        Ok(()) => (record, true),
        Err(e) => {
            tracing::warn!(call_id = %record.call_id, error = %e, "request not recorded as started; a crash now would leave it out of the ledger");
            (record, false)
        }
    }
}

/// Records a request that did not go out, or that the provider refused,
/// as not billed (nothing to say when its start was never stored).
async fn discard_call(ctx: &EngineContext, (mut record, started): Call) {
    if !started {
        return;
    }
    record.state = CallState::Refused;
    if let Err(e) = ctx.calls.record(record.clone()).await {
        tracing::warn!(call_id = %record.call_id, error = %e, "request that was not billed not recorded as such; it will be counted at its estimate");
    }
}

/// Records how a request ended: answered (exact usage and cost), no answer
/// in time (counted at its estimate: the provider may have billed it), or
/// refused (not billed). Returns the exact cost of an answered call (0
/// for any other).
pub(crate) async fn finish_call(
    ctx: &EngineContext,
    (mut record, started): Call,
    result: &Result<Completion, ProviderError>,
    price_multiplier: f64,
    reference: Option<&str>,
) -> crate::pricing::Picousd {
    match result {
        Ok(c) => {
            record.service_tier = c.service_tier.unwrap_or(record.service_tier);
            let prices = &ctx.settings.prices;
            let terms = terms(&record, price_multiplier);
            let cost = prices
                .call_cost_picousd(&record.model, &c.usage, terms)
                .unwrap_or(0);
            record.finish(c.usage, cost, ctx.clock.now());
            record.tiering_saved_picousd =
                prices.saving_against(reference, &record.model, &c.usage, terms, cost);
        }
        Err(ProviderError::Timeout { .. }) => record.estimate(),
        Err(_) => {
            discard_call(ctx, (record, started)).await;
            return 0;
        }
    }
    if let Err(e) = ctx.calls.record(record.clone()).await {
        tracing::warn!(call_id = %record.call_id, error = %e, "request not recorded as finished; it counts at its estimate");
    }
    match record.state {
        CallState::Finished => record.cost_picousd,
        _ => 0,
    }
}

/// The pricing terms of a call, as its record says it was sent and served.
fn terms(record: &CallRecord, multiplier: f64) -> Terms {
    Terms {
        route: record.route,
        tier: record.service_tier,
        multiplier,
    }
}

/// The model tiering chose against (the complex tier's) when the task's
/// model was picked by tier; `None` when the task named its model.
fn reference<'a>(ctx: &'a EngineContext, a: &Accepted) -> Option<&'a str> {
    a.plan
        .tier
        .as_ref()
        .map(|_| ctx.settings.catalog.tiers.complex.as_str())
}

/// Records in the ledger a task answered from another task's call: no
/// spend, that call's cost saved by dedupe.
async fn record_shared(ctx: &EngineContext, a: &Accepted, model: &str, completion: &Completion) {
    let now = ctx.clock.now();
    let call_id = new_call_id(&a.task.task_id, a.task.generation, a.attempts_before);
    let mut record = CallRecord::started(
        &a.task.task_id,
        call_id,
        &a.task.tenant,
        model,
        a.task.priority.number(),
        now,
        0,
    );
    record.service_tier = completion.service_tier.unwrap_or(a.plan.service_tier);
    let saved = ctx
        .settings
        .prices
        .call_cost_picousd(model, &completion.usage, terms(&record, a.price_multiplier))
        .unwrap_or(0);
    let record = record.shared(saved, now);
    if let Err(e) = ctx.calls.record(record.clone()).await {
        tracing::debug!(call_id = %record.call_id, error = %e, "shared answer not recorded in the ledger; its saving is not counted");
    }
}

/// Forgets the attempts of a finished task that had stored some.
async fn clear_attempts(ctx: &EngineContext, task_id: &str, stored: bool) {
    if !stored {
        return;
    }
    if let Err(e) = ctx.ports.attempts.clear(task_id).await {
        tracing::debug!(task_id = %task_id, error = %e, "attempt count not cleared; it expires on its own");
    }
}

/// The `reason` label of a retry: what kind of transient failure it was.
fn retry_reason(error: &ProviderError) -> &'static str {
    match error {
        ProviderError::Timeout { .. }
        | ProviderError::Transient {
            status: Some(408), ..
        } => "timeout",
        ProviderError::Transient {
            status: Some(409), ..
        } => "conflict",
        ProviderError::Transient {
            status: Some(_), ..
        } => "server_error",
        _ => "connection",
    }
}

fn opened(report: &Report) -> bool {
    matches!(report.circuit_changed, Some(CircuitState::Open { .. }))
}

/// Resolves when this task should leave a route whose circuit is open: it
/// has waited `park_after` and more than `park_keep` tasks wait with it.
/// Those few stay for the probe and the first calls after it; the rest go
/// back to the end of their queue, so the messages in flight
/// (`max_ack_pending`) keep flowing to healthy routes.
async fn park_due(ctx: &EngineContext, route: &RouteEntry, place: &mut Waiting<'_>) {
    loop {
        tokio::time::sleep(ctx.settings.park_after).await;
        if route.gate.status().circuit.is_some() && place.leave_if_more_than(ctx.settings.park_keep)
        {
            return;
        }
    }
}

/// Publishes the task's message again at the back of its queue.
async fn park(ctx: &EngineContext, a: &Accepted) -> Result<(), crate::ports::SourceError> {
    ctx.ports
        .source
        .requeue(Requeue {
            subject: a.subject.clone(),
            body: a.body.clone(),
            content_type: a.content_type.clone(),
            generation: a.task.generation,
            published_at: a.published_at,
            route: None,
        })
        .await?;
    tracing::debug!(task_id = %a.task.task_id, "route down: requeued at the back of its queue");
    metrics::parked();
    Ok(())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn circuit_reason(fault: RouteFault) -> CircuitReason {
    match fault {
        RouteFault::Unauthorized => CircuitReason::Unauthorized,
        RouteFault::ModelNotFound => CircuitReason::ModelNotFound,
        RouteFault::QuotaExhausted => CircuitReason::QuotaExhausted,
    }
}

pub(crate) fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::RateLimited => "rate_limited",
        Verdict::RouteDown(_) => "route_down",
        Verdict::Permanent => "rejected",
        Verdict::Retry | Verdict::Exhausted => "transient",
        Verdict::FlexUnavailable => "flex_unavailable",
    }
}

/// How long a call at `tier` may take: the provider's `flex_timeout_secs`
/// for flex, else the request timeout.
fn call_timeout(ctx: &EngineContext, provider: &str, tier: ServiceTier) -> Duration {
    match (tier, ctx.settings.catalog.service_tiers.get(provider)) {
        (ServiceTier::Flex, Some(o)) => o.flex_timeout,
        _ => ctx.settings.request_timeout,
    }
}

fn succeeded(
    ctx: &EngineContext,
    a: &Accepted,
    c: Completion,
    provider: &str,
    model: &str,
    batch_id: &str,
    processing_ms: u64,
) -> Final {
    let now = Utc::now();
    let task = &a.task;
    // The same figure as the call's ledger record (see `finish_call`).
    let service_tier = c.service_tier.unwrap_or(a.plan.service_tier);
    let cost = ctx
        .settings
        .prices
        .tier_cost_picousd(model, &c.usage, RouteKind::Realtime, service_tier)
        .map_or(0, |cost| crate::pricing::scale(cost, a.price_multiplier));
    let call_usd = crate::pricing::usd(cost);
    metrics::spent(model, &task.tenant, task.priority, call_usd, &c.usage);
    // The classifier's call for the task is the task's too.
    let classifier = outcome::classifier_picousd(a.plan.tier.as_ref());
    let cost_usd = crate::pricing::usd(cost.saturating_add(classifier));
    let saved = ctx
        .settings
        .prices
        .cache_saving_picousd(model, &c.usage, RouteKind::Realtime);
    metrics::prompt_cache(
        provider,
        model,
        &c.usage,
        crate::pricing::usd(crate::pricing::scale(saved, a.price_multiplier)),
    );
    let total_ms = elapsed_ms(task.created_at, now);
    Final {
        outcome: Outcome {
            task_id: task.task_id.clone(),
            status: Status::Succeeded,
            output: c.output,
            finish_reason: c.finish_reason,
            error: None,
            model: Some(model.to_owned()),
            provider: Some(provider.to_owned()),
            route: Some(RouteKind::Realtime),
            service_tier: Some(service_tier),
            tier: a.plan.tier.as_ref().map(|c| c.tier),
            tier_reason: a.plan.tier.as_ref().map(|c| c.reason.clone()),
            classifier_cost_usd: outcome::classifier_usd(classifier),
            shared_call: false,
            call_id: None,
            usage: c.usage,
            cost_usd,
            attempts: a.attempts_before.saturating_add(1),
            batch_id: Some(batch_id.to_owned()),
            priority: task.priority.number(),
            tenant: task.tenant.clone(),
            timings: Timings {
                queued_ms: total_ms.saturating_sub(processing_ms),
                processing_ms,
                total_ms,
            },
            metadata: task.metadata.clone(),
            generation: task.generation,
            completed_at: timestamp(now),
        },
        dead_letter: None,
        encoding: task.encoding,
        reply_to: task.reply_to.clone(),
        created_at: task.created_at,
    }
}
