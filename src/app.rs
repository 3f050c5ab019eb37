//! Wiring: connect to NATS, create the topology, build the ports over
//! JetStream and HTTP, and start the engine. Used by `batchd run`, the demo,
//! the benchmark and the end-to-end tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use batchd_actors::context::Ports;
use batchd_actors::engine::EngineProbe;
use batchd_actors::ports::{BatchApi, Provider};
use batchd_actors::Engine;

use crate::config::Config;
use crate::ledger::KvLedger;
use crate::nats::{
    connect, ensure_topology, JetSink, JetSource, KvAttempts, KvCheckpoints, KvJobs, KvRouteBoard,
};

/// What `/readyz` checks: the NATS connection, the streams, the actors.
#[derive(Clone)]
pub struct Readiness {
    client: async_nats::Client,
    streams: Vec<String>,
    engine: EngineProbe,
}

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    /// Each check by name: `nats`, `streams`, `actors`.
    pub async fn check(&self) -> Vec<(&'static str, Result<(), String>)> {
        let nats = match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(format!("NATS {state}")),
        };
        let js = async_nats::jetstream::new(self.client.clone());
        let mut missing = Vec::new();
        for name in &self.streams {
            match tokio::time::timeout(CHECK_TIMEOUT, js.get_stream(name)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => missing.push(format!("{name}: {e}")),
                Err(_) => missing.push(format!("{name}: no answer within {CHECK_TIMEOUT:?}")),
            }
        }
        let streams = if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        };
        vec![
            ("nats", nats),
            ("streams", streams),
            ("actors", self.engine.actors_running()),
        ]
    }
}

/// A running engine and what it is connected to.
pub struct Running {
    /// The engine.
    pub engine: Engine,
    /// The NATS client it uses.
    pub client: async_nats::Client,
}

/// The providers the config names, over HTTP.
pub fn http_providers(config: &Config) -> anyhow::Result<HashMap<String, Arc<dyn Provider>>> {
    let timeout = Duration::from_secs(config.dispatch.request_timeout_secs);
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    for (name, p) in &config.providers {
        // The engine times each call (flex calls at `flex_timeout_secs`);
        // the client must not cut a flex call short.
        let timeout = if p.flex {
            timeout.max(Duration::from_secs(p.flex_timeout_secs))
        } else {
            timeout
        };
        let client = crate::provider::from_config(p, timeout)
            .with_context(|| format!("config key `providers.{name}`: building its HTTP client"))?;
        providers.insert(name.clone(), client);
    }
    Ok(providers)
}

/// The batch job APIs of the providers with `batch = true`, over HTTP, each
/// of its provider's kind.
pub fn batch_apis(config: &Config) -> anyhow::Result<HashMap<String, Arc<dyn BatchApi>>> {
    let timeout = Duration::from_secs(config.dispatch.request_timeout_secs);
    let mut apis: HashMap<String, Arc<dyn BatchApi>> = HashMap::new();
    for (name, p) in config.providers.iter().filter(|(_, p)| p.batch) {
        let api = crate::provider::batch_api_from_config(p, timeout).with_context(|| {
            format!("config key `providers.{name}`: building its batch API client")
        })?;
        apis.insert(name.clone(), api);
    }
    Ok(apis)
}

/// Connects, creates what is missing and starts the engine with `providers`.
pub async fn start(
    config: &Config,
    providers: HashMap<String, Arc<dyn Provider>>,
) -> anyhow::Result<Running> {
    batchd_actors::metrics::init(&config.known_labels());
    let client = connect(&config.nats).await?;
    let topology = ensure_topology(&client, config).await?;
    let ports = Ports {
        source: Arc::new(JetSource::new(&topology, config)),
        sink: Arc::new(JetSink::new(&client, &topology, config)),
        attempts: Arc::new(KvAttempts(topology.attempts.clone())),
        ledger: Arc::new(KvLedger::new(
            topology.calls.clone(),
            topology.ledger.clone(),
        )),
        board: Arc::new(KvRouteBoard(topology.routes.clone())),
        checkpoints: Arc::new(KvCheckpoints(topology.checkpoints.clone())),
        owners: Arc::new(crate::ownership::KvOwnership(topology.owners.clone())),
        providers,
        jobs: Arc::new(KvJobs(topology.jobs.clone())),
        batch_apis: batch_apis(config)?,
    };
    let engine = Engine::start(config.engine_settings(), ports).await?;
    Ok(Running { engine, client })
}

impl Running {
    /// The readiness checks of this engine, for `/readyz`.
    pub fn readiness(&self, config: &Config) -> Readiness {
        let n = &config.nats;
        Readiness {
            client: self.client.clone(),
            streams: vec![
                n.tasks_stream.clone(),
                n.results_stream.clone(),
                n.dlq_stream.clone(),
            ],
            engine: self.engine.probe(),
        }
    }
}
