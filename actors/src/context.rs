//! What every actor shares: settings, the I/O ports, the lease keeper, the
//! claims on tasks in flight, and the directory through which actors find
//! each other's current incarnation. All of it outlives any one actor, so a
//! restarted actor finds the same claims and routes its predecessor used.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use ractor::{ActorCell, ActorRef, Message};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::batch_control::RunningBatches;
use crate::batching::QueueDepths;
use crate::call_sheets::CallSheets;
use crate::clock::Clock;
use crate::dispatcher::Routes;
use crate::lease::LeaseKeeper;
use crate::ledger::Spend;
use crate::messages::{ActorKind, AssemblerMsg, CostMsg, DispatcherMsg, IntakeMsg, RetryMsg};
use crate::ownership::{Ownership, OwnershipStore};
use crate::ports::{
    AttemptStore, CheckpointStore, LedgerStore, OutcomeSink, Provider, RouteBoard, TaskSource,
};
use crate::recovery::Recovery;
use crate::settings::EngineSettings;

/// The current actor cells, one slot per [`ActorKind`]; the supervisor
/// swaps them on restart.
#[derive(Default)]
pub struct Directory {
    cells: RwLock<[Option<ActorCell>; ActorKind::COUNT]>,
}

impl Directory {
    fn get<M: Message>(&self, kind: ActorKind) -> Option<ActorRef<M>> {
        let cells = self.cells.read().unwrap_or_else(|p| p.into_inner());
        cells[kind.index()].clone().map(ActorRef::from)
    }

    /// The cell of one actor, when running.
    pub fn cell(&self, kind: ActorKind) -> Option<ActorCell> {
        let cells = self.cells.read().unwrap_or_else(|p| p.into_inner());
        cells[kind.index()].clone()
    }

    pub(crate) fn set(&self, kind: ActorKind, cell: Option<ActorCell>) {
        let mut cells = self.cells.write().unwrap_or_else(|p| p.into_inner());
        cells[kind.index()] = cell;
    }

    /// The Intake, when running.
    pub fn intake(&self) -> Option<ActorRef<IntakeMsg>> {
        self.get(ActorKind::Intake)
    }
    /// The Assembler, when running.
    pub fn assembler(&self) -> Option<ActorRef<AssemblerMsg>> {
        self.get(ActorKind::Assembler)
    }
    /// The Dispatcher, when running.
    pub fn dispatcher(&self) -> Option<ActorRef<DispatcherMsg>> {
        self.get(ActorKind::Dispatcher)
    }
    /// The RetryScheduler, when running.
    pub fn retry_scheduler(&self) -> Option<ActorRef<RetryMsg>> {
        self.get(ActorKind::RetryScheduler)
    }
    /// The CostAccountant, when running.
    pub fn cost_accountant(&self) -> Option<ActorRef<CostMsg>> {
        self.get(ActorKind::CostAccountant)
    }
}

/// Task ids the engine is working on. One copy of a task holds the claim
/// from its acceptance until its message is settled; a second copy delivered
/// meanwhile (a redelivery after a missed heartbeat, a duplicate publish)
/// finds the claim taken and never produces an outcome of its own.
#[derive(Default, Clone)]
pub struct Claims(Arc<Mutex<HashSet<String>>>);

impl Claims {
    /// Claims `task_id`; `None` when another copy holds it.
    pub fn claim(&self, task_id: &str) -> Option<Claim> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(task_id.to_owned()).then(|| Claim {
            claims: self.clone(),
            id: task_id.to_owned(),
        })
    }

    /// True while some copy of `task_id` is claimed.
    pub fn is_claimed(&self, task_id: &str) -> bool {
        let set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.contains(task_id)
    }
}

/// The claim on one task id; released on drop, however the task ends.
#[derive(Debug)]
pub struct Claim {
    claims: Claims,
    id: String,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims").finish_non_exhaustive()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut set = self.claims.0.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.id);
    }
}

/// The I/O the engine is wired to.
#[derive(Clone)]
pub struct Ports {
    /// Task consumers.
    pub source: Arc<dyn TaskSource>,
    /// Outcomes and dead letters.
    pub sink: Arc<dyn OutcomeSink>,
    /// Attempts spent per task.
    pub attempts: Arc<dyn AttemptStore>,
    /// Call records and daily spend totals.
    pub ledger: Arc<dyn LedgerStore>,
    /// Where route state is published for other machines.
    pub board: Arc<dyn RouteBoard>,
    /// Checkpoints of preempted batches.
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// Ownership records shared by replicas (claims on calls in flight).
    pub owners: Arc<dyn OwnershipStore>,
    /// Providers by name.
    pub providers: HashMap<String, Arc<dyn Provider>>,
    /// Recorded provider batch jobs.
    pub jobs: Arc<dyn crate::ports::JobStore>,
    /// Batch job APIs by provider name (providers with `batch = true`).
    pub batch_apis: HashMap<String, Arc<dyn crate::ports::BatchApi>>,
}

/// Shared by all actors of one engine.
pub struct EngineContext {
    /// Settings.
    pub settings: EngineSettings,
    /// I/O.
    pub ports: Ports,
    /// Heartbeats for held messages.
    pub keeper: LeaseKeeper,
    /// Current actor refs.
    pub directory: Directory,
    /// Task ids in flight.
    pub claims: Claims,
    /// This replica's claims, across replicas, on the calls it makes.
    pub call_owners: Ownership,
    /// The other replicas seen: whether calls are claimed.
    pub peers: crate::peers::Peers,
    /// Calls in flight made unclaimed (no other replica ran).
    pub unclaimed: crate::call_claim::UnclaimedCalls,
    /// The provider jobs this replica drives.
    pub driving_jobs: crate::provider_jobs::DrivingJobs,
    /// Provider routes, kept across Dispatcher restarts.
    pub routes: Routes,
    /// Spend per tenant and day, for budgets (kept by the CostAccountant).
    pub spend: Spend,
    /// Where the Dispatcher records its calls (grouped writes).
    pub calls: CallSheets,
    /// The ledger's clock: which UTC day and month it is.
    pub clock: Clock,
    /// Each priority's last sampled queue depth (batch size follows it).
    pub depths: QueueDepths,
    /// The batches being driven, with their pause flags.
    pub batches: RunningBatches,
    /// Notified whenever a priority-1 call has to wait at a route.
    pub p1_waiting: Arc<tokio::sync::Notify>,
    /// Batches preempted by an earlier process, waiting for their tasks.
    pub recovery: Recovery,
    /// What each priority has met against its service target.
    pub targets: crate::targets::Targets,
    /// Calls shared by exact-duplicate requests.
    pub dedupe: crate::dedupe::Dedupe,
    /// The tier classifier's verdict cache and calls in flight.
    pub classifier: crate::classifier::Classifier,
    stop: tokio::sync::watch::Sender<bool>,
    rng: Mutex<StdRng>,
}

impl EngineContext {
    /// A context for one engine.
    pub fn new(settings: EngineSettings, ports: Ports) -> Arc<EngineContext> {
        let rng = Mutex::new(StdRng::seed_from_u64(settings.seed));
        let targets = settings.targets;
        let dedupe_window = settings.dedupe_window;
        let classifier_cache = settings.catalog.tiers.classifier.cache_entries;
        let clock =
            Clock::following_tokio(settings.ledger.clock_start.unwrap_or_else(chrono::Utc::now));
        // Claims are compared across replicas: dated by the wall clock they
        // share, not by the ledger's (which may start at a configured day).
        let call_owners = Ownership::new(
            ports.owners.clone(),
            &settings.replica,
            settings.claim_ttl,
            settings.clock.clone(),
        );
        let peers =
            crate::peers::Peers::new(&settings.replica, settings.claims, settings.route_refresh);
        Arc::new(EngineContext {
            spend: Spend::default(),
            calls: CallSheets::new(ports.ledger.clone()),
            clock,
            settings,
            keeper: LeaseKeeper::default(),
            ports,
            directory: Directory::default(),
            claims: Claims::default(),
            call_owners,
            peers,
            unclaimed: Default::default(),
            driving_jobs: Default::default(),
            routes: Routes::default(),
            depths: QueueDepths::default(),
            batches: RunningBatches::default(),
            p1_waiting: Arc::default(),
            recovery: Recovery::default(),
            targets: crate::targets::Targets::new(targets),
            dedupe: crate::dedupe::Dedupe::new(dedupe_window),
            classifier: crate::classifier::Classifier::new(classifier_cache),
            stop: tokio::sync::watch::Sender::new(false),
            rng,
        })
    }

    /// Tells every waiting task that the engine is shutting down.
    pub fn begin_stop(&self) {
        self.stop.send_replace(true);
    }

    /// True once shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once shutdown has begun.
    pub async fn stopping(&self) {
        let mut rx = self.stop.subscribe();
        // An error means the sender is gone: the engine is gone too.
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// Runs `f` with the engine's seeded RNG.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut rng)
    }
}
