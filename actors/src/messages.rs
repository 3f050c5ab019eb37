//! Every message the actors exchange.

use std::time::Duration;

use ractor::RpcReplyPort;

use crate::batching::BatchKey;
use crate::context::Claim;
use crate::lease::Lease;
use crate::ledger::{CallSheet, DayTotals};
use crate::ports::Delivery;
use crate::routing::Plan;
use crate::task::Task;

/// Which actor (for restarts, metrics and fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    /// Pulls and validates tasks.
    Intake,
    /// Groups tasks into batches.
    Assembler,
    /// Sends batches to providers.
    Dispatcher,
    /// Holds tasks waiting to be tried again.
    RetryScheduler,
    /// Keeps the ledger of spend.
    CostAccountant,
    /// Preempts bulk batches for priority 1.
    PreemptionMonitor,
}

impl ActorKind {
    /// How many kinds there are.
    pub const COUNT: usize = 6;

    /// Every kind, in start order: each finds the ones it sends to running.
    pub const ALL: [ActorKind; ActorKind::COUNT] = [
        ActorKind::CostAccountant,
        ActorKind::Dispatcher,
        ActorKind::PreemptionMonitor,
        ActorKind::RetryScheduler,
        ActorKind::Assembler,
        ActorKind::Intake,
    ];

    /// The `actor` metric label and actor name.
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::Intake => "intake",
            ActorKind::Assembler => "assembler",
            ActorKind::Dispatcher => "dispatcher",
            ActorKind::RetryScheduler => "retry_scheduler",
            ActorKind::CostAccountant => "cost_accountant",
            ActorKind::PreemptionMonitor => "preemption_monitor",
        }
    }

    /// A dense index, for tables.
    pub fn index(self) -> usize {
        match self {
            ActorKind::Dispatcher => 0,
            ActorKind::RetryScheduler => 1,
            ActorKind::Assembler => 2,
            ActorKind::Intake => 3,
            ActorKind::CostAccountant => 4,
            ActorKind::PreemptionMonitor => 5,
        }
    }
}

/// A valid, routed task and its hold on the JetStream message.
#[derive(Debug)]
pub struct Accepted {
    /// The task.
    pub task: Task,
    /// Where it goes and what is sent.
    pub plan: Plan,
    /// Attempts spent so far (the producer's `retry_count` plus provider
    /// calls that failed transiently, durable in the attempt store).
    pub attempts_before: u32,
    /// The hold on its message.
    pub lease: Lease,
    /// The engine's claim on its task id while it is in flight.
    pub claim: Claim,
    /// The subject it arrived on (recorded in dead letters).
    pub subject: String,
    /// The message as it arrived, to requeue it unchanged.
    pub body: bytes::Bytes,
    /// Its `Content-Type`.
    pub content_type: Option<String>,
    /// When it was first published.
    pub published_at: chrono::DateTime<chrono::Utc>,
    /// True when its consumer had nothing more waiting when it was delivered.
    pub drained: bool,
    /// Multiplier on its cost: the off-peak price when it was released
    /// inside an off-peak window, else 1.0.
    pub price_multiplier: f64,
}

/// A sealed batch.
#[derive(Debug)]
pub struct Batch {
    /// `b_<ULID>`.
    pub id: String,
    /// Priority, route and prefix.
    pub key: BatchKey,
    /// Its tasks.
    pub tasks: Vec<Accepted>,
    /// Size over the size it was opened for (which follows queue depth).
    pub fill_ratio: f64,
    /// Set when it resumes a batch preempted by an earlier process.
    pub resumed: Option<Resumed>,
}

/// A batch resumed from the checkpoint of an earlier process.
#[derive(Debug)]
pub struct Resumed {
    /// Tasks it had finished before (carried into its next checkpoint).
    pub finished: Vec<String>,
}

/// Messages to the Intake.
#[derive(Debug)]
pub enum IntakeMsg {
    /// A message from one of the consumers.
    Delivered(Delivery),
    /// Stop pulling (shutdown).
    StopPulling(RpcReplyPort<()>),
    /// Chaos hook: panic in the handler.
    InjectFault,
}

/// Messages to the Assembler.
#[derive(Debug)]
pub enum AssemblerMsg {
    /// A task to batch.
    Task(Box<Accepted>),
    /// A batch's max wait elapsed.
    SealDue {
        /// Which batch.
        key: BatchKey,
        /// Which incarnation of it (a later batch may reuse the key).
        generation: u64,
    },
    /// A batch resumed from a checkpoint has waited long enough for the
    /// rest of its tasks to come back.
    ResumedDue {
        /// Its id.
        batch: std::sync::Arc<str>,
    },
    /// Seal everything now (shutdown).
    Flush(RpcReplyPort<()>),
    /// Chaos hook: panic in the handler.
    InjectFault,
}

/// Messages to the Dispatcher.
#[derive(Debug)]
pub enum DispatcherMsg {
    /// Send this batch.
    Dispatch(Batch),
    /// Chaos hook: panic in the handler.
    InjectFault,
}

/// Messages to the RetryScheduler.
#[derive(Debug)]
pub enum RetryMsg {
    /// A task whose call failed transiently: send it again after `delay`.
    Schedule {
        /// The task (its lease and claim stay held while it waits).
        task: Box<Accepted>,
        /// How long it waits.
        delay: Duration,
    },
    /// Hand every waiting task back to JetStream now (shutdown).
    Release(RpcReplyPort<()>),
    /// Chaos hook: panic in the handler.
    InjectFault,
}

/// Messages to the CostAccountant.
#[derive(Debug)]
pub enum CostMsg {
    /// This month's totals, read at start: (key, totals, revision).
    Loaded(Vec<(String, DayTotals, u64)>),
    /// A sheet of call records was written (from the watch, in write order).
    Sheet(CallSheet),
    /// Time to write what was counted since the last flush.
    Flush,
    /// Write it now and answer (shutdown, tests).
    FlushNow(RpcReplyPort<()>),
    /// Chaos hook: panic in the handler.
    InjectFault,
}

/// Messages to the PreemptionMonitor.
#[derive(Debug)]
pub enum PreemptionMsg {
    /// Look at the routes and running batches, preempt or resume; answered
    /// when done, so looks never pile up in the mailbox.
    Look(RpcReplyPort<()>),
    /// Chaos hook: panic in the handler.
    InjectFault,
}

/// Messages to the root supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Make a child panic (tests and chaos drills).
    InjectFault(ActorKind),
    /// Stop pulling, flush batches, wait for in-flight work, then stop.
    Shutdown(RpcReplyPort<()>),
}
