//! The engine's settings: the part of the config the actors read.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::RetryPolicy;
use crate::batching::BatchPolicy;
use crate::budgets::Budgets;
use crate::clock::Clock;
use crate::codec::ReplyPolicy;
use crate::offpeak::OffPeak;
use crate::preemption_monitor::PreemptionSettings;
use crate::pricing::PriceTable;
use crate::route::RouteSettings;
use crate::routing::Catalog;
use crate::task::{Priority, RouteKind};

/// One-for-one restart limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed inside the window before the engine shuts down.
    pub max_restarts: u32,
    /// The window, in seconds.
    pub within_secs: u64,
}

/// Everything the actors need to know.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Task types, tiers and served models.
    pub catalog: Catalog,
    /// Batch sealing per priority, indexed by [`Priority::index`].
    pub batching: [BatchPolicy; 3],
    /// Attempts and backoff.
    pub retry: RetryPolicy,
    /// Prices.
    pub prices: PriceTable,
    /// Largest accepted task body.
    pub max_payload_bytes: usize,
    /// Which subjects a task's `reply_to` may name.
    pub reply_to: ReplyPolicy,
    /// Route control shared by every route: concurrency bounds, circuit,
    /// priority weights, longest pause honoured.
    pub route: RouteSettings,
    /// Rate budgets configured per model (requests and tokens per minute);
    /// a model without one learns its budget from the provider's headers.
    pub route_limits: HashMap<String, RouteLimits>,
    /// Provider request timeout.
    pub request_timeout: Duration,
    /// How long this replica's claim on a task's call lives unless renewed
    /// (it is renewed every third of it while the call lasts); a replica
    /// that dies blocks that task elsewhere for at most this long.
    pub claim_ttl: Duration,
    /// When calls are claimed across replicas: while another replica is
    /// seen (`Auto`), or always.
    pub claims: crate::peers::ClaimMode,
    /// How long a task waits at a route whose circuit is open before it may
    /// be requeued at the back of its queue.
    pub park_after: Duration,
    /// How many tasks keep waiting at such a route (the rest are requeued).
    pub park_keep: usize,
    /// How long to keep retrying a failed outcome publish before handing the task back.
    pub publish_retry: Duration,
    /// Heartbeat interval for held messages (a third of ack_wait is safe).
    pub lease_heartbeat: Duration,
    /// How often queue depth is sampled.
    pub backlog_interval: Duration,
    /// Supervisor restart limits.
    pub restart: RestartPolicy,
    /// This replica's name on the route board.
    pub replica: String,
    /// How often each route's state is written to the route board when
    /// nothing changes (a change is written at once).
    pub route_refresh: Duration,
    /// Seed for retry jitter.
    pub seed: u64,
    /// Tenant budgets.
    pub budgets: Budgets,
    /// The ledger's flush and clock.
    pub ledger: LedgerSettings,
    /// Off-peak windows: which priorities wait for them, and their price.
    pub offpeak: OffPeak,
    /// Wall-clock time for deadlines and windows (injectable for tests).
    pub clock: Clock,
    /// When bulk batches are preempted for priority 1, and resumed.
    pub preemption: PreemptionSettings,
    /// Each priority's service target, publish to outcome.
    pub targets: crate::targets::ServiceTargets,
    /// Provider batch jobs: assembly, file limits, polling.
    pub batch_api: BatchApiSettings,
    /// How long after its answer a call still serves exact duplicates of
    /// its request; `None`: dedupe is off.
    pub dedupe_window: Option<Duration>,
    /// Prompt-cache warm-up of realtime batches.
    pub caching: crate::prompt_warmth::CachingSettings,
}

/// How provider batch jobs are assembled, split and polled.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchApiSettings {
    /// Size and wait of the batches that become jobs.
    pub batching: BatchPolicy,
    /// Most requests in one job's input file (OpenAI: 50,000).
    pub max_requests_per_file: usize,
    /// Most bytes in one job's input file (OpenAI: 200 MB).
    pub max_file_bytes: usize,
    /// The `completion_window` asked for (`24h`).
    pub completion_window: String,
    /// First wait between two looks at a job.
    pub poll_initial: Duration,
    /// Longest wait between two looks (the wait doubles up to it).
    pub poll_max: Duration,
}

impl Default for BatchApiSettings {
    fn default() -> Self {
        BatchApiSettings {
            batching: BatchPolicy {
                max_size: 1_000,
                max_wait_ms: 60_000,
                seal_when_drained: true,
                depth_steps: Vec::new(),
            },
            max_requests_per_file: 50_000,
            max_file_bytes: 200 * 1024 * 1024,
            completion_window: "24h".into(),
            poll_initial: Duration::from_secs(5),
            poll_max: Duration::from_secs(300),
        }
    }
}

/// How the CostAccountant keeps the ledger.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerSettings {
    /// How often counted calls are written to the daily totals (≤ 1 s).
    pub flush_every: Duration,
    /// Start the ledger's clock here instead of now (drills and tests that
    /// cross a UTC midnight without waiting for it).
    pub clock_start: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            flush_every: Duration::from_millis(500),
            clock_start: None,
        }
    }
}

/// A model's configured rate budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
}

impl EngineSettings {
    /// The route settings of one model: the shared ones plus its budget.
    pub fn route_settings(&self, model: &str) -> RouteSettings {
        let mut s = self.route;
        if let Some(l) = self.route_limits.get(model) {
            s.rpm = l.rpm;
            s.tpm = l.tpm;
        }
        s
    }

    /// The batch policy of one priority and route kind: batch-job tasks
    /// are assembled under `[batching.batch_api]` whatever their priority.
    pub fn batch_policy(&self, p: Priority, kind: RouteKind) -> &BatchPolicy {
        match kind {
            RouteKind::Realtime => &self.batching[p.index()],
            RouteKind::BatchApi => &self.batch_api.batching,
        }
    }
}
