//! Wiring: connect to NATS, create the topology, build the ports over
//! JetStream and HTTP, and start the engine. Used by `batchd run`, the demo,
//! the benchmark and the end-to-end tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use batchd_actors::context::Ports;
use batchd_actors::engine::EngineProbe;
use batchd_actors::ports::{BatchApi, Provider, ProviderError};
use batchd_actors::routing::BatchProviders;
use batchd_actors::Engine;

use crate::config::{BatchUse, Config};
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
    /// The probes of `batch = "auto"` providers still asking; dropped (and
    /// so ended) with the engine.
    pub probes: tokio::task::JoinSet<()>,
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

/// The batch job APIs of the providers with `batch = true` or `"auto"`, over
/// HTTP, each of its provider's kind.
pub fn batch_apis(config: &Config) -> anyhow::Result<HashMap<String, Arc<dyn BatchApi>>> {
    let timeout = Duration::from_secs(config.dispatch.request_timeout_secs);
    let mut apis: HashMap<String, Arc<dyn BatchApi>> = HashMap::new();
    for (name, p) in config.providers.iter().filter(|(_, p)| p.batch.allowed()) {
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
    let settings = config.engine_settings();
    let mut probes = tokio::task::JoinSet::new();
    for (name, p) in &config.providers {
        // A provider without models or key is not asked: it has nothing to
        // send, or would refuse the question.
        let askable = !p.models.is_empty() && p.resolved_api_key().is_some();
        if let (BatchUse::Auto, true, Some(api)) = (p.batch, askable, ports.batch_apis.get(name)) {
            probes.spawn(probe_batch_api(
                name.clone(),
                api.clone(),
                settings.catalog.batch_providers.clone(),
            ));
        }
    }
    let engine = Engine::start(settings, ports).await?;
    Ok(Running {
        engine,
        client,
        probes,
    })
}

/// What a probe of a provider's batch API found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchProbe {
    /// It listed its batch jobs: it has the API.
    Found,
    /// It has no such endpoint (HTTP 404, 405 or 501).
    Absent(u16),
    /// No answer that tells (unreachable, refused key, overloaded): ask again.
    Unknown(String),
}

impl BatchProbe {
    /// What listing the provider's recent batch jobs answered says.
    pub fn judge<T>(answer: &Result<T, ProviderError>) -> Self {
        match answer {
            Ok(_) => BatchProbe::Found,
            Err(
                ProviderError::Rejected { status, .. }
                | ProviderError::Transient {
                    status: Some(status),
                    ..
                },
            ) if matches!(status, 404 | 405 | 501) => BatchProbe::Absent(*status),
            Err(e) => BatchProbe::Unknown(e.to_string()),
        }
    }
}

/// Asks `provider` (with `batch = "auto"`) whether it has a batch API, until
/// it answers one way or the other, with a backoff from 1 s to 5 min; a
/// provider found to have one takes priority 3's batch jobs from then on.
/// Until then its priority 3 work goes realtime.
async fn probe_batch_api(provider: String, api: Arc<dyn BatchApi>, on: BatchProviders) {
    let mut wait = Duration::from_secs(1);
    loop {
        match BatchProbe::judge(&api.recent().await) {
            BatchProbe::Found => {
                tracing::info!(
                    provider = %provider,
                    "the provider lists batch jobs: its priority 3 work goes by batch job"
                );
                on.set(&provider, true);
                return;
            }
            BatchProbe::Absent(status) => {
                tracing::info!(
                    provider = %provider,
                    status,
                    "the provider has no batch API: its priority 3 work goes realtime \
                     (set `batch = false` in its section to skip this check)"
                );
                return;
            }
            BatchProbe::Unknown(why) => {
                tracing::warn!(
                    provider = %provider,
                    error = %why,
                    retry_in_secs = wait.as_secs(),
                    "cannot tell whether the provider has a batch API yet: its priority 3 \
                     work goes realtime until it answers"
                );
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(300));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_tells_found_absent_or_unknown_from_the_listing_answer() {
        let ok: Result<Vec<()>, ProviderError> = Ok(Vec::new());
        assert_eq!(BatchProbe::judge(&ok), BatchProbe::Found);
        for status in [404, 405] {
            let absent: Result<(), _> = Err(ProviderError::Rejected {
                status,
                message: "no such route".into(),
            });
            assert_eq!(BatchProbe::judge(&absent), BatchProbe::Absent(status));
        }
        let not_implemented: Result<(), _> = Err(ProviderError::Transient {
            status: Some(501),
            message: "not implemented".into(),
        });
        assert_eq!(BatchProbe::judge(&not_implemented), BatchProbe::Absent(501));
        for unknown in [
            ProviderError::Rejected {
                status: 401,
                message: "bad key".into(),
            },
            ProviderError::Transient {
                status: Some(503),
                message: "down".into(),
            },
            ProviderError::Transient {
                status: None,
                message: "connection refused".into(),
            },
            ProviderError::Timeout {
                message: "10 s".into(),
            },
        ] {
            let answer: Result<(), _> = Err(unknown);
            assert!(
                matches!(BatchProbe::judge(&answer), BatchProbe::Unknown(_)),
                "{answer:?}"
            );
        }
    }
}
