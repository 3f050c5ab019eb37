//! The configuration: one typed tree, loaded from `config/batchd.toml`'s
//! defaults merged with the user's file, then validated with errors that name
//! the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use batchd_actors::backoff::RetryPolicy;
use batchd_actors::batching::BatchPolicy;
use batchd_actors::budgets::{Budget, Budgets, OnExceeded};
use batchd_actors::clock::Clock;
use batchd_actors::codec::ReplyPolicy;
use batchd_actors::offpeak::{OffPeak, Window};
use batchd_actors::preemption_monitor::PreemptionSettings;
use batchd_actors::pricing::PriceTable;
use batchd_actors::route::{CircuitSettings, RouteSettings};
use batchd_actors::route_policy::{FlexFallback, RoutePolicy, TierOptions};
use batchd_actors::routing::{BatchProviders, Catalog, TaskType, TierModels};
use batchd_actors::settings::{
    BatchApiSettings, EngineSettings, LedgerSettings, RestartPolicy, RouteLimits,
};
use batchd_actors::task::{Priority, Tier};
use serde::Deserialize;

/// The defaults, documented key by key.
pub const DEFAULT_CONFIG: &str = include_str!("../config/batchd.toml");

/// Errors loading or validating the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or a key has the wrong type.
    #[error("parsing {origin}: {message}")]
    Parse {
        /// The file or "defaults".
        origin: String,
        /// The parser's message (it names the key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NATS connection and topology.
    pub nats: NatsConfig,
    /// Consumers and validation limits.
    pub intake: IntakeConfig,
    /// Batch sealing per priority.
    pub batching: BatchingConfig,
    /// Attempts and backoff.
    pub retry: RetryPolicy,
    /// Provider request behaviour.
    pub dispatch: DispatchConfig,
    /// Restart limits.
    pub supervisor: RestartPolicy,
    /// Prometheus exporter.
    pub metrics: MetricsConfig,
    /// Providers by name (OpenAI-compatible or Anthropic).
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Tier → model.
    pub tiers: TierModels,
    /// The ledger's flush and clock.
    pub ledger: LedgerConfig,
    /// Tenant budgets.
    pub budgets: BudgetsConfig,
    /// Dated price table.
    pub prices: PriceTable,
    /// Task types by name.
    pub task_types: BTreeMap<String, TaskType>,
    /// Off-peak windows.
    pub offpeak: OffPeakConfig,
    /// Preemption of bulk batches for priority 1.
    pub preemption: PreemptionConfig,
    /// Service targets per priority.
    pub targets: TargetsConfig,
    /// Exact-duplicate requests answered by one call.
    pub dedupe: DedupeConfig,
    /// Prompt-cache warm-up of realtime batches.
    pub caching: CachingConfig,
}

/// `[caching]`: a group of tasks sharing a long prompt prefix sends one
/// request ahead to warm the provider's prompt cache, then the rest.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachingConfig {
    /// On by default.
    pub enabled: bool,
    /// Seconds a prefix stays warm on its route after an answer.
    pub warm_ttl_secs: u64,
    /// Shortest shared prefix worth a warm-up, in tokens (four characters each).
    pub min_prefix_tokens: u64,
    /// Seconds the rest of a group waits for its first request at most.
    pub warm_wait_secs: u64,
}

/// `[dedupe]`: identical requests (same route and rendered body) share one
/// realtime call while it is in flight and for `window_ms` after its answer,
/// and one line of a provider batch job.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// Off by default.
    pub enabled: bool,
    /// Milliseconds an answered call keeps serving duplicates.
    pub window_ms: u64,
}

/// `[targets]`: the time each priority's tasks should take at most,
/// publish to outcome (`batchd_priority_target_ratio` measures against it).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsConfig {
    /// Seconds, priority 1.
    pub p1_secs: u64,
    /// Seconds, priority 2.
    pub p2_secs: u64,
    /// Seconds, priority 3.
    pub p3_secs: u64,
}

/// `[preemption]`: bulk batches paused while priority-1 calls wait at their route.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreemptionConfig {
    /// Off: bulk batches are never paused (priority 1 stays first at the route).
    pub enabled: bool,
    /// Milliseconds a route must have had no priority-1 call waiting before
    /// its preempted batches resume.
    pub resume_after_ms: u64,
    /// Milliseconds between the monitor's looks when nothing signals it.
    pub interval_ms: u64,
    /// After a restart, milliseconds a batch preempted by the earlier
    /// process waits for the rest of its redelivered tasks once the first
    /// is back.
    pub recover_wait_ms: u64,
}

/// `[offpeak]`: daily UTC windows outside which some priorities' work waits
/// in JetStream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffPeakConfig {
    /// `HH:MM-HH:MM` in UTC, end exclusive, may wrap midnight; none: off.
    pub windows: Vec<String>,
    /// Priorities (1-3) whose work is released only inside a window.
    pub priorities: Vec<u8>,
    /// Multiplier on the cost of tasks released inside a window.
    pub price_multiplier: f64,
    /// A task whose deadline falls before the next opening plus this many
    /// seconds is released at once.
    pub release_margin_secs: u64,
    /// Shifts the engine's wall clock for deadlines and windows (drills and
    /// tests only; 0 in production).
    pub clock_offset_secs: i64,
}

impl OffPeakConfig {
    /// The engine's off-peak settings; `Err` names the bad value.
    pub fn settings(&self) -> Result<OffPeak, (String, String)> {
        let mut windows = Vec::with_capacity(self.windows.len());
        for w in &self.windows {
            windows.push(
                w.parse::<Window>()
                    .map_err(|e| ("offpeak.windows".to_owned(), e.to_string()))?,
            );
        }
        let mut priorities = [false; 3];
        for n in &self.priorities {
            let p = Priority::from_number(i64::from(*n)).ok_or_else(|| {
                (
                    "offpeak.priorities".to_owned(),
                    format!("{n} is not a priority (1, 2 or 3)"),
                )
            })?;
            priorities[p.index()] = true;
        }
        if !(self.price_multiplier.is_finite() && self.price_multiplier > 0.0) {
            return Err((
                "offpeak.price_multiplier".to_owned(),
                "must be a positive number".to_owned(),
            ));
        }
        Ok(OffPeak {
            windows,
            priorities,
            price_multiplier: self.price_multiplier,
            release_margin: Duration::from_secs(self.release_margin_secs),
        })
    }

    /// The engine's clock: the system's, shifted by `clock_offset_secs`.
    pub fn clock(&self) -> Clock {
        if self.clock_offset_secs == 0 {
            Clock::system()
        } else {
            Clock::offset(chrono::Duration::seconds(self.clock_offset_secs))
        }
    }
}

/// `[nats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL.
    pub url: String,
    /// First subject token.
    pub subject_prefix: String,
    /// Tasks stream name.
    pub tasks_stream: String,
    /// Results stream name.
    pub results_stream: String,
    /// Dead-letter stream name.
    pub dlq_stream: String,
    /// Checkpoints KV bucket.
    pub checkpoints_bucket: String,
    /// KV bucket of provider batch jobs in progress.
    pub jobs_bucket: String,
    /// Ledger KV bucket (daily totals).
    pub ledger_bucket: String,
    /// KV bucket of call records.
    pub calls_bucket: String,
    /// KV bucket of the attempts each retried task has spent.
    pub attempts_bucket: String,
    /// KV bucket where each replica publishes the state of its routes.
    pub routes_bucket: String,
    /// KV bucket of ownership records (claims on calls in flight).
    pub owners_bucket: String,
    /// This replica's name in the routes bucket; empty: `<hostname>-<pid>`.
    pub replica: String,
    /// Seconds between writes of an unchanged route's state (a change is
    /// written at once); entries not refreshed for 3 times this age out.
    pub routes_refresh_secs: u64,
    /// Tasks stream message bound.
    pub tasks_max_msgs: i64,
    /// Tasks stream byte bound.
    pub tasks_max_bytes: i64,
    /// Duplicate window, seconds.
    pub duplicate_window_secs: u64,
    /// Results retention, days.
    pub results_max_age_days: u64,
    /// DLQ retention, days.
    pub dlq_max_age_days: u64,
    /// Durable consumer name prefix.
    pub consumer_prefix: String,
    /// Copies of every stream and KV bucket batchd creates (1 on a single
    /// server, 3 on a cluster).
    pub replicas: usize,
    /// `[nats.auth]`: how batchd proves who it is.
    #[serde(default)]
    pub auth: NatsAuth,
    /// `[nats.tls]`: TLS with a custom CA and a client certificate.
    #[serde(default)]
    pub tls: NatsTls,
}

/// `[ledger]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Flush interval, milliseconds.
    pub flush_ms: u64,
    /// RFC 3339 start of the ledger's clock; empty: now.
    pub clock_start: String,
}

/// `[budgets]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// Seconds a held task waits before it is looked at again.
    pub hold_recheck_secs: u64,
    /// What happens per priority.
    pub on_exceeded: OnExceededConfig,
    /// Limits of a tenant without its own.
    pub default: Budget,
    /// Limits per tenant.
    pub tenants: BTreeMap<String, Budget>,
}

/// `[budgets.on_exceeded]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnExceededConfig {
    /// Premium.
    pub p1: OnExceeded,
    /// Standard.
    pub p2: OnExceeded,
    /// Bulk.
    pub p3: OnExceeded,
}

/// `[nats.auth]`: at most one way to authenticate (a URL's own
/// `user:password@` also works). Secrets are never printed, `Debug` included.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    /// A credentials file (JWT and NKey seed), as `nsc` writes it.
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
    /// A token.
    pub token: Option<String>,
}

impl NatsConfig {
    /// This replica's name: `replica`, or `<hostname>-<pid>` when empty.
    pub fn replica_name(&self) -> String {
        let name = self.replica.trim();
        if !name.is_empty() {
            return name.to_owned();
        }
        format!("{}-{}", hostname(), std::process::id())
    }

    /// How long a route state lives in the routes bucket unless refreshed:
    /// three refreshes, so a replica that died leaves no entry behind.
    pub fn routes_max_age(&self) -> Duration {
        Duration::from_secs(self.routes_refresh_secs.saturating_mul(3))
    }

    /// Bounds the tasks stream to the room `tasks` bodies need (16 KiB each,
    /// 64 MiB at least, never above the configured bound): a run of known
    /// size (the demo, a benchmark) reserves no more of a server's store.
    pub fn size_tasks_for(&mut self, tasks: u64) {
        let bytes = i64::try_from(tasks.saturating_mul(16 * 1024)).unwrap_or(i64::MAX);
        self.tasks_max_bytes =
            bytes.clamp((64 << 20).min(self.tasks_max_bytes), self.tasks_max_bytes);
    }
}

impl NatsAuth {
    /// How batchd authenticates, for messages: never a secret.
    pub fn describe(&self) -> String {
        if let Some(p) = &self.creds_file {
            format!("the credentials file {}", p.display())
        } else if let Some(p) = &self.nkey_seed_file {
            format!("the NKey seed in {}", p.display())
        } else if let Some(u) = &self.user {
            format!("user {u:?} with a password")
        } else if self.token.is_some() {
            "a token".into()
        } else {
            "no credentials".into()
        }
    }
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("NatsAuth")
            .field("creds_file", &self.creds_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .finish()
    }
}

/// `[nats.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    /// PEM file of batchd's client certificate (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key: Option<PathBuf>,
    /// Refuse a connection without TLS (implied by a `tls://` URL).
    #[serde(default)]
    pub required: bool,
}

/// The command line and environment for `[nats.auth]` and `[nats.tls]`,
/// with the nats CLI's variable names; each one given replaces the file's.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuthArgs {
    /// Credentials file (JWT + NKey seed).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an NKey seed.
    #[arg(long, env = "NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// User name (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// Password (prefer the environment variable to the flag).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// Token (prefer the environment variable to the flag).
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// CA certificate (PEM) to verify the server with.
    #[arg(long, env = "NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --nats-key.
    #[arg(long, env = "NATS_CERT")]
    pub nats_cert: Option<PathBuf>,
    /// Client certificate key (PEM).
    #[arg(long, env = "NATS_KEY")]
    pub nats_key: Option<PathBuf>,
}

impl NatsAuthArgs {
    /// Applies what was given: an authentication method given here replaces
    /// the file's (one method at a time), TLS files one by one.
    pub fn apply(&self, nats: &mut NatsConfig) {
        let a = &self;
        if a.nats_creds.is_some()
            || a.nats_nkey.is_some()
            || a.nats_user.is_some()
            || a.nats_token.is_some()
        {
            nats.auth = NatsAuth {
                creds_file: a.nats_creds.clone(),
                nkey_seed_file: a.nats_nkey.clone(),
                user: a.nats_user.clone(),
                password: a.nats_password.clone(),
                token: a.nats_token.clone(),
            };
        } else if a.nats_password.is_some() {
            nats.auth.password = a.nats_password.clone();
        }
        let tls = &mut nats.tls;
        for (to, from) in [
            (&mut tls.ca, &a.nats_ca),
            (&mut tls.cert, &a.nats_cert),
            (&mut tls.key, &a.nats_key),
        ] {
            if from.is_some() {
                *to = from.clone();
            }
        }
    }
}

/// `[intake]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeConfig {
    /// In-flight messages per priority.
    pub max_ack_pending: i64,
    /// Messages per pull request.
    pub fetch_batch: usize,
    /// Redelivery timeout, seconds.
    pub ack_wait_secs: u64,
    /// Largest task body.
    pub max_payload_bytes: usize,
    /// Backlog sampling interval.
    pub backlog_interval_ms: u64,
    /// Subject patterns a task's `reply_to` may match (`{prefix}` is
    /// `nats.subject_prefix`).
    pub reply_to_allow: Vec<String>,
    /// Tenant lanes pulled at once per priority (0: lanes off).
    pub max_lanes: usize,
    /// In-flight messages per tenant lane.
    pub lane_max_ack_pending: i64,
    /// How often the tasks stream's lane subjects are listed, ms.
    pub lane_discover_ms: u64,
}

/// `[batching]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Premium.
    pub p1: BatchPolicy,
    /// Standard.
    pub p2: BatchPolicy,
    /// Bulk.
    pub p3: BatchPolicy,
    /// Tasks that go by provider batch job.
    pub batch_api: BatchApiConfig,
}

/// `[batching.batch_api]`: provider batch jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchApiConfig {
    /// Tasks per job (before the file limits split it).
    pub max_size: usize,
    /// Longest a task waits for company before its job is submitted.
    pub max_wait_ms: u64,
    /// Submit at once when the queue has nothing more waiting.
    #[serde(default = "yes")]
    pub seal_when_drained: bool,
    /// The provider's completion window, seconds (OpenAI: 24 h).
    pub completion_window_secs: u64,
    /// An `auto` p3 task goes realtime when its deadline falls before now +
    /// completion window + this margin.
    pub deadline_margin_secs: u64,
    /// Requests per input file (OpenAI: at most 50,000).
    pub max_requests_per_file: usize,
    /// Bytes per input file (OpenAI: at most 200 MB).
    pub max_file_bytes: usize,
    /// First wait between two looks at a job, milliseconds.
    pub poll_initial_ms: u64,
    /// Longest wait between two looks, milliseconds (the wait doubles).
    pub poll_max_ms: u64,
    /// 0: priority 2 is realtime. Otherwise `auto` priority-2 work goes by
    /// batch job too, and a job of it still running after this many
    /// seconds is cancelled, its unanswered tasks sent realtime.
    #[serde(default)]
    pub p2_patience_secs: u64,
}

fn yes() -> bool {
    true
}

/// `[dispatch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// Ceiling of each route's adaptive concurrency.
    pub max_concurrency: usize,
    /// Where each route's concurrency starts.
    pub initial_concurrency: usize,
    /// Request timeout, seconds.
    pub request_timeout_secs: u64,
    /// Longest Retry-After honoured, seconds.
    pub max_retry_after_secs: u64,
    /// Seconds a task waits at a route whose circuit is open before it may
    /// be requeued at the back of its queue.
    pub park_after_secs: u64,
    /// Tasks that keep waiting at such a route; the rest are requeued.
    pub park_keep: usize,
    /// Shares of scarce route capacity for priorities 2 and 3 (priority 1 is strict).
    pub p2_weight: u32,
    /// See `p2_weight`.
    pub p3_weight: u32,
    /// `[dispatch.circuit]`.
    pub circuit: CircuitConfig,
    /// `[dispatch.limits.MODEL]`: configured rate budgets.
    #[serde(default)]
    pub limits: std::collections::BTreeMap<String, RouteLimits>,
    /// Outcome publish retry budget, seconds.
    pub publish_retry_secs: u64,
    /// Life of a replica's claim on a call in flight unless renewed, seconds.
    pub claim_ttl_secs: u64,
    /// When calls are claimed across replicas: `auto` (while another
    /// replica's heartbeat is seen) or `always`.
    #[serde(default)]
    pub claims: batchd_actors::peers::ClaimMode,
}

/// `[dispatch.circuit]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive transient failures that open a route's circuit.
    pub failure_threshold: u32,
    /// ... counted within this many seconds.
    pub window_secs: u64,
    /// First wait before a half-open probe, milliseconds (doubles per failed probe).
    pub probe_initial_ms: u64,
    /// Longest wait between probes, milliseconds.
    pub probe_max_ms: u64,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of `/metrics`, `/healthz` and `/readyz`.
    pub addr: String,
    /// Tenants with a `tenant` label of their own; later ones are `other`.
    pub max_tenants: usize,
}

/// `[providers.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The API it speaks.
    #[serde(default)]
    pub kind: ProviderKind,
    /// Base URL: including `/v1` for `openai`; without it for `anthropic`
    /// (`https://api.anthropic.com`, as the Anthropic SDK takes it).
    pub base_url: String,
    /// Environment variable overriding `base_url`; for `anthropic`,
    /// `ANTHROPIC_BASE_URL` unless given.
    #[serde(default)]
    pub base_url_env: Option<String>,
    /// API key (prefer `api_key_env`).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Environment variable holding the API key; for `anthropic`,
    /// `ANTHROPIC_API_KEY` unless given.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Models this provider serves.
    pub models: Vec<String>,
    /// The request field that carries the output limit: `max_completion_tokens`
    /// (OpenAI's current name, required by its reasoning models) or
    /// `max_tokens` (for servers that only know the older name).
    #[serde(default)]
    pub max_tokens_field: MaxTokensField,
    /// Whether bulk work may go to this provider's batch API (OpenAI's
    /// Batch API for kind `openai`, Message Batches for kind `anthropic`).
    #[serde(default)]
    pub batch: BatchUse,
    /// Whether priority-3 realtime tasks ask for `service_tier: "flex"`
    /// (kind `openai` only).
    #[serde(default)]
    pub flex: bool,
    /// The models flex applies to (each one served by this provider);
    /// empty: all of them.
    #[serde(default)]
    pub flex_models: Vec<String>,
    /// Where a flex call refused with 429 `resource_unavailable` goes.
    #[serde(default)]
    pub flex_fallback: FlexFallback,
    /// How long a flex call may take, seconds (flex answers slowly).
    #[serde(default = "default_flex_timeout_secs")]
    pub flex_timeout_secs: u64,
    /// Whether priority-1 tasks ask for `service_tier: "priority"` (kind
    /// `openai` only; the account must have priority processing).
    #[serde(default)]
    pub priority_tier_p1: bool,
}

fn default_flex_timeout_secs() -> u64 {
    900
}

impl ProviderConfig {
    /// The service tiers this provider offers, for the route policy.
    pub fn tier_options(&self) -> TierOptions {
        TierOptions {
            flex: self.flex,
            flex_models: self.flex_models.clone(),
            flex_fallback: self.flex_fallback,
            flex_timeout: Duration::from_secs(self.flex_timeout_secs),
            priority_p1: self.priority_tier_p1,
        }
    }
}

/// `[providers.NAME] batch`: `true`, `false` or `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BatchUseValue")]
pub enum BatchUse {
    /// Ask the provider at start: on when it lists its batch jobs, off when
    /// it has no such endpoint.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl BatchUse {
    /// Whether batch jobs may be used at all (on, or auto).
    pub fn allowed(self) -> bool {
        self != BatchUse::Off
    }
}

impl From<bool> for BatchUse {
    fn from(on: bool) -> Self {
        if on {
            BatchUse::On
        } else {
            BatchUse::Off
        }
    }
}

/// What the file may say for [`BatchUse`].
#[derive(Deserialize)]
#[serde(untagged)]
enum BatchUseValue {
    Flag(bool),
    Word(String),
}

impl TryFrom<BatchUseValue> for BatchUse {
    type Error = String;

    fn try_from(v: BatchUseValue) -> Result<Self, Self::Error> {
        match v {
            BatchUseValue::Flag(on) => Ok(on.into()),
            BatchUseValue::Word(w) if w == "auto" => Ok(BatchUse::Auto),
            BatchUseValue::Word(w) => Err(format!("expected true, false or \"auto\", found {w:?}")),
        }
    }
}

/// See [`ProviderConfig::kind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI's Chat Completions (`{base_url}/chat/completions`, Bearer key).
    #[default]
    Openai,
    /// Anthropic's Messages (`{base_url}/v1/messages`, `x-api-key`).
    Anthropic,
}

impl ProviderKind {
    /// The environment variables (base URL, key) the provider's SDK reads,
    /// used when the section names none.
    fn sdk_env(self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            ProviderKind::Openai => (None, None),
            ProviderKind::Anthropic => (Some("ANTHROPIC_BASE_URL"), Some("ANTHROPIC_API_KEY")),
        }
    }
}

/// See [`ProviderConfig::max_tokens_field`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// `max_completion_tokens`.
    #[default]
    MaxCompletionTokens,
    /// `max_tokens`.
    MaxTokens,
}

impl ProviderConfig {
    /// The base URL after environment overrides, without a trailing slash.
    pub fn resolved_base_url(&self) -> String {
        let from_env = self
            .base_url_env
            .as_deref()
            .or(self.kind.sdk_env().0)
            .and_then(|v| std::env::var(v).ok())
            .filter(|v| !v.trim().is_empty());
        from_env
            .unwrap_or_else(|| self.base_url.clone())
            .trim_end_matches('/')
            .to_owned()
    }

    /// The API key after environment overrides.
    pub fn resolved_api_key(&self) -> Option<String> {
        self.api_key_env
            .as_deref()
            .or(self.kind.sdk_env().1)
            .and_then(|v| std::env::var(v).ok())
            .filter(|v| !v.trim().is_empty())
            .or_else(|| self.api_key.clone())
    }
}

impl Config {
    /// The defaults alone.
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::from_toml_str("", "defaults")
    }

    /// Defaults merged with a user file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Defaults merged with `text`, then validated.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let parse = |s: &str, origin: &str| {
            s.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
                origin: origin.to_owned(),
                message: e.to_string(),
            })
        };
        let mut base = parse(DEFAULT_CONFIG, "defaults")?;
        merge(&mut base, parse(text, origin)?);
        let config: Config =
            toml::Value::Table(base)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.to_owned(),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and cross-references.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                message,
            })
        };
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !token_ok(&self.nats.subject_prefix) {
            return bad(
                "nats.subject_prefix",
                "must be one subject token of [A-Za-z0-9_-]".into(),
            );
        }
        for (key, name) in [
            ("nats.tasks_stream", &self.nats.tasks_stream),
            ("nats.results_stream", &self.nats.results_stream),
            ("nats.dlq_stream", &self.nats.dlq_stream),
            ("nats.checkpoints_bucket", &self.nats.checkpoints_bucket),
            ("nats.jobs_bucket", &self.nats.jobs_bucket),
            ("nats.ledger_bucket", &self.nats.ledger_bucket),
            ("nats.calls_bucket", &self.nats.calls_bucket),
            ("nats.attempts_bucket", &self.nats.attempts_bucket),
            ("nats.routes_bucket", &self.nats.routes_bucket),
            ("nats.owners_bucket", &self.nats.owners_bucket),
            ("nats.consumer_prefix", &self.nats.consumer_prefix),
        ] {
            if !token_ok(name) {
                return bad(key, format!("{name:?} must be non-empty [A-Za-z0-9_-]"));
            }
        }
        if self.nats.tasks_max_msgs < 1 || self.nats.tasks_max_bytes < 1 {
            return bad(
                "nats.tasks_max_msgs",
                "the tasks stream must be bounded (> 0)".into(),
            );
        }
        if self.nats.routes_refresh_secs < 1 {
            return bad("nats.routes_refresh_secs", "must be at least 1".into());
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return bad(
                "nats.replicas",
                format!(
                    "is {}; JetStream keeps 1 to 5 copies (3 on a 3-node cluster)",
                    self.nats.replicas
                ),
            );
        }
        if self.nats.duplicate_window_secs < 1 {
            return bad("nats.duplicate_window_secs", "must be at least 1".into());
        }
        if self.intake.max_ack_pending < 1 {
            return bad("intake.max_ack_pending", "must be at least 1".into());
        }
        if self.intake.lane_max_ack_pending < 1 {
            return bad("intake.lane_max_ack_pending", "must be at least 1".into());
        }
        if self.intake.lane_discover_ms < 10 {
            return bad("intake.lane_discover_ms", "must be at least 10".into());
        }
        if self.intake.fetch_batch < 1 {
            return bad("intake.fetch_batch", "must be at least 1".into());
        }
        if self.intake.ack_wait_secs < 1 {
            return bad("intake.ack_wait_secs", "must be at least 1".into());
        }
        let auth = &self.nats.auth;
        let methods = [
            auth.creds_file.is_some(),
            auth.nkey_seed_file.is_some(),
            auth.user.is_some(),
            auth.token.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return bad(
                "nats.auth",
                "give one of creds_file, nkey_seed_file, user (with password) or token".into(),
            );
        }
        if auth.user.is_some() != auth.password.is_some() {
            return bad("nats.auth.password", "user and password go together".into());
        }
        if self.nats.tls.cert.is_some() != self.nats.tls.key.is_some() {
            return bad(
                "nats.tls.cert",
                "a client certificate needs its key (nats.tls.key), and a key its certificate"
                    .into(),
            );
        }
        if let Err(e) = self.reply_policy() {
            return bad("intake.reply_to_allow", e);
        }
        if self.intake.max_payload_bytes < 64 {
            return bad("intake.max_payload_bytes", "must be at least 64".into());
        }
        for (p, b) in [
            ("p1", &self.batching.p1),
            ("p2", &self.batching.p2),
            ("p3", &self.batching.p3),
        ] {
            if b.max_size < 1 {
                return bad(
                    &format!("batching.{p}.max_size"),
                    "must be at least 1".into(),
                );
            }
            if b.depth_steps.iter().any(|step| step.size < 1) {
                return bad(
                    &format!("batching.{p}.depth_steps"),
                    "every step's size must be at least 1".into(),
                );
            }
        }
        let ba = &self.batching.batch_api;
        if ba.max_size < 1 {
            return bad("batching.batch_api.max_size", "must be at least 1".into());
        }
        if !(1..=50_000).contains(&ba.max_requests_per_file) {
            return bad(
                "batching.batch_api.max_requests_per_file",
                "must be 1 to 50000 (the Batch API's limit)".into(),
            );
        }
        if !(1024..=200 * 1024 * 1024).contains(&ba.max_file_bytes) {
            return bad(
                "batching.batch_api.max_file_bytes",
                "must be 1024 to 209715200 (200 MB, the Batch API's limit)".into(),
            );
        }
        if ba.completion_window_secs != 24 * 3600 {
            return bad(
                "batching.batch_api.completion_window_secs",
                "must be 86400: the Batch API offers only a 24h window".into(),
            );
        }
        if ba.p2_patience_secs >= self.targets.p2_secs {
            return bad(
                "batching.batch_api.p2_patience_secs",
                format!(
                    "must be below targets.p2_secs ({}): a cancelled job's tasks still go realtime after it",
                    self.targets.p2_secs
                ),
            );
        }
        if ba.poll_initial_ms < 1 || ba.poll_initial_ms > ba.poll_max_ms {
            return bad(
                "batching.batch_api.poll_initial_ms",
                "must be at least 1 and at most batching.batch_api.poll_max_ms".into(),
            );
        }
        if let Err((key, message)) = self.offpeak.settings() {
            return bad(&key, message);
        }
        if self.retry.max_attempts < 1 {
            return bad("retry.max_attempts", "must be at least 1".into());
        }
        if self.retry.base_delay_ms > self.retry.max_delay_ms {
            return bad(
                "retry.base_delay_ms",
                "must not exceed retry.max_delay_ms".into(),
            );
        }
        let d = &self.dispatch;
        if d.max_concurrency < 1 {
            return bad("dispatch.max_concurrency", "must be at least 1".into());
        }
        if d.initial_concurrency < 1 || d.initial_concurrency > d.max_concurrency {
            return bad(
                "dispatch.initial_concurrency",
                "must be between 1 and dispatch.max_concurrency".into(),
            );
        }
        if d.p2_weight < 1 || d.p3_weight < 1 {
            return bad(
                "dispatch.p2_weight",
                "p2_weight and p3_weight must be at least 1 (no priority is starved)".into(),
            );
        }
        if d.circuit.failure_threshold < 1 {
            return bad(
                "dispatch.circuit.failure_threshold",
                "must be at least 1".into(),
            );
        }
        if d.circuit.probe_initial_ms < 1 || d.circuit.probe_initial_ms > d.circuit.probe_max_ms {
            return bad(
                "dispatch.circuit.probe_initial_ms",
                "must be between 1 and dispatch.circuit.probe_max_ms".into(),
            );
        }
        for (model, l) in &d.limits {
            if l.rpm == Some(0) || l.tpm == Some(0) {
                return bad(
                    &format!("dispatch.limits.{model}"),
                    "rpm and tpm must be at least 1 when given".into(),
                );
            }
        }
        if self.dispatch.claim_ttl_secs < 3 {
            return bad(
                "dispatch.claim_ttl_secs",
                format!(
                    "is {}; it must be at least 3 (a claim is renewed every third of it)",
                    self.dispatch.claim_ttl_secs
                ),
            );
        }
        if self.dispatch.request_timeout_secs < 1 {
            return bad("dispatch.request_timeout_secs", "must be at least 1".into());
        }
        if self.dedupe.window_ms > 3_600_000 {
            return bad(
                "dedupe.window_ms",
                format!(
                    "is {}; it must be at most 3600000 (an hour)",
                    self.dedupe.window_ms
                ),
            );
        }
        if !(1..=3600).contains(&self.caching.warm_ttl_secs) {
            return bad(
                "caching.warm_ttl_secs",
                format!(
                    "is {}; it must be 1 to 3600 (providers keep a prefix minutes, not hours)",
                    self.caching.warm_ttl_secs
                ),
            );
        }
        if self.caching.min_prefix_tokens < 1 {
            return bad("caching.min_prefix_tokens", "must be at least 1".into());
        }
        if !(1..=600).contains(&self.caching.warm_wait_secs) {
            return bad(
                "caching.warm_wait_secs",
                format!("is {}; it must be 1 to 600", self.caching.warm_wait_secs),
            );
        }
        if self.providers.is_empty() {
            return bad("providers", "at least one provider is needed".into());
        }
        let served = self.model_providers();
        for (tier, model) in [
            ("tiers.simple", &self.tiers.simple),
            ("tiers.standard", &self.tiers.standard),
            ("tiers.complex", &self.tiers.complex),
        ] {
            if !served.contains_key(model) {
                return bad(
                    tier,
                    format!("model {model:?} is not in any provider's `models`"),
                );
            }
        }
        for (i, rule) in self.tiers.rules.iter().enumerate() {
            let key = |field: &str| format!("tiers.rules[{i}].{field}");
            if rule.tier == Tier::Auto {
                return bad(&key("tier"), "must be simple, standard or complex".into());
            }
            if let Some(t) = &rule.task_type {
                if !self.task_types.contains_key(t) {
                    return bad(
                        &key("task_type"),
                        format!("task type {t:?} is not in [task_types]"),
                    );
                }
            }
            if let (Some(min), Some(max)) = (rule.min_chars, rule.max_chars) {
                if min > max {
                    return bad(
                        &key("min_chars"),
                        format!("is {min}, above max_chars {max}"),
                    );
                }
            }
        }
        let classifier = &self.tiers.classifier;
        if !classifier.model.is_empty() && !served.contains_key(&classifier.model) {
            return bad(
                "tiers.classifier.model",
                format!(
                    "model {:?} is not in any provider's `models`",
                    classifier.model
                ),
            );
        }
        if classifier.instructions.trim().is_empty() {
            return bad("tiers.classifier.instructions", "must not be empty".into());
        }
        if !(1..=1_000_000).contains(&classifier.max_prompt_chars) {
            return bad(
                "tiers.classifier.max_prompt_chars",
                format!(
                    "is {}; it must be 1 to 1000000",
                    classifier.max_prompt_chars
                ),
            );
        }
        if !(1..=4096).contains(&classifier.max_completion_tokens) {
            return bad(
                "tiers.classifier.max_completion_tokens",
                format!(
                    "is {}; it must be 1 to 4096",
                    classifier.max_completion_tokens
                ),
            );
        }
        if classifier.cache_entries > 10_000_000 {
            return bad(
                "tiers.classifier.cache_entries",
                format!("is {}; it must be 0 to 10000000", classifier.cache_entries),
            );
        }
        if !(1..=600).contains(&classifier.timeout_secs) {
            return bad(
                "tiers.classifier.timeout_secs",
                format!("is {}; it must be 1 to 600", classifier.timeout_secs),
            );
        }
        for model in served.keys() {
            if !self.prices.models.contains_key(model) {
                return bad(
                    &format!("prices.models.\"{model}\""),
                    "every served model needs a price".into(),
                );
            }
        }
        for (name, p) in &self.providers {
            if !p.base_url.starts_with("http://") && !p.base_url.starts_with("https://") {
                return bad(
                    &format!("providers.{name}.base_url"),
                    "must be an http(s) URL".into(),
                );
            }
            if p.kind == ProviderKind::Anthropic {
                for (key, set) in [("flex", p.flex), ("priority_tier_p1", p.priority_tier_p1)] {
                    if set {
                        return bad(
                            &format!("providers.{name}.{key}"),
                            "applies to kind = \"openai\" only (OpenAI's service_tier)".into(),
                        );
                    }
                }
            }
            if let Some(m) = p.flex_models.iter().find(|m| !p.models.contains(m)) {
                return bad(
                    &format!("providers.{name}.flex_models"),
                    format!("\"{m}\" is not one of this provider's models"),
                );
            }
            if p.flex && !(1..=86_400).contains(&p.flex_timeout_secs) {
                return bad(
                    &format!("providers.{name}.flex_timeout_secs"),
                    "must be between 1 and 86400".into(),
                );
            }
            if p.kind == ProviderKind::Anthropic && p.max_tokens_field != MaxTokensField::default()
            {
                return bad(
                    &format!("providers.{name}.max_tokens_field"),
                    "applies to kind = \"openai\" only (Anthropic always takes max_tokens)".into(),
                );
            }
        }
        for (name, t) in &self.task_types {
            if t.max_tokens < 1 {
                return bad(
                    &format!("task_types.{name}.max_tokens"),
                    "must be at least 1".into(),
                );
            }
            if !t.template.contains("{text}") {
                return bad(
                    &format!("task_types.{name}.template"),
                    "must contain {text}".into(),
                );
            }
        }
        if !(1..=10_000).contains(&self.preemption.interval_ms) {
            return bad(
                "preemption.interval_ms",
                "must be between 1 and 10000".into(),
            );
        }
        if self.preemption.resume_after_ms > 3_600_000 {
            return bad(
                "preemption.resume_after_ms",
                "must be at most 3600000 (an hour)".into(),
            );
        }
        for (key, secs) in [
            ("targets.p1_secs", self.targets.p1_secs),
            ("targets.p2_secs", self.targets.p2_secs),
            ("targets.p3_secs", self.targets.p3_secs),
        ] {
            if !(1..=2_592_000).contains(&secs) {
                return bad(key, "must be between 1 and 2592000 (30 days)".into());
            }
        }
        if !(1..=600_000).contains(&self.preemption.recover_wait_ms) {
            return bad(
                "preemption.recover_wait_ms",
                "must be between 1 and 600000 (ten minutes)".into(),
            );
        }
        if !(1..=1000).contains(&self.ledger.flush_ms) {
            return bad("ledger.flush_ms", "must be between 1 and 1000".into());
        }
        if let Err(e) = self.ledger_clock_start() {
            return bad("ledger.clock_start", e);
        }
        if self.budgets.hold_recheck_secs < 1 {
            return bad("budgets.hold_recheck_secs", "must be at least 1".into());
        }
        let budgets = std::iter::once(("budgets.default".to_owned(), &self.budgets.default)).chain(
            self.budgets
                .tenants
                .iter()
                .map(|(t, b)| (format!("budgets.tenants.{t}"), b)),
        );
        for (key, b) in budgets {
            for (period, limit) in [("daily_usd", b.daily_usd), ("monthly_usd", b.monthly_usd)] {
                if limit.is_some_and(|l| !l.is_finite() || l < 0.0) {
                    return bad(
                        &format!("{key}.{period}"),
                        "must be a finite amount ≥ 0".into(),
                    );
                }
            }
        }
        let p = &self.prices;
        if !(0.0..=1.0).contains(&p.batch_discount) {
            return bad("prices.batch_discount", "must be between 0 and 1".into());
        }
        if !(p.priority_multiplier.is_finite() && p.priority_multiplier >= 1.0) {
            return bad(
                "prices.priority_multiplier",
                "must be a finite number of at least 1".into(),
            );
        }
        for (model, m) in &p.models {
            for (field, v) in [
                ("input", Some(m.input)),
                ("cached_input", Some(m.cached_input)),
                ("output", Some(m.output)),
                ("cache_write", m.cache_write),
            ] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return bad(
                        &format!("prices.models.\"{model}\".{field}"),
                        "must be a finite price ≥ 0 (USD per million tokens)".into(),
                    );
                }
            }
        }
        if self.metrics.addr.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "metrics.addr",
                format!("{:?} is not HOST:PORT", self.metrics.addr),
            );
        }
        Ok(())
    }

    /// Model → provider name (the first provider listing a model serves it).
    pub fn model_providers(&self) -> std::collections::HashMap<String, String> {
        let mut map = std::collections::HashMap::new();
        for (name, p) in &self.providers {
            for m in &p.models {
                map.entry(m.clone()).or_insert_with(|| name.clone());
            }
        }
        map
    }

    /// The label sets `/metrics` knows from the start: every configured
    /// route (provider, model), and the tenant cap.
    pub fn known_labels(&self) -> batchd_actors::metrics::KnownLabels {
        let routes = self
            .model_providers()
            .into_iter()
            .map(|(model, provider)| (provider, model))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let periods = |b: &Budget| {
            [("daily", b.daily_usd), ("monthly", b.monthly_usd)]
                .into_iter()
                .filter_map(|(p, limit)| limit.map(|_| p))
                .collect::<Vec<&'static str>>()
        };
        let budgets = std::iter::once((
            batchd_actors::metrics::DEFAULT_TENANT.to_owned(),
            periods(&self.budgets.default),
        ))
        .chain(
            self.budgets
                .tenants
                .iter()
                .map(|(t, b)| (t.clone(), periods(b))),
        )
        .filter(|(_, p)| !p.is_empty())
        .collect();
        batchd_actors::metrics::KnownLabels {
            routes,
            max_tenants: self.metrics.max_tenants,
            budgets,
        }
    }

    /// `ledger.clock_start`, read; `None` when empty.
    pub fn ledger_clock_start(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
        let s = self.ledger.clock_start.trim();
        if s.is_empty() {
            return Ok(None);
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&chrono::Utc)))
            .map_err(|e| format!("{s:?} is not an RFC 3339 instant: {e}"))
    }

    /// Tenant budgets as the engine applies them.
    pub fn budgets(&self) -> Budgets {
        let b = &self.budgets;
        Budgets {
            default: b.default,
            tenants: b.tenants.iter().map(|(t, v)| (t.clone(), *v)).collect(),
            on_exceeded: [b.on_exceeded.p1, b.on_exceeded.p2, b.on_exceeded.p3],
            hold_recheck: Duration::from_secs(b.hold_recheck_secs),
        }
    }

    /// The protocol's subjects under `nats.subject_prefix`.
    pub fn subjects(&self) -> crate::client::Subjects {
        crate::client::Subjects::of(&self.nats)
    }

    /// Which subjects a task's `reply_to` may name.
    pub fn reply_policy(&self) -> Result<ReplyPolicy, String> {
        ReplyPolicy::new(&self.nats.subject_prefix, &self.intake.reply_to_allow)
    }

    /// Route control shared by every route.
    pub fn route_settings(&self) -> RouteSettings {
        let d = &self.dispatch;
        RouteSettings {
            max_concurrency: d.max_concurrency,
            initial_concurrency: d.initial_concurrency,
            rpm: None,
            tpm: None,
            circuit: CircuitSettings {
                threshold: d.circuit.failure_threshold,
                window: Duration::from_secs(d.circuit.window_secs),
                initial_wait: Duration::from_millis(d.circuit.probe_initial_ms),
                max_wait: Duration::from_millis(d.circuit.probe_max_ms),
                ..CircuitSettings::default()
            },
            max_pause: Duration::from_secs(d.max_retry_after_secs),
            p2_weight: d.p2_weight,
            p3_weight: d.p3_weight,
        }
    }

    /// Turns every provider's batch jobs off: everything goes realtime
    /// (benchmarks of the realtime path).
    pub fn realtime_only(&mut self) {
        for p in self.providers.values_mut() {
            p.batch = BatchUse::Off;
        }
    }

    /// The part of the config the engine reads.
    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            catalog: Catalog {
                task_types: self.task_types.clone(),
                tiers: self.tiers.clone(),
                model_providers: self.model_providers(),
                batch_providers: BatchProviders::new(
                    self.providers
                        .iter()
                        .filter(|(_, p)| p.batch == BatchUse::On)
                        .map(|(name, _)| name.clone()),
                ),
                service_tiers: self
                    .providers
                    .iter()
                    .map(|(name, p)| (name.clone(), p.tier_options()))
                    .collect(),
                marks_cache_prefix: self
                    .providers
                    .iter()
                    .filter(|(_, p)| p.kind == ProviderKind::Anthropic)
                    .map(|(name, _)| name.clone())
                    .collect(),
                route_policy: RoutePolicy {
                    batch_window: Duration::from_secs(
                        self.batching.batch_api.completion_window_secs,
                    ),
                    deadline_margin: Duration::from_secs(
                        self.batching.batch_api.deadline_margin_secs,
                    ),
                    p2_patience: Some(self.batching.batch_api.p2_patience_secs)
                        .filter(|s| *s > 0)
                        .map(Duration::from_secs),
                },
            },
            batching: [
                self.batching.p1.clone(),
                self.batching.p2.clone(),
                self.batching.p3.clone(),
            ],
            retry: self.retry,
            prices: self.prices.clone(),
            max_payload_bytes: self.intake.max_payload_bytes,
            reply_to: self
                .reply_policy()
                .unwrap_or_else(|_| ReplyPolicy::default_for(&self.nats.subject_prefix)),
            route: self.route_settings(),
            route_limits: self
                .dispatch
                .limits
                .iter()
                .map(|(m, l)| (m.clone(), *l))
                .collect(),
            request_timeout: Duration::from_secs(self.dispatch.request_timeout_secs),
            claim_ttl: Duration::from_secs(self.dispatch.claim_ttl_secs),
            claims: self.dispatch.claims,
            park_after: Duration::from_secs(self.dispatch.park_after_secs.max(1)),
            park_keep: self.dispatch.park_keep,
            publish_retry: Duration::from_secs(self.dispatch.publish_retry_secs),
            lease_heartbeat: Duration::from_millis((self.intake.ack_wait_secs * 1000 / 3).max(100)),
            backlog_interval: Duration::from_millis(self.intake.backlog_interval_ms.max(100)),
            restart: self.supervisor,
            replica: self.nats.replica_name(),
            route_refresh: Duration::from_secs(self.nats.routes_refresh_secs),
            seed: 0x6261_7463_6864,
            budgets: self.budgets(),
            ledger: LedgerSettings {
                flush_every: Duration::from_millis(self.ledger.flush_ms),
                clock_start: self.ledger_clock_start().ok().flatten(),
            },
            // Validated at load; a config built otherwise gets no windows.
            offpeak: self.offpeak.settings().unwrap_or_default(),
            clock: self.offpeak.clock(),
            preemption: PreemptionSettings {
                enabled: self.preemption.enabled,
                resume_after: Duration::from_millis(self.preemption.resume_after_ms),
                interval: Duration::from_millis(self.preemption.interval_ms),
                recover_wait: Duration::from_millis(self.preemption.recover_wait_ms),
            },
            targets: batchd_actors::targets::ServiceTargets([
                Duration::from_secs(self.targets.p1_secs),
                Duration::from_secs(self.targets.p2_secs),
                Duration::from_secs(self.targets.p3_secs),
            ]),
            batch_api: self.batch_api_settings(),
            dedupe_window: self
                .dedupe
                .enabled
                .then(|| Duration::from_millis(self.dedupe.window_ms)),
            caching: batchd_actors::prompt_warmth::CachingSettings {
                enabled: self.caching.enabled,
                warm_ttl: Duration::from_secs(self.caching.warm_ttl_secs),
                min_prefix_tokens: self.caching.min_prefix_tokens,
                warm_wait: Duration::from_secs(self.caching.warm_wait_secs),
            },
        }
    }

    /// How provider batch jobs are assembled, split and polled.
    pub fn batch_api_settings(&self) -> BatchApiSettings {
        let b = &self.batching.batch_api;
        BatchApiSettings {
            batching: BatchPolicy {
                max_size: b.max_size,
                max_wait_ms: b.max_wait_ms,
                seal_when_drained: b.seal_when_drained,
                depth_steps: Vec::new(),
            },
            max_requests_per_file: b.max_requests_per_file,
            max_file_bytes: b.max_file_bytes,
            completion_window: "24h".into(),
            poll_initial: Duration::from_millis(b.poll_initial_ms),
            poll_max: Duration::from_millis(b.poll_max_ms),
        }
    }
}

/// The machine's name (Linux), else `$HOSTNAME`, else `batchd`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "batchd".to_owned())
}

/// Deep-merges `over` into `base`: tables key by key, anything else replaced.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.nats.subject_prefix, "batchd");
        assert_eq!(c.task_types.len(), 6);
        assert_eq!(c.batching.p1.max_size, 20);
        let depth = c.batching.p3.size_for(20_000);
        assert_eq!(depth, 100, "the seed's thresholds are the defaults");
        assert!(c.offpeak.windows.is_empty(), "off-peak is off by default");
    }

    #[test]
    fn the_replica_is_named_after_the_host_and_process_unless_configured() {
        let mut c = Config::defaults().unwrap();
        let name = c.nats.replica_name();
        assert!(
            name.ends_with(&format!("-{}", std::process::id())) && name.len() > 2,
            "{name}"
        );
        c.nats.replica = "eu-1".into();
        assert_eq!(c.nats.replica_name(), "eu-1");
        assert_eq!(c.nats.routes_max_age(), Duration::from_secs(15));
        let err = Config::from_toml_str("[nats]\nroutes_refresh_secs = 0\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("nats.routes_refresh_secs"),
            "{err}"
        );
    }

    #[test]
    fn one_copy_by_default_and_more_than_five_is_refused_naming_the_key() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.nats.replicas, 1);
        let three = Config::from_toml_str("[nats]\nreplicas = 3\n", "t").unwrap();
        assert_eq!(three.nats.replicas, 3);
        for bad in [0, 6] {
            let err =
                Config::from_toml_str(&format!("[nats]\nreplicas = {bad}\n"), "t").unwrap_err();
            assert!(err.to_string().contains("nats.replicas"), "{err}");
        }
    }

    #[test]
    fn preemption_is_on_by_default_and_its_keys_reach_the_engine() {
        let c = Config::defaults().unwrap();
        let p = c.engine_settings().preemption;
        assert!(p.enabled);
        assert_eq!(p.resume_after, Duration::from_millis(500));
        assert_eq!(p.recover_wait, Duration::from_secs(2));
        let c = Config::from_toml_str("[preemption]\nenabled = false\n", "t").unwrap();
        assert!(!c.engine_settings().preemption.enabled);
        let e = Config::from_toml_str("[preemption]\ninterval_ms = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("preemption.interval_ms"), "{e}");
        assert_eq!(
            c.engine_settings().targets,
            batchd_actors::targets::ServiceTargets::default(),
            "the documented defaults"
        );
        let e = Config::from_toml_str("[targets]\np2_secs = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("targets.p2_secs"), "{e}");
        let e = Config::from_toml_str("[preemption]\nrecover_wait_ms = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("preemption.recover_wait_ms"), "{e}");
    }

    #[test]
    fn a_user_file_overrides_only_its_keys() {
        let c = Config::from_toml_str("[batching.p3]\nmax_size = 7\n", "t").unwrap();
        assert_eq!(c.batching.p3.max_size, 7);
        assert_eq!(c.batching.p3.max_wait_ms, 1000);
    }

    #[test]
    fn claude_models_route_to_the_anthropic_provider_with_the_sdk_variables() {
        let c = Config::defaults().unwrap();
        let served = c.model_providers();
        assert_eq!(served["claude-3-5-haiku-latest"], "anthropic");
        assert_eq!(served["gpt-4.1-mini"], "openai");
        let p = &c.providers["anthropic"];
        assert_eq!(p.kind, ProviderKind::Anthropic);
        assert_eq!(c.providers["openai"].kind, ProviderKind::Openai);
        // A section of kind anthropic that names no variables reads the SDK's.
        let c = Config::from_toml_str(
            "[providers.claude]\nkind = \"anthropic\"\nbase_url = \"https://x\"\nmodels = []\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.providers["claude"].kind.sdk_env(),
            (Some("ANTHROPIC_BASE_URL"), Some("ANTHROPIC_API_KEY"))
        );
        let e =
            Config::from_toml_str("[providers.anthropic]\nkind = \"gemini\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("kind"), "{e}");
        let e = Config::from_toml_str(
            "[providers.anthropic]\nmax_tokens_field = \"max_tokens\"\n",
            "t",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("providers.anthropic.max_tokens_field"),
            "{e}"
        );
    }

    #[test]
    fn service_tier_keys_are_validated_by_name_and_reach_the_route_policy() {
        let c = Config::from_toml_str(
            "[providers.openai]\nflex = true\nflex_models = [\"gpt-5-mini\"]\n\
             flex_fallback = \"batch_api\"\nflex_timeout_secs = 1200\npriority_tier_p1 = true\n",
            "t",
        )
        .unwrap();
        let o = &c.engine_settings().catalog.service_tiers["openai"];
        assert!(o.flex && o.priority_p1 && o.flex_for("gpt-5-mini") && !o.flex_for("gpt-5"));
        assert_eq!(o.flex_fallback, FlexFallback::BatchApi);
        assert_eq!(o.flex_timeout, Duration::from_secs(1200));
        let defaults = &Config::defaults()
            .unwrap()
            .engine_settings()
            .catalog
            .service_tiers;
        assert!(defaults.values().all(|o| !o.flex && !o.priority_p1));
        for (toml, key) in [
            (
                "[providers.anthropic]\nflex = true\n",
                "providers.anthropic.flex",
            ),
            (
                "[providers.anthropic]\npriority_tier_p1 = true\n",
                "providers.anthropic.priority_tier_p1",
            ),
            (
                "[providers.openai]\nflex_models = [\"claude-opus-4-1\"]\n",
                "providers.openai.flex_models",
            ),
            (
                "[providers.openai]\nflex = true\nflex_timeout_secs = 0\n",
                "providers.openai.flex_timeout_secs",
            ),
            (
                "[providers.openai]\nflex_fallback = \"later\"\n",
                "flex_fallback",
            ),
            (
                "[prices]\npriority_multiplier = 0.5\n",
                "prices.priority_multiplier",
            ),
        ] {
            let e = Config::from_toml_str(toml, "t").unwrap_err();
            assert!(format!("{e:#}").contains(key), "{toml}: {e:#}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml_str("[tiers]\nsimple = \"nope\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("tiers.simple"), "{e}");
        let e = Config::from_toml_str(
            "[[tiers.rules]]\ntask_type = \"nope\"\ntier = \"complex\"\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("tiers.rules[0].task_type"), "{e}");
        for (toml, key) in [
            ("model = \"nope\"", "tiers.classifier.model"),
            ("instructions = \" \"", "tiers.classifier.instructions"),
            ("max_prompt_chars = 0", "tiers.classifier.max_prompt_chars"),
            (
                "max_completion_tokens = 0",
                "tiers.classifier.max_completion_tokens",
            ),
            ("cache_entries = 20000000", "tiers.classifier.cache_entries"),
            ("timeout_secs = 0", "tiers.classifier.timeout_secs"),
        ] {
            let e =
                Config::from_toml_str(&format!("[tiers.classifier]\n{toml}\n"), "t").unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        let e = Config::from_toml_str("[tiers.classifier]\nenable = true\n", "t").unwrap_err();
        assert!(
            e.to_string().contains("enable"),
            "unknown keys are named: {e}"
        );
        assert_eq!(
            Config::defaults().unwrap().tiers.classifier,
            batchd_actors::classifier::ClassifierConfig::default(),
            "config/batchd.toml gives the classifier's defaults"
        );
        let c = Config::from_toml_str("[tiers.classifier]\nenabled = true\n", "t").unwrap();
        let tiers = &c.engine_settings().catalog.tiers;
        assert!(tiers.classifier.enabled);
        assert_eq!(
            tiers.classifier.model(tiers),
            tiers.simple,
            "the simple tier's model by default"
        );
        let e = Config::from_toml_str("[[tiers.rules]]\ntier = \"auto\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("tiers.rules[0].tier"), "{e}");
        let e = Config::from_toml_str(
            "[[tiers.rules]]\npattern = \"(\"\ntier = \"complex\"\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid pattern"), "{e}");
        assert!(e.to_string().contains("tiers.rules"), "{e}");
        let e = Config::from_toml_str("[dedupe]\nwindow_ms = 3600001\n", "t").unwrap_err();
        assert!(e.to_string().contains("dedupe.window_ms"), "{e}");
        for (text, key) in [
            ("[caching]\nwarm_ttl_secs = 0\n", "caching.warm_ttl_secs"),
            (
                "[caching]\nmin_prefix_tokens = 0\n",
                "caching.min_prefix_tokens",
            ),
            (
                "[caching]\nwarm_wait_secs = 601\n",
                "caching.warm_wait_secs",
            ),
        ] {
            let e = Config::from_toml_str(text, "t").unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = Config::from_toml_str("[intake]\nmax_ack_pending = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("intake.max_ack_pending"), "{e}");
        let e = Config::from_toml_str("[intake]\nbogus = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml_str("[offpeak]\nwindows = [\"25:00-01:00\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("offpeak.windows"), "{e}");
        let e = Config::from_toml_str("[offpeak]\npriorities = [4]\n", "t").unwrap_err();
        assert!(e.to_string().contains("offpeak.priorities"), "{e}");
        let e = Config::from_toml_str("[retry]\nmax_attempts = \"x\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("max_attempts"), "{e}");
    }

    #[test]
    fn batch_api_keys_are_validated_by_name_and_reach_the_engine() {
        for (toml, key) in [
            (
                "[batching.batch_api]\nmax_requests_per_file = 50001\n",
                "batching.batch_api.max_requests_per_file",
            ),
            (
                "[batching.batch_api]\nmax_file_bytes = 300_000_000\n",
                "batching.batch_api.max_file_bytes",
            ),
            (
                "[batching.batch_api]\ncompletion_window_secs = 3600\n",
                "batching.batch_api.completion_window_secs",
            ),
            (
                "[batching.batch_api]\nmax_size = 0\n",
                "batching.batch_api.max_size",
            ),
            (
                "[batching.batch_api]\npoll_initial_ms = 900_000\n",
                "batching.batch_api.poll_initial_ms",
            ),
            (
                "[batching.batch_api]\np2_patience_secs = 3600\n",
                "batching.batch_api.p2_patience_secs",
            ),
        ] {
            let e = Config::from_toml_str(toml, "t").unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        let c = Config::defaults().unwrap();
        assert_eq!(
            c.providers["openai"].batch,
            BatchUse::Auto,
            "batch jobs are used where the provider has them"
        );
        assert!(
            !c.engine_settings()
                .catalog
                .batch_providers
                .contains("openai"),
            "auto providers take batch jobs only once their probe answered"
        );
        let e = Config::from_toml_str("[providers.openai]\nbatch = \"yes\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        for (text, want) in [
            ("true", BatchUse::On),
            ("false", BatchUse::Off),
            ("\"auto\"", BatchUse::Auto),
        ] {
            let c = Config::from_toml_str(&format!("[providers.openai]\nbatch = {text}\n"), "t")
                .unwrap();
            assert_eq!(c.providers["openai"].batch, want, "{text}");
        }
        let c = Config::from_toml_str(
            "[providers.openai]\nbatch = true\n[batching.batch_api]\ndeadline_margin_secs = 60\n",
            "t",
        )
        .unwrap();
        let s = c.engine_settings();
        assert!(s.catalog.batch_providers.contains("openai"));
        assert_eq!(
            s.catalog.route_policy.deadline_margin,
            Duration::from_secs(60)
        );
        assert_eq!(s.batch_api.max_requests_per_file, 50_000);
        assert_eq!(s.batch_api.batching.max_size, 5_000);
    }
}
