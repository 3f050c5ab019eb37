//! # Intake
//!
//! Owns the task consumers, one per priority: a pump task per consumer feeds
//! deliveries into this actor, which decodes and validates each one, routes
//! it, and hands valid tasks to the Assembler. Invalid tasks get a failed
//! `invalid_request` outcome and a dead letter; tasks out of attempts get
//! `max_retries`; tasks past their deadline get `expired` (both only when no
//! outcome exists yet). Work of a priority that waits for off-peak windows
//! ([`crate::offpeak`]) is handed back to JetStream, with a nak delayed
//! until the next window opens, unless its deadline can't wait. A redelivered message reads the attempts its task
//! spent from the attempt store; a first delivery never does. An `auto`
//! task that only prompt size would tier is labelled by the tier classifier
//! first, when it is enabled ([`crate::classifier`]); both wait in a task of
//! their own, never in the actor. A copy of a
//! task already in flight is handed back without a verdict of its own.
//!
//! Receives: [`IntakeMsg`]. Sends: tasks to the Assembler, outcomes to the sink.
//!
//! On restart: the pumps die with the old state (their pulled messages are
//! naked on drop) and the new incarnation opens the consumers again.
//! JetStream redelivers everything unacked, so nothing is lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::classifier;
use crate::codec::{decode_task, Inbound};
use crate::context::EngineContext;
use crate::messages::{Accepted, AssemblerMsg, IntakeMsg};
use crate::metrics;
use crate::offpeak::Release;
use crate::outcome::{self, deliver, Final};
use crate::ports::Delivery;
use crate::route_policy::RoutePreference;
use crate::routing::{plan, plan_with, TierChoice, REASON_CLASSIFIER};
use crate::task::{ErrorKind, Priority, RouteKind, TaskError};

/// The Intake actor.
pub struct Intake;

/// Background tasks owned by one incarnation; aborted when it goes away.
pub struct Pumps(Vec<JoinHandle<()>>);

impl Drop for Pumps {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// The Intake's state.
pub struct IntakeState {
    ctx: Arc<EngineContext>,
    pumps: Pumps,
}

impl Actor for Intake {
    type Msg = IntakeMsg;
    type State = IntakeState;
    type Arguments = Arc<EngineContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<IntakeMsg>,
        ctx: Arc<EngineContext>,
    ) -> Result<IntakeState, ActorProcessingErr> {
        let mut handles = Vec::new();
        for p in Priority::ALL {
            handles.push(tokio::spawn(pump(ctx.clone(), myself.clone(), p)));
        }
        handles.push(tokio::spawn(sample_backlog(ctx.clone())));
        Ok(IntakeState {
            ctx,
            pumps: Pumps(handles),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<IntakeMsg>,
        msg: IntakeMsg,
        state: &mut IntakeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            IntakeMsg::Delivered(d) => take(&state.ctx, d),
            IntakeMsg::StopPulling(reply) => {
                state.pumps = Pumps(Vec::new());
                let _ = reply.send(());
            }
            IntakeMsg::InjectFault => panic!("fault injected into the intake"),
        }
        Ok(())
    }
}

/// Pulls one priority's consumer into the actor until the actor is gone.
async fn pump(ctx: Arc<EngineContext>, intake: ActorRef<IntakeMsg>, p: Priority) {
    let mut wait = Duration::from_millis(100);
    loop {
        match ctx.ports.source.open(p).await {
            Ok(mut stream) => {
                wait = Duration::from_millis(100);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(d) => {
                            if intake
                                .cast(IntakeMsg::Delivered(d.lease(&ctx.keeper)))
                                .is_err()
                            {
                                return; // actor gone; the message is naked on drop
                            }
                        }
                        Err(e) => tracing::warn!(priority = p.number(), error = %e, "pull failed"),
                    }
                }
                tracing::warn!(priority = p.number(), "consumer stream ended; reopening");
            }
            Err(e) => {
                tracing::warn!(priority = p.number(), error = %e, "opening consumer failed; retrying")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

async fn sample_backlog(ctx: Arc<EngineContext>) {
    let mut tick = tokio::time::interval(ctx.settings.backlog_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for p in Priority::ALL {
            match ctx.ports.source.backlog(p).await {
                Ok(b) => {
                    ctx.depths.set(p, b.depth);
                    metrics::backlog(p, b.depth, b.oldest_age);
                    let ratio = {
                        let mut targets = ctx.targets.lock();
                        targets.waiting(p, b.oldest_age);
                        targets.ratio(p, tokio::time::Instant::now())
                    };
                    metrics::priority_target_ratio(p, ratio);
                }
                Err(e) => tracing::debug!(error = %e, "backlog sample failed"),
            }
        }
    }
}

/// Validates and routes one delivery; never blocks the actor on I/O.
fn take(ctx: &Arc<EngineContext>, d: Delivery) {
    if d.is_first() {
        metrics::task_received(d.priority);
    }
    let inbound = Inbound {
        priority: d.priority,
        content_type: d.content_type.as_deref(),
        body: &d.body,
        published_at: d.published_at,
        max_payload_bytes: ctx.settings.max_payload_bytes,
        generation: d.generation,
        reply_to: &ctx.settings.reply_to,
    };
    let task = match decode_task(inbound) {
        // A copy the engine requeued for realtime (its batch job outlasted
        // its patience) goes realtime whatever the task asked.
        Ok(mut t) if d.route == Some(RouteKind::Realtime) => {
            t.route = Some(RoutePreference::Realtime);
            t
        }
        Ok(t) => t,
        Err(rejection) => {
            tracing::info!(subject = %d.subject, reason = %rejection.message, "invalid task");
            let f = outcome::rejected(&d, *rejection);
            finish(ctx, d, f);
            return;
        }
    };
    let plan = match plan(&task, &ctx.settings.catalog, ctx.settings.clock.now()) {
        Ok(plan) => plan,
        Err(message) => {
            // A task that can't be routed now may have been routed and
            // answered under an earlier config: that outcome is kept.
            let error = TaskError::new(ErrorKind::InvalidRequest, message);
            let f = outcome::failed(&task, error, task.retry_count, None, None, None);
            let ctx = ctx.clone();
            tokio::spawn(async move {
                outcome::deliver_unless_done(&ctx, d.hold, f, &d.subject).await;
            });
            return;
        }
    };
    // One copy of a task at a time: a second one waits until the first is
    // settled, then finds its outcome and is acked without another call.
    let Some(claim) = ctx.claims.claim(&task.task_id) else {
        tracing::debug!(task_id = %task.task_id, "another copy is in flight; handed back");
        let lease = d.hold;
        tokio::spawn(async move {
            let _ = lease.nak(Some(Duration::from_secs(1))).await;
        });
        return;
    };
    let first = d.is_first();
    let accepted = Accepted {
        attempts_before: task.retry_count,
        task,
        plan,
        lease: d.hold,
        claim,
        subject: d.subject,
        body: d.body,
        content_type: d.content_type,
        published_at: d.published_at,
        drained: d.pending == Some(0),
        price_multiplier: 1.0,
    };
    if first {
        admit(ctx, accepted);
        return;
    }
    // A redelivered or requeued message: the attempts its task spent before
    // are in the store.
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut accepted = accepted;
        match ctx.ports.attempts.get(&accepted.task.task_id).await {
            Ok(spent) => {
                accepted.attempts_before = accepted.task.retry_count.saturating_add(spent);
                admit(&ctx, accepted);
            }
            Err(e) => {
                tracing::warn!(task_id = %accepted.task.task_id, error = %e, "attempts unreadable; handed back");
                let _ = accepted.lease.nak(Some(Duration::from_secs(1))).await;
            }
        }
    });
}

/// Asks the tier classifier for a task whose plan awaits it (unless its
/// tenant's budget is spent: the Dispatcher holds or fails it) and routes
/// it to the tier named; with no verdict, the prompt-size plan stands. The
/// call's cost is the task's.
async fn classify(ctx: &EngineContext, a: &mut Accepted) {
    let Some(prompt) = a.plan.classify.take() else {
        return;
    };
    if over_budget(ctx, a).await {
        tracing::debug!(task_id = %a.task.task_id, "budget spent: no classifier call; prompt size decides");
        return;
    }
    let verdict = classifier::classify(ctx, &a.task, &prompt).await;
    let replanned = verdict.tier.map(|tier| {
        let decided = TierChoice {
            tier,
            reason: REASON_CLASSIFIER.to_owned(),
            classifier_picousd: verdict.cost,
        };
        plan_with(
            &a.task,
            &ctx.settings.catalog,
            ctx.settings.clock.now(),
            Some(decided),
        )
    });
    match replanned {
        Some(Ok(plan)) => a.plan = plan,
        other => {
            if let Some(Err(message)) = other {
                // The tier's model was routable at the first plan; should
                // that change, prompt size keeps the task going.
                tracing::warn!(task_id = %a.task.task_id, %message, "the classifier's tier cannot be routed; prompt size decides");
            }
            if let Some(choice) = a.plan.tier.as_mut() {
                choice.classifier_picousd = verdict.cost;
            }
        }
    }
}

/// Hands a valid task to the Assembler (an `auto` task awaiting the tier
/// classifier once it is labelled, in a task of its own), or finishes it
/// when it has no attempts left or its deadline has passed, or hands it back
/// to JetStream until its off-peak window opens. Tasks that go no further
/// make no classifier call.
fn admit(ctx: &Arc<EngineContext>, mut a: Accepted) {
    let now = ctx.settings.clock.now();
    let verdict = if ctx.settings.retry.exhausted(a.attempts_before) {
        Some(TaskError::new(
            ErrorKind::MaxRetries,
            format!("no attempts left after {}", a.attempts_before),
        ))
    } else if a.task.deadline.is_some_and(|dl| dl <= now) {
        Some(TaskError::new(
            ErrorKind::Expired,
            "the task's deadline passed before it could be sent",
        ))
    } else {
        None
    };
    if let Some(error) = verdict {
        outcome::fail_accepted(ctx, a, error);
        return;
    }
    match ctx
        .settings
        .offpeak
        .release(a.task.priority, a.task.deadline, now)
    {
        Release::Now { price_multiplier } => a.price_multiplier = price_multiplier,
        Release::Urgent => {
            tracing::debug!(task_id = %a.task.task_id, "off-peak window closed, but the deadline can't wait: released");
        }
        Release::Hold(wait) => {
            tracing::debug!(task_id = %a.task.task_id, ?wait, "off-peak work: back to JetStream until the window opens");
            tokio::spawn(async move {
                if let Err(e) = a.lease.nak(Some(wait)).await {
                    tracing::warn!(task_id = %a.task.task_id, error = %e, "handing back off-peak work failed; ack_wait redelivers it");
                }
                drop(a.claim);
            });
            return;
        }
    }
    if a.plan.classify.is_some() {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            classify(&ctx, &mut a).await;
            hand_over(&ctx, a);
        });
        return;
    }
    hand_over(ctx, a);
}

/// True when the task's tenant has spent a budget (by the ledger's figures
/// loaded so far).
async fn over_budget(ctx: &EngineContext, a: &Accepted) -> bool {
    let budgets = &ctx.settings.budgets;
    if budgets.is_unlimited() {
        return false;
    }
    tokio::select! {
        () = ctx.spend.loaded() => {}
        // Shutting down: no call; the task's lease naks on drop.
        () = ctx.stopping() => return true,
    }
    let verdict = budgets.check(&a.task.tenant, a.task.priority, &ctx.spend, ctx.clock.now());
    !matches!(verdict, crate::budgets::Verdict::Within)
}

/// Hands a task to the Assembler.
fn hand_over(ctx: &EngineContext, a: Accepted) {
    match ctx.directory.assembler() {
        // On a failed send the message (and its lease) is dropped: naked, redelivered.
        Some(assembler) => {
            let _ = assembler.cast(AssemblerMsg::Task(Box::new(a)));
        }
        None => drop(a),
    }
}

fn finish(ctx: &Arc<EngineContext>, d: Delivery, f: Final) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        deliver(&ctx, d.hold, f, &d.subject).await;
    });
}
