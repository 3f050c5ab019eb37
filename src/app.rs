//! Wiring: connect to NATS, create the topology, build the ports over
//! JetStream and HTTP, and start the engine. Used by `batchd run`, the demo,
//! the benchmark and the end-to-end tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use batchd_actors::context::Ports;
use batchd_actors::ports::Provider;
use batchd_actors::Engine;

use crate::config::Config;
use crate::nats::{connect, ensure_topology, JetSink, JetSource, KvAttempts};
use crate::provider::OpenAiProvider;

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
        let client = OpenAiProvider::from_config(p, timeout)
            .with_context(|| format!("building the HTTP client of provider {name}"))?;
        providers.insert(name.clone(), Arc::new(client));
    }
    Ok(providers)
}

/// Connects, creates what is missing and starts the engine with `providers`.
pub async fn start(
    config: &Config,
    providers: HashMap<String, Arc<dyn Provider>>,
) -> anyhow::Result<Running> {
    let client = connect(&config.nats).await?;
    let topology = ensure_topology(&client, config).await?;
    let ports = Ports {
        source: Arc::new(JetSource::new(&topology, config)),
        sink: Arc::new(JetSink::new(&client, &topology, config)),
        attempts: Arc::new(KvAttempts(topology.attempts.clone())),
        providers,
    };
    let engine = Engine::start(config.engine_settings(), ports).await?;
    Ok(Running { engine, client })
}
