//! What `batchd status` reads, from NATS alone (so it works from any
//! machine that reaches the server): per priority the tasks waiting, in
//! flight and the age of the oldest; dead letters in the last hour; every
//! replica's routes from the routes bucket (which are paused or down, and
//! until when); the checkpoints of preempted batches; the entries of the
//! attempt bucket.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use batchd_actors::ports::Checkpoint;
use batchd_actors::route::{ReplicaHeartbeat, RouteCondition, RouteState};
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

/// A replica seen in the routes bucket: by its heartbeat, its routes, or both.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    /// Its name (`nats.replica`, or `<hostname>-<pid>`).
    pub replica: String,
    /// Routes it publishes.
    pub routes: usize,
    /// Of those, paused or with a circuit not closed.
    pub routes_down: usize,
    /// Its latest write.
    pub updated_at: DateTime<Utc>,
    /// What it holds, from its heartbeat (`None`: no heartbeat seen).
    pub holds: Option<ReplicaHeartbeat>,
}

/// One entry of the checkpoints bucket.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointEntry {
    /// Its key (the batch id).
    pub key: String,
    /// Seconds since it was written.
    pub age_secs: f64,
    /// What it records, when it is a checkpoint this batchd can read.
    pub batch: Option<CheckpointSummary>,
}

/// A preempted batch as its checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointSummary {
    /// `provider/model`.
    pub route: String,
    /// 2 or 3.
    pub priority: u8,
    /// Tasks finished when it was preempted.
    pub finished: usize,
    /// Tasks in the batch.
    pub tasks: usize,
}

impl From<&Checkpoint> for CheckpointSummary {
    fn from(c: &Checkpoint) -> Self {
        CheckpointSummary {
            route: format!("{}/{}", c.provider, c.model),
            priority: c.priority,
            finished: c.finished.len(),
            tasks: c.finished.len() + c.remaining.len(),
        }
    }
}

/// The checkpoints bucket: preempted batches (and provider jobs) to resume.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoints {
    /// Entries in the bucket.
    pub count: u64,
    /// The oldest written first, at most [`CHECKPOINTS_LISTED`].
    pub entries: Vec<CheckpointEntry>,
}

/// A provider batch job in progress, as its record in the jobs bucket says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    /// The job id.
    pub id: String,
    /// `provider/model`.
    pub route: String,
    /// `recorded`, `uploaded` or `created`.
    pub step: String,
    /// The provider's batch id, once created.
    pub provider_batch_id: Option<String>,
    /// Tasks in the job.
    pub tasks: usize,
    /// Seconds since its record was last written.
    pub age_secs: f64,
}

/// How many checkpoints are listed (all are counted).
pub const CHECKPOINTS_LISTED: usize = 50;

/// How many route entries are read at most.
const ROUTES_READ: usize = 10_000;

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
    /// The checkpoint bucket (preempted batches and provider jobs in
    /// progress, once batchd writes them).
    pub checkpoints: Option<Checkpoints>,
    /// Provider batch jobs in progress (the jobs bucket), the oldest first.
    pub provider_jobs: Option<Vec<JobSummary>>,
    /// Tasks that have spent attempts on transient failures.
    pub tasks_with_attempts: Option<u64>,
    /// Every route state the replicas publish, by provider, model, replica;
    /// `None` when the routes bucket could not be read.
    pub routes: Option<Vec<RouteState>>,
    /// Why `routes` is missing.
    pub routes_error: Option<String>,
    /// The replicas that publish routes, by name.
    pub replicas: Vec<ReplicaStatus>,
    /// Spend today (UTC) from the ledger, USD: (exact, estimated).
    pub spend_today_usd: Option<(f64, f64)>,
}

impl Status {
    /// The routes that do not serve now: paused, circuit open or half-open.
    pub fn routes_down(&self) -> impl Iterator<Item = &RouteState> {
        self.routes
            .iter()
            .flatten()
            .filter(|r| r.state != RouteCondition::Open)
    }
}

/// Reads the status from NATS.
pub async fn read(client: &async_nats::Client, config: &Config) -> Status {
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
    let (routes, beats, routes_error) = match route_states(&js, &n.routes_bucket).await {
        Ok((r, b)) => (Some(r), b, None),
        Err(e) => (None, Vec::new(), Some(e)),
    };
    let replicas = replicas(routes.as_deref().unwrap_or_default(), beats);
    Status {
        at: Utc::now(),
        nats_url: n.url.clone(),
        priorities,
        dead_letters_last_hour: dead_letters_since(&js, &n.dlq_stream, Duration::from_secs(3600))
            .await,
        dead_letters_total: messages(n.dlq_stream.clone()).await,
        outcomes_total: messages(n.results_stream.clone()).await,
        checkpoints: checkpoints(&js, &n.checkpoints_bucket).await.ok(),
        provider_jobs: provider_jobs(&js, &n.jobs_bucket).await.ok(),
        tasks_with_attempts: bucket_keys(&js, &n.attempts_bucket).await,
        routes,
        routes_error,
        replicas,
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

/// Up to `limit` live entries of `bucket`, the oldest written first, and
/// how many there are.
async fn entries(
    js: &jetstream::Context,
    bucket: &str,
    limit: usize,
) -> Result<(u64, Vec<kv::Entry>), String> {
    let store = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("bucket {bucket}: {e}"))?;
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| format!("bucket {bucket}: {e}"))?
        .try_collect()
        .await
        .map_err(|e| format!("bucket {bucket}: {e}"))?;
    let mut out = Vec::new();
    for key in keys.iter().take(limit) {
        // A key removed since it was listed is skipped.
        if let Some(entry) = store
            .entry(key.as_str())
            .await
            .map_err(|e| format!("bucket {bucket}, key {key}: {e}"))?
            .filter(|e| e.operation == kv::Operation::Put)
        {
            out.push(entry);
        }
    }
    Ok((keys.len() as u64, out))
}

/// Every route state in `bucket`, by provider, model and replica; an entry
/// that is not a route state is skipped.
async fn route_states(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<(Vec<RouteState>, Vec<ReplicaHeartbeat>), String> {
    let (_, found) = entries(js, bucket, ROUTES_READ).await?;
    let (beats, found): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|e| e.key.starts_with("replica.") && e.key.split('.').count() == 2);
    let beats = beats
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    let mut routes: Vec<RouteState> = found
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    routes.sort_by(|a, b| {
        (&a.provider, &a.model, &a.replica).cmp(&(&b.provider, &b.model, &b.replica))
    });
    Ok((routes, beats))
}

/// The replicas seen in the routes bucket, by name: those with a heartbeat
/// and those publishing `routes`.
pub fn replicas(routes: &[RouteState], beats: Vec<ReplicaHeartbeat>) -> Vec<ReplicaStatus> {
    let mut by_name: std::collections::BTreeMap<String, ReplicaStatus> = Default::default();
    let empty = |replica: &str, updated_at| ReplicaStatus {
        replica: replica.to_owned(),
        routes: 0,
        routes_down: 0,
        updated_at,
        holds: None,
    };
    for b in beats {
        let seen = by_name
            .entry(b.replica.clone())
            .or_insert_with(|| empty(&b.replica, b.updated_at));
        seen.updated_at = seen.updated_at.max(b.updated_at);
        seen.holds = Some(b);
    }
    for r in routes {
        let seen = by_name
            .entry(r.replica.clone())
            .or_insert_with(|| empty(&r.replica, r.updated_at));
        seen.routes += 1;
        seen.routes_down += usize::from(r.state != RouteCondition::Open);
        seen.updated_at = seen.updated_at.max(r.updated_at);
    }
    by_name.into_values().collect()
}

/// How many keys of the jobs bucket are read (heads and task chunks).
const JOB_KEYS_READ: usize = 2_000;

async fn provider_jobs(js: &jetstream::Context, bucket: &str) -> Result<Vec<JobSummary>, String> {
    let (_, found) = entries(js, bucket, JOB_KEYS_READ).await?;
    let now = time::OffsetDateTime::now_utc();
    let mut jobs: Vec<JobSummary> = found
        .into_iter()
        .filter(|e| !e.key.contains('.'))
        .filter_map(|e| {
            let head: crate::nats::JobHead = serde_json::from_slice(&e.value).ok()?;
            let text = |k: &str| head.job.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            Some(JobSummary {
                id: e.key.clone(),
                route: format!("{}/{}", text("provider")?, text("model")?),
                step: text("step")?,
                provider_batch_id: text("provider_batch_id"),
                tasks: head.task_count,
                age_secs: (now - e.created).as_seconds_f64().max(0.0),
            })
        })
        .collect();
    jobs.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
    Ok(jobs)
}

async fn checkpoints(js: &jetstream::Context, bucket: &str) -> Result<Checkpoints, String> {
    let (count, found) = entries(js, bucket, CHECKPOINTS_LISTED).await?;
    let now = time::OffsetDateTime::now_utc();
    let entries = found
        .into_iter()
        .map(|e| CheckpointEntry {
            age_secs: (now - e.created).as_seconds_f64().max(0.0),
            batch: serde_json::from_slice::<Checkpoint>(&e.value)
                .ok()
                .map(|c| CheckpointSummary::from(&c)),
            key: e.key,
        })
        .collect();
    Ok(Checkpoints { count, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchd_actors::route::RouteStatus;
    use chrono::TimeZone as _;

    fn route(replica: &str, model: &str, paused: bool, secs: i64) -> RouteState {
        let at = Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap();
        let status = RouteStatus {
            paused_until: paused.then(|| at + chrono::TimeDelta::seconds(3)),
            ..RouteStatus::open(at, 8)
        };
        RouteState::new(replica, "openai", model, &status)
    }

    #[test]
    fn replicas_are_counted_from_their_routes() {
        let routes = [
            route("b", "m1", false, 5),
            route("a", "m1", true, 1),
            route("a", "m2", false, 9),
        ];
        let seen = replicas(&routes, Vec::new());
        assert_eq!(seen.len(), 2);
        assert_eq!(
            (
                seen[0].replica.as_str(),
                seen[0].routes,
                seen[0].routes_down
            ),
            ("a", 2, 1)
        );
        assert_eq!(seen[0].updated_at, routes[2].updated_at, "the latest write");
        assert_eq!((seen[1].routes, seen[1].routes_down), (1, 0));
    }

    fn beat(replica: &str, held: usize) -> ReplicaHeartbeat {
        let at = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        ReplicaHeartbeat {
            replica: replica.into(),
            started_at: at,
            messages_held: held,
            calls_in_flight: 3,
            calls_waiting: 1,
            batches: 2,
            preempted_batches: 0,
            routes: 1,
            updated_at: at,
        }
    }

    #[test]
    fn a_replica_with_a_heartbeat_and_no_route_is_listed_with_what_it_holds() {
        let seen = replicas(
            &[route("a", "m1", false, 5)],
            vec![beat("a", 40), beat("idle", 0)],
        );
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].routes, 1);
        assert_eq!(seen[0].holds.as_ref().unwrap().messages_held, 40);
        assert_eq!(seen[1].replica, "idle");
        assert_eq!(seen[1].routes, 0);
        assert!(seen[1].holds.is_some());
    }
}
