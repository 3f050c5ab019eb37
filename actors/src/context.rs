//! What every actor shares: settings, the I/O ports, the lease keeper and the
//! directory through which actors find each other's current incarnation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use ractor::ActorRef;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::lease::LeaseKeeper;
use crate::messages::{AssemblerMsg, DispatcherMsg, IntakeMsg};
use crate::ports::{OutcomeSink, Provider, TaskSource};
use crate::settings::EngineSettings;

/// The current actor refs; the supervisor swaps them on restart.
#[derive(Default)]
pub struct Directory {
    intake: RwLock<Option<ActorRef<IntakeMsg>>>,
    assembler: RwLock<Option<ActorRef<AssemblerMsg>>>,
    dispatcher: RwLock<Option<ActorRef<DispatcherMsg>>>,
}

fn read<T: Clone>(lock: &RwLock<Option<T>>) -> Option<T> {
    lock.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(lock: &RwLock<Option<T>>, value: Option<T>) {
    *lock.write().unwrap_or_else(|p| p.into_inner()) = value;
}

impl Directory {
    /// The Intake, when running.
    pub fn intake(&self) -> Option<ActorRef<IntakeMsg>> {
        read(&self.intake)
    }
    /// The Assembler, when running.
    pub fn assembler(&self) -> Option<ActorRef<AssemblerMsg>> {
        read(&self.assembler)
    }
    /// The Dispatcher, when running.
    pub fn dispatcher(&self) -> Option<ActorRef<DispatcherMsg>> {
        read(&self.dispatcher)
    }
    pub(crate) fn set_intake(&self, r: Option<ActorRef<IntakeMsg>>) {
        write(&self.intake, r);
    }
    pub(crate) fn set_assembler(&self, r: Option<ActorRef<AssemblerMsg>>) {
        write(&self.assembler, r);
    }
    pub(crate) fn set_dispatcher(&self, r: Option<ActorRef<DispatcherMsg>>) {
        write(&self.dispatcher, r);
    }
}

/// The I/O the engine is wired to.
#[derive(Clone)]
pub struct Ports {
    /// Task consumers.
    pub source: Arc<dyn TaskSource>,
    /// Outcomes and dead letters.
    pub sink: Arc<dyn OutcomeSink>,
    /// Providers by name.
    pub providers: HashMap<String, Arc<dyn Provider>>,
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
    rng: Mutex<StdRng>,
}

impl EngineContext {
    /// A context for one engine.
    pub fn new(settings: EngineSettings, ports: Ports) -> Arc<EngineContext> {
        let rng = Mutex::new(StdRng::seed_from_u64(settings.seed));
        Arc::new(EngineContext {
            settings,
            keeper: LeaseKeeper::default(),
            ports,
            directory: Directory::default(),
            rng,
        })
    }

    /// Runs `f` with the engine's seeded RNG.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut rng)
    }
}
