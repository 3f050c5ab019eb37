//! What `batchd status` reads, from NATS alone (so it works from any
//! machine that reaches the server): per priority the tasks waiting, in
//! flight and the age of the oldest; dead letters in the last hour; the
//! entries of the checkpoint and attempt buckets; and, when given a
//! `/metrics` URL, the routes that are paused or whose circuit is open
//! (batchd does not publish route state to NATS).

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use batchd_actors::metrics as m;
use batchd_actors::task::Priority;
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;

use crate::config::Config;
use crate::nats::{consumer_name, queue_state};

/// One priority's queue.
#[derive(Debug, Clone, Serialize)]
pub struct PriorityStatus {
    /// 1, 2 or 3.
    pub priority: u8,
    /// Delivered to no one yet.
    pub waiting: u64,
    /// Delivered and not acked yet (tasks batchd is working on).
    pub in_flight: u64,
    /// Age of the oldest task in the queue, seconds.
    pub oldest_age_secs: Option<f64>,
    /// Why the numbers are missing (no consumer yet, ...).
    pub error: Option<String>,
}

/// A route that is not serving.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    /// Provider name.
    pub provider: String,
    /// Model.
    pub model: String,
    /// `paused` or `circuit_open`.
    pub state: String,
    /// The circuit's reason, when open.
    pub reason: Option<String>,
}

/// Everything `batchd status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// When it was read.
    pub at: DateTime<Utc>,
    /// The NATS server.
    pub nats_url: String,
    /// Per priority, 1 first.
    pub priorities: Vec<PriorityStatus>,
    /// Dead letters published in the last hour.
    pub dead_letters_last_hour: Option<u64>,
    /// Dead letters kept.
    pub dead_letters_total: Option<u64>,
    /// Outcomes kept.
    pub outcomes_total: Option<u64>,
    /// Entries of the checkpoint bucket (preempted batches and provider
    /// jobs in progress, once batchd writes them).
    pub checkpoints: Option<u64>,
    /// Tasks that have spent attempts on transient failures.
    pub tasks_with_attempts: Option<u64>,
    /// Routes paused or down, read from `/metrics`; `None` without a URL.
    pub routes: Option<Vec<RouteStatus>>,
    /// Where route state comes from, or why it is missing.
    pub routes_note: String,
    /// Spend today (UTC) from the ledger, USD: (exact, estimated).
    pub spend_today_usd: Option<(f64, f64)>,
}

/// Reads the status from NATS (and `/metrics` when `metrics_url` is given).
pub async fn read(
    client: &async_nats::Client,
    config: &Config,
    metrics_url: Option<&str>,
) -> Status {
    let js = jetstream::new(client.clone());
    let n = &config.nats;
    let subjects = config.subjects();
    let tasks = js.get_stream(&n.tasks_stream).await;
    let mut priorities = Vec::new();
    for p in Priority::ALL {
        let mut s = PriorityStatus {
            priority: p.number(),
            waiting: 0,
            in_flight: 0,
            oldest_age_secs: None,
            error: None,
        };
        match &tasks {
            Err(e) => s.error = Some(format!("stream {}: {e}", n.tasks_stream)),
            Ok(stream) => {
                match queue_state(stream, &consumer_name(n, p), &subjects.task(p)).await {
                    Err(e) => s.error = Some(e),
                    Ok(q) => {
                        s.waiting = q.waiting;
                        s.in_flight = q.in_flight;
                        s.oldest_age_secs = q.oldest_age.map(|a| a.as_secs_f64());
                    }
                }
            }
        }
        priorities.push(s);
    }
    let messages = |name: String| {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(name).await.ok()?;
            Some(stream.info().await.ok()?.state.messages)
        }
    };
    let (routes, routes_note) = match metrics_url {
        None => (
            None,
            "not in NATS: batchd reports route state on /metrics (pass --metrics-url)".to_owned(),
        ),
        Some(url) => match routes_from_metrics(url).await {
            Ok(r) => (Some(r), format!("from {url}")),
            Err(e) => (None, format!("{url}: {e}")),
        },
    };
    Status {
        at: Utc::now(),
        nats_url: n.url.clone(),
        priorities,
        dead_letters_last_hour: dead_letters_since(&js, &n.dlq_stream, Duration::from_secs(3600))
            .await,
        dead_letters_total: messages(n.dlq_stream.clone()).await,
        outcomes_total: messages(n.results_stream.clone()).await,
        checkpoints: bucket_keys(&js, &n.checkpoints_bucket).await,
        tasks_with_attempts: bucket_keys(&js, &n.attempts_bucket).await,
        routes,
        routes_note,
        spend_today_usd: spend_today(&js, config).await,
    }
}

async fn spend_today(js: &jetstream::Context, config: &Config) -> Option<(f64, f64)> {
    let ledger = crate::ledger::KvLedger::open(js, config).await.ok()?;
    let (exact, estimated) = ledger
        .spend_on(&batchd_actors::ledger::day_of(Utc::now()))
        .await
        .ok()?;
    Some((
        batchd_actors::pricing::usd(exact),
        batchd_actors::pricing::usd(estimated),
    ))
}

/// Messages of `stream` newer than `window`: the pending count of a
/// short-lived consumer that starts `window` ago (nothing is read).
async fn dead_letters_since(
    js: &jetstream::Context,
    stream: &str,
    window: Duration,
) -> Option<u64> {
    let stream = js.get_stream(stream).await.ok()?;
    let start = time::OffsetDateTime::now_utc() - window;
    let mut c = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .ok()?;
    let info = c.info().await.ok()?;
    let (pending, name) = (info.num_pending, info.name.clone());
    let _ = stream.delete_consumer(&name).await;
    Some(pending)
}

async fn bucket_keys(js: &jetstream::Context, bucket: &str) -> Option<u64> {
    let store = js.get_key_value(bucket).await.ok()?;
    let keys = store.keys().await.ok()?;
    let n = keys
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .ok()?;
    Some(n)
}

/// Routes paused or with an open circuit, from the `/metrics` text at `url`.
async fn routes_from_metrics(url: &str) -> Result<Vec<RouteStatus>, String> {
    let text = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(parse_routes(&text))
}

/// The routes the `/metrics` text shows paused or with an open circuit.
pub fn parse_routes(text: &str) -> Vec<RouteStatus> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if value.trim() != "1" {
            continue;
        }
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let state = match name {
            n if n == m::ROUTE_PAUSED => "paused",
            n if n == m::ROUTE_CIRCUIT_OPEN => "circuit_open",
            _ => continue,
        };
        let label = |key: &str| {
            labels
                .trim_end_matches('}')
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        out.push(RouteStatus {
            provider: label("provider").unwrap_or_default(),
            model: label("model").unwrap_or_default(),
            state: state.to_owned(),
            reason: label("reason"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_paused_or_down_are_read_from_metrics_text() {
        let text = "batchd_route_paused{provider=\"openai\",model=\"a\"} 0\n\
                    batchd_route_paused{provider=\"openai\",model=\"b\"} 1\n\
                    batchd_route_circuit_open{provider=\"openai\",model=\"c\",reason=\"unauthorized\"} 1\n\
                    batchd_route_circuit_open{provider=\"openai\",model=\"c\",reason=\"unavailable\"} 0\n";
        let routes = parse_routes(text);
        assert_eq!(routes.len(), 2);
        assert_eq!(
            (routes[0].model.as_str(), routes[0].state.as_str()),
            ("b", "paused")
        );
        assert_eq!(routes[1].reason.as_deref(), Some("unauthorized"));
    }
}
