//! Wiring: connect to NATS, create the topology, build the ports and start
//! the engine; `batchd run` waits for a signal and shuts down cleanly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use batchd_actors::context::Ports;
use batchd_actors::lease::LeaseKeeper;
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
    let client = connect(&config.nats.url).await?;
    let topology = ensure_topology(&client, config).await?;
    let keeper = LeaseKeeper::default();
    let ports = Ports {
        source: Arc::new(JetSource::new(&topology, config, keeper.clone())),
        sink: Arc::new(JetSink::new(&client, &topology, config)),
        attempts: Arc::new(KvAttempts(topology.attempts.clone())),
        providers,
        keeper,
    };
    let engine = Engine::start(config.engine_settings(), ports).await?;
    Ok(Running { engine, client })
}

/// `batchd run`: serve until SIGINT/SIGTERM, or until the engine gives up.
pub async fn run(config: Config, metrics_addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let (bound, metrics_task) = crate::telemetry::serve_metrics(metrics_addr).await?;
    let providers = http_providers(&config)?;
    for (name, p) in &config.providers {
        tracing::info!(provider = %name, base_url = %p.resolved_base_url(), key = p.resolved_api_key().is_some(), "provider");
    }
    let mut running = start(&config, providers).await?;
    tracing::info!(nats = %config.nats.url, metrics = %format!("http://{bound}/metrics"), "batchd running");
    let outcome = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing in-flight tasks");
            running.engine.shutdown().await;
            Ok(())
        }
        r = running.engine.wait() => r.map_err(anyhow::Error::from),
    };
    metrics_task.abort();
    let _ = running.client.drain().await;
    outcome
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
