//! # RootSupervisor
//!
//! Starts the children of [`ActorKind::ALL`] (CostAccountant, Dispatcher,
//! PreemptionMonitor, RetryScheduler, Assembler, Intake: in that order, so each finds the ones it sends to
//! running), restarts a child that fails or stops
//! (one-for-one), counts restarts, and escalates to a clean shutdown when
//! restarts exceed `max_restarts` within `within_secs`.
//!
//! Receives: [`SupervisorMsg`] and supervision events.
//!
//! Shutdown is ordered: stop pulling, seal open batches, wait for in-flight
//! tasks (bounded), then stop the children.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use crate::assembler::Assembler;
use crate::context::EngineContext;
use crate::cost_accountant::CostAccountant;
use crate::dispatcher::Dispatcher;
use crate::intake::Intake;
use crate::messages::{
    ActorKind, AssemblerMsg, CostMsg, DispatcherMsg, IntakeMsg, PreemptionMsg, RetryMsg,
    SupervisorMsg,
};
use crate::metrics;
use crate::preemption_monitor::PreemptionMonitor;
use crate::retry_scheduler::RetryScheduler;

/// The child table: how each kind is started. Adding an actor is one arm here
/// and one in [`inject_fault`].
async fn start_child(
    kind: ActorKind,
    ctx: Arc<EngineContext>,
    supervisor: ActorCell,
) -> Result<ActorCell, ractor::SpawnErr> {
    Ok(match kind {
        ActorKind::Intake => Actor::spawn_linked(None, Intake, ctx, supervisor)
            .await?
            .0
            .get_cell(),
        ActorKind::Assembler => Actor::spawn_linked(None, Assembler, ctx, supervisor)
            .await?
            .0
            .get_cell(),
        ActorKind::Dispatcher => Actor::spawn_linked(None, Dispatcher, ctx, supervisor)
            .await?
            .0
            .get_cell(),
        ActorKind::RetryScheduler => Actor::spawn_linked(None, RetryScheduler, ctx, supervisor)
            .await?
            .0
            .get_cell(),
        ActorKind::CostAccountant => Actor::spawn_linked(None, CostAccountant, ctx, supervisor)
            .await?
            .0
            .get_cell(),
        ActorKind::PreemptionMonitor => {
            Actor::spawn_linked(None, PreemptionMonitor, ctx, supervisor)
                .await?
                .0
                .get_cell()
        }
    })
}

/// Chaos hook: makes one running child panic. False when it is not running.
fn inject_fault(kind: ActorKind, cell: ActorCell) -> bool {
    match kind {
        ActorKind::Intake => ActorRef::<IntakeMsg>::from(cell)
            .cast(IntakeMsg::InjectFault)
            .is_ok(),
        ActorKind::Assembler => ActorRef::<AssemblerMsg>::from(cell)
            .cast(AssemblerMsg::InjectFault)
            .is_ok(),
        ActorKind::Dispatcher => ActorRef::<DispatcherMsg>::from(cell)
            .cast(DispatcherMsg::InjectFault)
            .is_ok(),
        ActorKind::RetryScheduler => ActorRef::<RetryMsg>::from(cell)
            .cast(RetryMsg::InjectFault)
            .is_ok(),
        ActorKind::CostAccountant => ActorRef::<CostMsg>::from(cell)
            .cast(CostMsg::InjectFault)
            .is_ok(),
        ActorKind::PreemptionMonitor => ActorRef::<PreemptionMsg>::from(cell)
            .cast(PreemptionMsg::InjectFault)
            .is_ok(),
    }
}

/// The root supervisor.
pub struct RootSupervisor;

/// Arguments: the shared context and how long shutdown waits for in-flight work.
pub struct SupervisorArgs {
    /// Shared context.
    pub ctx: Arc<EngineContext>,
    /// Bound on the shutdown drain.
    pub drain_timeout: Duration,
}

/// The supervisor's state.
pub struct SupervisorState {
    ctx: Arc<EngineContext>,
    drain_timeout: Duration,
    children: HashMap<ActorId, ActorKind>,
    restarts: VecDeque<Instant>,
    stopping: bool,
}

/// Why the engine stopped on its own.
pub const ESCALATED: &str = "restart intensity exceeded";

impl Actor for RootSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState {
            ctx: args.ctx,
            drain_timeout: args.drain_timeout,
            children: HashMap::new(),
            restarts: VecDeque::new(),
            stopping: false,
        };
        for kind in ActorKind::ALL {
            state.spawn(&myself, kind).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::InjectFault(kind) => {
                let sent = state
                    .ctx
                    .directory
                    .cell(kind)
                    .is_some_and(|cell| inject_fault(kind, cell));
                if !sent {
                    tracing::warn!(actor = kind.name(), "fault not injected: actor not running");
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                state.stopping = true;
                state.drain().await;
                myself
                    .stop_children_and_wait(None, Some(Duration::from_secs(5)))
                    .await;
                let _ = reply.send(());
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.clone().unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(kind) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        state.ctx.directory.set(kind, None);
        if state.stopping {
            return Ok(());
        }
        tracing::error!(actor = kind.name(), reason = %why, "actor stopped; restarting");
        if !state.allow_restart() {
            tracing::error!(
                max_restarts = state.ctx.settings.restart.max_restarts,
                within_secs = state.ctx.settings.restart.within_secs,
                "{ESCALATED}; shutting down"
            );
            state.stopping = true;
            myself.stop_children(None);
            myself.stop(Some(ESCALATED.into()));
            return Ok(());
        }
        metrics::actor_restarted(kind.name());
        state.spawn(&myself, kind).await?;
        Ok(())
    }
}

impl SupervisorState {
    async fn spawn(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        kind: ActorKind,
    ) -> Result<(), ActorProcessingErr> {
        let cell = start_child(kind, self.ctx.clone(), myself.get_cell()).await?;
        self.ctx.directory.set(kind, Some(cell.clone()));
        self.children.insert(cell.get_id(), kind);
        Ok(())
    }

    /// Records a restart; false when the intensity limit is exceeded.
    fn allow_restart(&mut self) -> bool {
        let now = Instant::now();
        let window = Duration::from_secs(self.ctx.settings.restart.within_secs);
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        self.restarts.len() <= self.ctx.settings.restart.max_restarts as usize
    }

    async fn drain(&self) {
        let d = &self.ctx.directory;
        if let Some(intake) = d.intake() {
            let _ = ractor::call_t!(intake, IntakeMsg::StopPulling, 5_000);
        }
        if let Some(assembler) = d.assembler() {
            let _ = ractor::call_t!(assembler, AssemblerMsg::Flush, 5_000);
        }
        // Tasks waiting for a retry or for their route go back to JetStream
        // now; tasks whose call is in flight finish.
        self.ctx.begin_stop();
        if let Some(retry) = d.retry_scheduler() {
            let _ = ractor::call_t!(retry, RetryMsg::Release, 5_000);
        }
        let deadline = Instant::now() + self.drain_timeout;
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        while self.ctx.keeper.held() > 0 && Instant::now() < deadline {
            poll.tick().await;
        }
        // What finished calls were seen so far goes to the ledger now; the
        // rest is in the call records and counted at the next start.
        if let Some(accountant) = d.cost_accountant() {
            let _ = ractor::call_t!(accountant, CostMsg::FlushNow, 5_000);
        }
        let left = self.ctx.keeper.held();
        if left > 0 {
            tracing::warn!(
                held = left,
                "shutdown drain timed out; those tasks will be redelivered"
            );
        }
    }
}
