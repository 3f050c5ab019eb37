//! # Dispatcher
//!
//! Owns the provider routes: per (provider, model) a concurrency limit and a
//! rate-limit budget. Each sealed batch is driven by its own task; each task
//! in it is handled on its own, so one bad task never fails a batch:
//!
//! - an outcome already in the results stream → ack and skip (no double billing);
//! - success → outcome with usage and cost, then ack;
//! - 429 → pause the route for Retry-After and try again in place;
//! - 5xx / timeout / connection error → hand back to JetStream with backoff,
//!   or `max_retries` + dead letter once attempts are spent;
//! - other 4xx → `provider_rejected` + dead letter.
//!
//! Receives: [`DispatcherMsg`]. Sends: outcomes and dead letters to the sink.
//!
//! On restart: batches already running finish on their own tasks; routes are
//! rebuilt lazily. Nothing is lost: every task's lease is still held by the
//! task driving it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::context::EngineContext;
use crate::messages::{Accepted, Batch, DispatcherMsg};
use crate::metrics;
use crate::outcome::{self, deliver, elapsed_ms, Final};
use crate::ports::{Completion, Provider, ProviderError};
use crate::ratelimit::RouteBudget;
use crate::routing::Route;
use crate::task::{timestamp, ErrorKind, Outcome, Priority, RouteKind, Status, TaskError, Timings};

/// The Dispatcher actor.
pub struct Dispatcher;

/// One route's limits.
pub struct RouteState {
    route: Route,
    provider: Arc<dyn Provider>,
    permits: Semaphore,
    /// Permits priorities 2 and 3 must hold first: the route's concurrency
    /// minus the share reserved for priority 1.
    shared: Semaphore,
    budget: Mutex<RouteBudget>,
    /// Set by a 429, cleared by a success: while set, one request at a time
    /// probes the route instead of a burst of `route_concurrency`.
    throttled: AtomicBool,
    probe: tokio::sync::Mutex<()>,
}

impl RouteState {
    fn resume_at(&self) -> Option<Instant> {
        let budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.resume_at(Instant::now())
    }

    fn pause(&self, wait: Duration) {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.pause(Instant::now(), wait);
    }
}

/// The Dispatcher's state.
pub struct DispatcherState {
    ctx: Arc<EngineContext>,
    routes: HashMap<Route, Arc<RouteState>>,
    in_flight: Arc<Mutex<HashSet<String>>>,
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
        Ok(DispatcherState {
            ctx,
            routes: HashMap::new(),
            in_flight: Arc::default(),
        })
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

impl DispatcherState {
    fn route(&mut self, route: &Route) -> Option<Arc<RouteState>> {
        if let Some(r) = self.routes.get(route) {
            return Some(r.clone());
        }
        let provider = self.ctx.ports.providers.get(&route.provider)?.clone();
        let state = Arc::new(RouteState {
            route: route.clone(),
            provider,
            permits: Semaphore::new(self.ctx.settings.route_concurrency.max(1)),
            shared: Semaphore::new(
                self.ctx
                    .settings
                    .route_concurrency
                    .saturating_sub(self.ctx.settings.p1_reserved)
                    .max(1),
            ),
            budget: Mutex::new(RouteBudget::default()),
            throttled: AtomicBool::new(false),
            probe: tokio::sync::Mutex::new(()),
        });
        self.routes.insert(route.clone(), state.clone());
        Some(state)
    }

    fn dispatch(&mut self, batch: Batch) {
        let priority = batch.key.priority;
        metrics::batch_sealed(
            priority,
            RouteKind::Realtime,
            batch.tasks.len(),
            batch.fill_ratio,
        );
        let Some(route) = self.route(&batch.key.route) else {
            // Routing only produces configured providers; reaching here is a wiring bug.
            tracing::error!(provider = %batch.key.route.provider, "no such provider; tasks handed back");
            return;
        };
        let ctx = self.ctx.clone();
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            let batch_id = Arc::<str>::from(batch.id);
            let work = batch.tasks.into_iter().map(|a| {
                run_task(
                    ctx.clone(),
                    route.clone(),
                    in_flight.clone(),
                    batch_id.clone(),
                    a,
                )
            });
            futures::future::join_all(work).await;
        });
    }
}

/// Removes a task id from the in-flight set when the task is done, however it ends.
struct InFlightGuard {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.id);
    }
}

async fn run_task(
    ctx: Arc<EngineContext>,
    route: Arc<RouteState>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    batch_id: Arc<str>,
    a: Accepted,
) {
    let task_id = a.task.task_id.clone();
    // A second copy of a task already in flight waits for the first to finish.
    let newly_inserted = {
        let mut set = in_flight.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(task_id.clone())
    };
    if !newly_inserted {
        let _ = a.lease.nak(Some(Duration::from_secs(1))).await;
        return;
    }
    let _guard = InFlightGuard {
        set: in_flight,
        id: task_id.clone(),
    };
    match ctx.ports.sink.outcome_exists(&task_id).await {
        Ok(true) => {
            tracing::debug!(task_id = %task_id, "outcome already published; skipping");
            let _ = a.lease.ack().await;
            return;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(task_id = %task_id, error = %e, "could not check for an existing outcome; handing back");
            let _ = a.lease.nak(Some(Duration::from_secs(1))).await;
            return;
        }
    }
    let attempts = a.attempts_before.saturating_add(1);
    let dispatched_at = Utc::now();
    metrics::task_dispatched(
        a.task.priority,
        Duration::from_millis(elapsed_ms(a.task.created_at, dispatched_at)),
    );
    let patience = Instant::now() + ctx.settings.rate_limit_patience;
    let mut started;
    let result = loop {
        let result = {
            let _shared = if a.task.priority == Priority::P1 {
                None
            } else {
                match route.shared.acquire().await {
                    Ok(p) => Some(p),
                    Err(_) => return, // closed: shutting down; the lease naks on drop
                }
            };
            let Ok(_permit) = route.permits.acquire().await else {
                return;
            };
            // Checked with the permit held, so a pause that began while this
            // task queued is honoured and at most `route_concurrency` requests
            // go out when it ends.
            while let Some(at) = route.resume_at() {
                tokio::time::sleep_until(at).await;
            }
            let _probe = if route.throttled.load(Ordering::Acquire) {
                let guard = route.probe.lock().await;
                while let Some(at) = route.resume_at() {
                    tokio::time::sleep_until(at).await;
                }
                Some(guard)
            } else {
                None
            };
            started = Instant::now();
            tokio::time::timeout(
                ctx.settings.request_timeout,
                route.provider.complete(&a.plan.request),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::Transient {
                    status: None,
                    message: format!("no answer within {:?}", ctx.settings.request_timeout),
                })
            })
        };
        let (provider, model) = (&route.route.provider, &route.route.model);
        let label = match &result {
            Ok(_) => "ok",
            Err(ProviderError::RateLimited { .. }) => "rate_limited",
            Err(ProviderError::Transient { .. }) => "transient",
            Err(ProviderError::Rejected { .. }) => "rejected",
        };
        metrics::provider_request(provider, model, label, started.elapsed());
        match result {
            Err(ProviderError::RateLimited {
                retry_after,
                message,
            }) => {
                metrics::rate_limited(provider, model);
                let wait = retry_after.min(ctx.settings.max_retry_after);
                route.pause(wait);
                route.throttled.store(true, Ordering::Release);
                metrics::route_paused(provider, model, true);
                if Instant::now() + wait > patience {
                    tracing::info!(task_id = %task_id, %message, "still rate limited; handing back");
                    metrics::retried("rate_limited");
                    let _ = a.lease.nak(Some(wait)).await;
                    return;
                }
            }
            other => {
                if other.is_ok() && route.throttled.swap(false, Ordering::AcqRel) {
                    metrics::route_paused(provider, model, false);
                }
                break other;
            }
        }
    };
    let processing_ms = elapsed_ms(dispatched_at, Utc::now());
    let (provider, model) = (route.route.provider.as_str(), route.route.model.as_str());
    let f = match result {
        Ok(completion) => succeeded(
            &ctx,
            &a,
            completion,
            attempts,
            provider,
            model,
            &batch_id,
            processing_ms,
        ),
        Err(ProviderError::Rejected { status, message }) => {
            let mut error = TaskError::new(ErrorKind::ProviderRejected, message);
            error.status_code = Some(status);
            outcome::failed(
                &a.task,
                error,
                attempts,
                Some(model),
                Some(provider),
                Some(&batch_id),
            )
        }
        Err(e) => {
            let status = match &e {
                ProviderError::Transient { status, .. } => *status,
                _ => None,
            };
            if ctx.settings.retry.exhausted(attempts) {
                let mut error = TaskError::new(
                    ErrorKind::MaxRetries,
                    format!("gave up after {attempts} attempts; last error: {e}"),
                );
                error.status_code = status;
                outcome::failed(
                    &a.task,
                    error,
                    attempts,
                    Some(model),
                    Some(provider),
                    Some(&batch_id),
                )
            } else {
                let delay = ctx.with_rng(|rng| ctx.settings.retry.delay(attempts, rng));
                tracing::debug!(task_id = %task_id, error = %e, ?delay, "transient failure; redelivery later");
                metrics::retried("transient");
                let _ = a.lease.nak(Some(delay)).await;
                return;
            }
        }
    };
    deliver(&ctx, a.lease, f, &a.subject).await;
}

#[allow(clippy::too_many_arguments)]
fn succeeded(
    ctx: &EngineContext,
    a: &Accepted,
    c: Completion,
    attempts: u32,
    provider: &str,
    model: &str,
    batch_id: &str,
    processing_ms: u64,
) -> Final {
    let now = Utc::now();
    let task = &a.task;
    let cost_usd = ctx
        .settings
        .prices
        .cost(model, &c.usage, RouteKind::Realtime)
        .unwrap_or(0.0);
    metrics::spent(model, &task.tenant, task.priority, cost_usd, &c.usage);
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
            usage: c.usage,
            cost_usd,
            attempts,
            batch_id: Some(batch_id.to_owned()),
            priority: task.priority.number(),
            tenant: task.tenant.clone(),
            timings: Timings {
                queued_ms: total_ms.saturating_sub(processing_ms),
                processing_ms,
                total_ms,
            },
            metadata: task.metadata.clone(),
            completed_at: timestamp(now),
        },
        dead_letter: None,
        encoding: task.encoding,
        reply_to: task.reply_to.clone(),
        created_at: task.created_at,
    }
}
