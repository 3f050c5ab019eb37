//! Every message the actors exchange.

use ractor::RpcReplyPort;

use crate::batching::BatchKey;
use crate::lease::Lease;
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
}

impl ActorKind {
    /// The `actor` metric label and actor name.
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::Intake => "intake",
            ActorKind::Assembler => "assembler",
            ActorKind::Dispatcher => "dispatcher",
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
    /// Attempts spent before this delivery.
    pub attempts_before: u32,
    /// The hold on its message.
    pub lease: Lease,
    /// The subject it arrived on (recorded in dead letters).
    pub subject: String,
    /// True when its consumer had nothing more waiting when it was delivered.
    pub drained: bool,
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
    /// Size over the priority's max size.
    pub fill_ratio: f64,
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

/// Messages to the root supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Make a child panic (tests and chaos drills).
    InjectFault(ActorKind),
    /// Stop pulling, flush batches, wait for in-flight work, then stop.
    Shutdown(RpcReplyPort<()>),
}
