//! `batchd run`: the engine over NATS and the configured providers, with the
//! Prometheus `/metrics` endpoint, until SIGINT/SIGTERM or until the engine
//! gives up; a signal drains in-flight work before exiting.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::app;
use crate::config::{Config, NatsAuthArgs};
use crate::secrets::redact_url;

/// Arguments of `batchd run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Config file (merged over the documented defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NATS server URL.
    #[arg(long, env = "BATCHD_NATS_URL")]
    pub nats_url: Option<String>,
    /// Listen address of the Prometheus /metrics endpoint.
    #[arg(long, env = "BATCHD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
}

/// Runs `batchd run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = super::load_config(args.config.as_deref(), args.nats_url.as_deref())?;
    args.nats_auth.apply(&mut config.nats);
    config.validate()?;
    let addr = match args.metrics_addr {
        Some(a) => a,
        None => config
            .metrics
            .addr
            .parse()
            .context("config key `metrics.addr`")?,
    };
    serve(config, addr).await
}

/// Serves until SIGINT/SIGTERM, or until the engine gives up.
async fn serve(config: Config, metrics_addr: SocketAddr) -> anyhow::Result<()> {
    let health = crate::telemetry::Health::default();
    let (bound, metrics_task) =
        crate::telemetry::serve_metrics(metrics_addr, health.clone()).await?;
    let providers = app::http_providers(&config)?;
    for (name, p) in &config.providers {
        tracing::info!(provider = %name, kind = ?p.kind, base_url = %redact_url(&p.resolved_base_url()), key = p.resolved_api_key().is_some(), "provider");
    }
    let mut running = app::start(&config, providers).await?;
    health.set_ready(running.readiness(&config));
    tracing::info!(nats = %redact_url(&config.nats.url), auth = %config.nats.auth.describe(), metrics = %format!("http://{bound}/metrics"), "batchd running");
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
