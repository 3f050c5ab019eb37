//! Logs (tracing) and the HTTP endpoint on the metrics address: `/metrics`
//! (real histograms with explicit buckets, plus the USD counters the
//! `metrics` facade can't hold), `/healthz` (the process answers) and
//! `/readyz` (NATS connected, streams present, actors running).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use batchd_actors::metrics as m;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, span fields inline.
    #[default]
    Text,
    /// For collectors: one JSON object per line, with the current span
    /// (`batch`: batch_id, route, priority, size; `task`: task_id) and the
    /// list of spans.
    Json,
}

/// Installs the log subscriber with `default` when RUST_LOG is unset; idempotent.
pub fn init_logging_with_default(default: &str) {
    init_logging(default, LogFormat::Text);
}

/// Installs the log subscriber writing `format` to stderr, with `default`
/// as the filter when RUST_LOG is unset; idempotent.
pub fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the process-wide metrics recorder once and returns its handle.
pub fn recorder() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let mut builder = PrometheusBuilder::new();
    for name in m::SECONDS_HISTOGRAMS {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.into()), &m::SECONDS_BUCKETS)?;
    }
    builder = builder
        .set_buckets_for_metric(Matcher::Full(m::BATCH_SIZE.into()), &m::BATCH_SIZE_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(m::BATCH_FILL_RATIO.into()),
            &m::FILL_RATIO_BUCKETS,
        )?;
    let handle = match builder.install_recorder() {
        Ok(h) => h,
        // Another thread won the race: use its handle.
        Err(e) => {
            return HANDLE
                .get()
                .cloned()
                .context(format!("installing the metrics recorder: {e}"))
        }
    };
    m::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The full `/metrics` text.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&render_cost_totals(&m::cost_totals()));
    text.push_str(&render_cache_savings(&m::cache_savings()));
    text
}

/// The USD saved by the prompt cache as a Prometheus counter family.
fn render_cache_savings(savings: &[(String, String, f64)]) -> String {
    let name = m::CACHE_SAVED_USD_TOTAL;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP {name} USD saved by cached prompt tokens (input price less cached price), per route"
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (provider, model, usd) in savings {
        let _ = writeln!(
            out,
            "{name}{{provider=\"{}\",model=\"{}\"}} {usd}",
            escape(provider),
            escape(model),
        );
    }
    out
}

/// The USD totals as a Prometheus counter family.
fn render_cost_totals(totals: &[m::CostTotal]) -> String {
    let name = m::COST_USD_TOTAL;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP {name} Spend in USD");
    let _ = writeln!(out, "# TYPE {name} counter");
    for t in totals {
        let _ = writeln!(
            out,
            "{name}{{model=\"{}\",tenant=\"{}\",priority=\"{}\"}} {}",
            escape(&t.model),
            escape(&t.tenant),
            t.priority,
            t.usd
        );
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What `/readyz` reports: unready until [`Health::set_ready`] hands it
/// the running engine's checks.
#[derive(Clone, Default)]
pub struct Health {
    readiness: Arc<RwLock<Option<crate::app::Readiness>>>,
}

impl Health {
    /// From now on `/readyz` runs these checks.
    pub fn set_ready(&self, readiness: crate::app::Readiness) {
        *self.readiness.write().unwrap_or_else(|e| e.into_inner()) = Some(readiness);
    }

    /// Each check by name, `Ok` or why not.
    pub async fn check(&self) -> Vec<(&'static str, Result<(), String>)> {
        let readiness = self
            .readiness
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match readiness {
            Some(r) => r.check().await,
            None => vec![("engine", Err("starting".to_owned()))],
        }
    }
}

/// The `/readyz` answer: 200 when every check passes, else 503; the body
/// names each check (`{"ready": bool, "checks": {"nats": "ok", ...}}`).
async fn readyz(health: Health) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let checks = health.check().await;
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let body = serde_json::json!({
        "ready": ready,
        "checks": checks
            .into_iter()
            .map(|(name, r)| (name.to_owned(), serde_json::Value::String(r.err().unwrap_or_else(|| "ok".to_owned()))))
            .collect::<serde_json::Map<_, _>>(),
    });
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

/// Serves `/metrics`, `/healthz` and `/readyz` (checks from `health`) on
/// `addr` until the task is aborted; returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    health: Health,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handle = recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        render(&handle),
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || readyz(health.clone())),
        );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_counters_render_as_prometheus_counters_with_escaped_labels() {
        let totals = [m::CostTotal {
            model: "m\"x".into(),
            tenant: "t1".into(),
            priority: "2",
            usd: 0.75,
        }];
        let text = render_cost_totals(&totals);
        assert!(text.contains("# TYPE batchd_cost_usd_total counter"));
        assert!(
            text.contains(r#"batchd_cost_usd_total{model="m\"x",tenant="t1",priority="2"} 0.75"#),
            "{text}"
        );
        let text = render_cache_savings(&[("openai".into(), "gpt-4.1".into(), 0.5)]);
        assert!(text.contains("# TYPE batchd_cache_saved_usd_total counter"));
        assert!(
            text.contains(r#"batchd_cache_saved_usd_total{provider="openai",model="gpt-4.1"} 0.5"#),
            "{text}"
        );
    }
}
