//! The engine handle: start the supervised actors over a set of ports, inject
//! faults, shut down cleanly.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef, ActorStatus};
use tokio::task::JoinHandle;

use crate::context::{EngineContext, Ports};
use crate::messages::{ActorKind, SupervisorMsg};
use crate::route_publisher;
use crate::settings::EngineSettings;
use crate::supervisor::{RootSupervisor, SupervisorArgs, ESCALATED};

/// Errors starting or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The supervisor could not start its children.
    #[error("starting the engine: {0}")]
    Start(String),
    /// Children failed more often than the restart policy allows.
    #[error("the engine stopped: {ESCALATED}")]
    Escalated,
}

/// A running engine.
pub struct Engine {
    supervisor: ActorRef<SupervisorMsg>,
    join: JoinHandle<()>,
    ctx: Arc<EngineContext>,
    keeper: JoinHandle<()>,
    publisher: JoinHandle<()>,
    peers: JoinHandle<()>,
}

impl Engine {
    /// Starts the actors under a root supervisor.
    pub async fn start(settings: EngineSettings, ports: Ports) -> Result<Engine, EngineError> {
        let heartbeat = settings.lease_heartbeat;
        let ctx = EngineContext::new(settings, ports);
        // Before anything is pulled, so redelivered tasks of a batch
        // preempted by an earlier process find it.
        crate::recovery::load(&ctx).await;
        let keeper = ctx.keeper.spawn(heartbeat);
        let publisher = route_publisher::spawn(ctx.clone());
        let peers = crate::peers::spawn(ctx.clone());
        let args = SupervisorArgs {
            ctx: ctx.clone(),
            drain_timeout: Duration::from_secs(30),
        };
        let (supervisor, join) = Actor::spawn(None, RootSupervisor, args)
            .await
            .map_err(|e| EngineError::Start(e.to_string()))?;
        // Provider jobs recorded by an earlier run go on from their step.
        tokio::spawn(crate::provider_jobs::resume(ctx.clone()));
        Ok(Engine {
            supervisor,
            join,
            ctx,
            keeper,
            publisher,
            peers,
        })
    }

    /// The shared context (settings, ports, directory).
    pub fn context(&self) -> &Arc<EngineContext> {
        &self.ctx
    }

    /// Makes one actor panic: a chaos drill for the supervision tree.
    pub fn inject_fault(&self, kind: ActorKind) {
        let _ = self.supervisor.cast(SupervisorMsg::InjectFault(kind));
    }

    /// A cheap, cloneable view of whether the engine and its actors run.
    pub fn probe(&self) -> EngineProbe {
        EngineProbe {
            supervisor: self.supervisor.clone(),
            ctx: self.ctx.clone(),
        }
    }

    /// True while the supervisor runs.
    pub fn is_running(&self) -> bool {
        !matches!(
            self.supervisor.get_status(),
            ActorStatus::Stopped | ActorStatus::Stopping
        )
    }

    /// Stops pulling, seals open batches, waits for in-flight tasks, stops,
    /// and withdraws this replica's routes from the route board.
    pub async fn shutdown(self) {
        let _ = ractor::call_t!(self.supervisor, SupervisorMsg::Shutdown, 60_000);
        let _ = self.join.await;
        self.keeper.abort();
        self.publisher.abort();
        self.peers.abort();
        route_publisher::withdraw(&self.ctx).await;
    }

    /// Waits until the engine stops on its own; `Err` when it escalated.
    pub async fn wait(&mut self) -> Result<(), EngineError> {
        (&mut self.join)
            .await
            .map_err(|e| EngineError::Start(e.to_string()))?;
        self.keeper.abort();
        self.publisher.abort();
        self.peers.abort();
        route_publisher::withdraw(&self.ctx).await;
        Err(EngineError::Escalated)
    }
}

/// Whether the engine runs, for a readiness check that outlives no one:
/// it holds the supervisor's reference and the shared context only.
#[derive(Clone)]
pub struct EngineProbe {
    supervisor: ActorRef<SupervisorMsg>,
    ctx: Arc<EngineContext>,
}

impl EngineProbe {
    /// `Ok` while the supervisor and every actor run; else what does not.
    pub fn actors_running(&self) -> Result<(), String> {
        if !matches!(self.supervisor.get_status(), ActorStatus::Running) {
            return Err("the supervisor is not running".into());
        }
        let down: Vec<&str> = ActorKind::ALL
            .into_iter()
            .filter(|kind| {
                !self
                    .ctx
                    .directory
                    .cell(*kind)
                    .is_some_and(|c| matches!(c.get_status(), ActorStatus::Running))
            })
            .map(ActorKind::name)
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("not running: {}", down.join(", ")))
        }
    }
}
