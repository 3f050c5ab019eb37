//! `batchd sim`: a simulated OpenAI-compatible provider.
//!
//! It answers the Chat Completions API the way OpenAI does (request
//! validation, error bodies, usage with prompt caching, rate-limit headers
//! and 429s) with deterministic answers and configurable latency and
//! failures, so batchd can be demonstrated, tested and load-tested without an
//! API key. Point any OpenAI client at [`SimServer::base_url`].
//!
//! What it serves:
//!
//! - `POST /v1/chat/completions`. The answer is derived from a hash of the
//!   model and messages: the same request always gets the same content. A
//!   `json_schema` response format gets an object valid for a simple schema,
//!   its `enum` strings picked by that hash (`completion::schema_answer`).
//!   `n` up to 128 is answered with `n` different choices; `stream: true` is
//!   refused with a 400. Invalid requests get a 400 before they count against
//!   the rate limits; rate-limited requests get a 429 at once; admitted
//!   requests wait the configured latency, then get a 200 or, at
//!   `error_rate`, a 500. A present `Authorization` header must be
//!   `Bearer <key>` (any key).
//! - `POST /v1/messages`: Anthropic's Messages API, answered by the same
//!   model. `x-api-key` and `anthropic-version` are required; errors have
//!   Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`),
//!   `error_rate` failures are 529 `overloaded_error`, rate limits 429
//!   `rate_limit_error` with `retry-after` and `anthropic-ratelimit-*`
//!   headers, and usage is additive: a system block marked `cache_control`
//!   of at least 1024 tokens is written to the prompt cache on first use
//!   (`cache_creation_input_tokens`) and read from it after
//!   (`cache_read_input_tokens`). Counted in the same stats and bill.
//! - OpenAI's Files and Batches (`batches`) and Anthropic's Message
//!   Batches (`message_batches`), on one clock (`--batch-secs`), billed at
//!   the batch rate apart from the realtime bill.
//! - `GET /v1/models` and `GET /v1/models/{id}`: a fixed list of model ids.
//! - Anything else: a 404 with OpenAI's `Invalid URL` error.
//!
//! Scripted faults ([`Fault`]) act in time windows on the simulator's own
//! clock, which starts with the server, and optionally on one model (the
//! request body's `model`): `outage` (503, or 500), `refuse` (the port is
//! closed and open connections dropped, then it reopens), `unauthorized`
//! (401 `invalid_api_key`), `forbidden` (403), `model_not_found` (404),
//! `quota` (429 `insufficient_quota`), `bad_request` (400
//! `invalid_request_error`), `rate_limit_storm` (429
//! `rate_limit_exceeded` with `retry-after`) and `slow` (extra latency).
//! They come before validation and the rate budgets, and apply to chat
//! completions; `refuse` applies to every connection. Set them with
//! `batchd sim --fault outage@10s..20s` or `--faults FILE`, with
//! [`SimServer::add_fault`], or over HTTP.
//!
//! The simulator's control API lives under `/sim/`, outside OpenAI's `/v1/`:
//!
//! - `GET /sim/faults`: the faults and the clock.
//! - `POST /sim/faults`: adds a fault object (`{"kind": "outage", "from":
//!   "10s", "until": "20s"}`, optional `value` and `model`) or a list of them.
//! - `DELETE /sim/faults`: removes every fault.
//! - `GET /sim/stats`: [`SimStats`] as JSON, with the same counters per model
//!   under `models`.
//! - `POST /sim/clock/reset`: the faults' clock starts again at zero.
//!
//! During a `refuse` window these are unreachable too: the whole port is
//! closed. [`SimServer`]'s methods still work.
//!
//! Layout:
//!
//! - `service`: routes, shared state and the path of one request.
//! - `fault`: scripted faults, their syntax and which ones act when.
//! - `listener`: the listener that closes and reopens for `refuse` windows.
//! - `admin`: the `/sim/` control API.
//! - `request`: validation of the request body and the prompt's token count.
//! - `completion`: the deterministic answer and the response body.
//! - `rate_limit`: requests and tokens per minute budgets, header values.
//! - `prompt_cache`: which prompt prefixes count as `cached_tokens`, and
//!   from when (a prefix is written as its first request is read).
//! - `api_error`: OpenAI's error body.
//! - `messages`: Anthropic's Messages API: headers, request, answer.
//! - `message_batches`: Anthropic's Message Batches API.
//! - `hash`: the stable hash behind answers and cache keys.

mod admin;
mod api_error;
mod batches;
mod completion;
mod fault;
mod hash;
mod listener;
mod message_batches;
mod messages;
mod prompt_cache;
mod rate_limit;
mod request;
mod service;
mod tiers;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use batches::{BatchFaults, MAX_BATCH_FILE_BYTES, MAX_BATCH_REQUESTS};
pub use fault::{
    load_faults, parse_duration, Fault, FaultError, FaultKind, FaultsFileError, MAX_FAULTS,
};
use listener::FaultListener;
use service::Shared;
pub use tiers::{TierConfig, DEFAULT_FLEX_MODELS};

/// How long `shutdown` lets in-flight requests finish before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Request bodies kept by `record_requests` unless
/// [`SimServer::set_record_limit`] says otherwise.
pub const DEFAULT_RECORD_LIMIT: usize = 10_000;

/// Arguments of `batchd sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub addr: SocketAddr,
    /// Base response latency in milliseconds (jitter is added on top)
    #[arg(long, default_value_t = 50)]
    pub latency_ms: u64,
    /// Random extra latency, uniform in [0, jitter_ms]
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Fraction of requests answered with a 500 server error (0.0..=1.0)
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub error_rate: f64,
    /// Requests per minute before answering 429 (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    pub rpm: u32,
    /// Tokens per minute before answering 429 (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    pub tpm: u32,
    /// Seed for latency jitter and error injection
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Scripted fault, repeatable: KIND[=VALUE]@FROM..UNTIL[:MODEL], times from
    /// the start, e.g. outage@10s..20s, unauthorized@0s..30s:gpt-4.1-nano,
    /// slow=2000@5s..15s. Kinds: outage[=500|503], refuse, unauthorized,
    /// forbidden, model_not_found, quota, bad_request, rate_limit_storm[=RETRY_AFTER_MS],
    /// slow=MS
    #[arg(long = "fault", value_name = "SPEC")]
    pub faults: Vec<Fault>,
    /// Scripted faults from a JSON or TOML file (see the README)
    #[arg(long = "faults", value_name = "FILE")]
    pub faults_file: Option<PathBuf>,
    /// Seconds a Batch API batch takes from creation to `completed`
    /// (validating, in_progress and finalizing on the way), and a Message
    /// Batch from creation to `ended`
    #[arg(long, default_value_t = 30.0)]
    pub batch_secs: f64,
    /// Share of a request's latency spent reading its prompt (0.0..=1.0): its
    /// prefixes enter the prompt cache that long after it arrives
    #[arg(long, default_value_t = 1.0, value_parser = parse_fraction)]
    pub prefill_share: f64,
    /// Serve no batch endpoints (files, batches, message batches answer 404),
    /// like an OpenAI-compatible server without a Batch API
    #[arg(long)]
    pub no_batch_api: bool,
    /// Answer batch lines without the prompt cache (no cached tokens in
    /// batch jobs), like a provider whose batch and cache discounts do not
    /// stack
    #[arg(long)]
    pub no_batch_cache: bool,
    /// Latency of a `service_tier: "flex"` answer, as a multiple of the
    /// default tier's
    #[arg(long, default_value_t = 3.0, value_parser = parse_factor)]
    pub flex_latency_factor: f64,
    /// Fraction of flex requests refused with 429 `resource_unavailable`
    /// (0.0..=1.0; seeded)
    #[arg(long, default_value_t = 0.02, value_parser = parse_fraction)]
    pub flex_unavailable_rate: f64,
    /// Latency of a `service_tier: "priority"` answer, as a multiple of the
    /// default tier's
    #[arg(long, default_value_t = 0.5, value_parser = parse_factor)]
    pub priority_latency_factor: f64,
    /// A model that takes `service_tier: "flex"`, repeatable; others answer
    /// at the default tier. Default: gpt-5, gpt-5-mini, gpt-5-nano, o3, o4-mini
    #[arg(long = "flex-model", value_name = "MODEL")]
    pub flex_models: Vec<String>,
}

/// A command-line latency factor: a finite number, at least 0.
pub fn parse_factor(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{value} is not a finite number of at least 0"))
    }
}

/// A command-line fraction in `0.0..=1.0` (error rates).
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0.0 and 1.0"))
    }
}

/// How the simulated provider behaves; can be changed while it runs with
/// [`SimServer::set_config`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Time an admitted request takes before it is answered.
    pub latency: Duration,
    /// Random extra time, uniform in `[0, jitter]`.
    pub jitter: Duration,
    /// Fraction of admitted requests answered with a 500; values above 1 act as 1.
    pub error_rate: f64,
    /// Requests per minute; 0 means unlimited.
    pub rpm: u32,
    /// Tokens (prompt + completion) per minute; 0 means unlimited.
    pub tpm: u32,
    /// Seed of the random sequence behind jitter and injected errors.
    pub seed: u64,
    /// Keep parsed request bodies for [`SimServer::recorded_requests`], the
    /// most recent [`DEFAULT_RECORD_LIMIT`] unless
    /// [`SimServer::set_record_limit`] says otherwise (meant for tests).
    pub record_requests: bool,
    /// How long a Batch API batch takes from creation to its end.
    pub batch_duration: Duration,
    /// Share of a request's delay spent reading its prompt: its prefixes
    /// enter the prompt cache that long after it is admitted (`1.0`: when it
    /// is answered; `0.0`: at once). Clamped to `0.0..=1.0`.
    pub prefill_share: f64,
    /// How the `flex` and `priority` service tiers behave.
    pub tiers: TierConfig,
    /// Whether batch lines are read through the prompt cache, their cached
    /// tokens billed at the cached price with the batch discount (Anthropic
    /// documents that the two discounts stack).
    pub batch_cache: bool,
}

impl Default for SimConfig {
    /// Instant answers, no errors, no limits.
    fn default() -> Self {
        SimConfig {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            error_rate: 0.0,
            rpm: 0,
            tpm: 0,
            seed: 42,
            record_requests: false,
            batch_duration: Duration::from_secs(1),
            prefill_share: 1.0,
            tiers: TierConfig::default(),
            batch_cache: true,
        }
    }
}

impl From<&SimArgs> for SimConfig {
    fn from(args: &SimArgs) -> Self {
        SimConfig {
            latency: Duration::from_millis(args.latency_ms),
            jitter: Duration::from_millis(args.jitter_ms),
            error_rate: if args.error_rate.is_nan() {
                0.0
            } else {
                args.error_rate.clamp(0.0, 1.0)
            },
            rpm: args.rpm,
            tpm: args.tpm,
            seed: args.seed,
            record_requests: false,
            batch_duration: Duration::try_from_secs_f64(args.batch_secs.max(0.0))
                .unwrap_or(Duration::from_secs(30)),
            prefill_share: args.prefill_share,
            tiers: TierConfig {
                flex_latency_factor: args.flex_latency_factor,
                flex_unavailable_rate: args.flex_unavailable_rate,
                priority_latency_factor: args.priority_latency_factor,
            },
            batch_cache: !args.no_batch_cache,
        }
    }
}

/// The tokens the simulator billed for one model: those of every request
/// it answered with a 200 (OpenAI bills these; refused and failed ones are free).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SimBill {
    /// Requests answered with a 200.
    pub requests: u64,
    /// Prompt tokens, cached included.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prompt cache.
    pub cached_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens written to the prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), included in `prompt_tokens`.
    #[serde(default)]
    pub cache_write_tokens: u64,
}

impl SimBill {
    /// One answer's tokens (`requests` is counted when it is billed).
    pub fn tokens(prompt: u64, cached: u64, completion: u64, cache_write: u64) -> SimBill {
        SimBill {
            requests: 0,
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: completion,
            cache_write_tokens: cache_write,
        }
    }

    /// The bill's tokens as an outcome's usage, to price with the table.
    pub fn usage(&self) -> batchd_actors::task::Usage {
        batchd_actors::task::Usage {
            input_tokens: self.prompt_tokens,
            cached_input_tokens: self.cached_tokens,
            output_tokens: self.completion_tokens,
            cache_write_input_tokens: self.cache_write_tokens,
        }
    }
}

/// What the simulator has answered so far (chat completion and Messages requests only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SimStats {
    /// Every chat completion or Messages request received (per model: answered).
    pub requests: u64,
    /// Answered with a 200.
    pub succeeded: u64,
    /// Answered with a 429 `rate_limit_exceeded`: over `rpm` or `tpm`, or
    /// in a `rate_limit_storm`.
    pub rate_limited: u64,
    /// Answered with a 500 injected at `error_rate`.
    pub server_errors: u64,
    /// Refused as invalid: 400 (a `bad_request` fault too), 413, or 401 for a
    /// malformed `Authorization`.
    pub bad_requests: u64,
    /// Answered by an `outage` fault (503, or 500).
    pub unavailable: u64,
    /// Answered by an `unauthorized` (401) or `forbidden` (403) fault.
    pub auth_errors: u64,
    /// Answered by a `model_not_found` fault (404).
    pub not_found: u64,
    /// Answered by a `quota` fault (429 `insufficient_quota`).
    pub quota_errors: u64,
    /// Flex requests refused with a 429 `resource_unavailable` (not billed).
    pub resource_unavailable: u64,
    /// Connections dropped because a `refuse` window opened (always 0 per
    /// model). Connections refused while closed never reach the simulator
    /// and are not counted.
    pub dropped_connections: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulated provider cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("simulated provider cannot read its local address after binding {addr}: {source}")]
    LocalAddr {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running simulated provider. Dropping it stops the server too; call
/// [`SimServer::shutdown`] to wait until it has stopped.
pub struct SimServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl SimServer {
    /// Binds `addr` (port 0 picks a free port) and serves in a spawned task.
    pub async fn start(addr: SocketAddr, config: SimConfig) -> Result<SimServer, SimError> {
        let listener = listener::bind(addr).map_err(|source| SimError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| SimError::LocalAddr { addr, source })?;
        let shared = Arc::new(Shared::new(config));
        let app = service::router(Arc::clone(&shared));
        let (stop, stopped) = oneshot::channel::<()>();

        let listener = FaultListener::new(listener, local, Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped handle stops the server as well.
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "simulated provider stopped with an error");
            }
        });
        tracing::debug!(addr = %local, "simulated provider listening");
        Ok(SimServer {
            addr: local,
            shared,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `ANTHROPIC_BASE_URL` for clients: the server's root.
    pub fn anthropic_base_url(&self) -> String {
        self.base_url().trim_end_matches("/v1").to_owned()
    }

    /// The `OPENAI_BASE_URL` for clients, `/v1` included. A wildcard listen
    /// address is reported as loopback, which is where a local client connects.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}/v1", SocketAddr::new(ip, self.addr.port()))
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// The same counters per model named in request bodies (at most the
    /// first 1000 distinct models), counted when the request is answered.
    pub fn model_stats(&self) -> BTreeMap<String, SimStats> {
        self.shared.model_stats()
    }

    /// The bill so far: billed tokens per model (the first 1000 models).
    /// Priced with a price table, it is what a provider would charge.
    pub fn bill(&self) -> BTreeMap<String, SimBill> {
        self.shared.bill()
    }

    /// The batch part of the bill: tokens of the Batch API lines answered,
    /// per model, to be priced at the batch rate (the price table's
    /// `batch_discount` off).
    pub fn batch_bill(&self) -> BTreeMap<String, SimBill> {
        self.shared.batch_bill()
    }

    /// The flex part of the bill: tokens of the answers served at the flex
    /// tier, per model, to be priced at the batch rate (the price table's
    /// `batch_discount` off), as OpenAI prices flex.
    pub fn flex_bill(&self) -> BTreeMap<String, SimBill> {
        self.shared.flex_bill()
    }

    /// The priority part of the bill: tokens of the answers served at the
    /// priority tier, per model, to be priced at the priority premium.
    pub fn priority_bill(&self) -> BTreeMap<String, SimBill> {
        self.shared.priority_bill()
    }

    /// Models that take `service_tier: "flex"` from now on (default
    /// [`DEFAULT_FLEX_MODELS`]).
    pub fn set_flex_models(&self, models: Vec<String>) {
        self.shared.set_flex_models(models);
    }

    /// How many batches were created (`POST /v1/batches` or `POST
    /// /v1/messages/batches` answered 200).
    pub fn batch_creations(&self) -> u64 {
        self.shared.batch_creations()
    }

    /// What batches created from now on do: expire, fail some lines.
    pub fn set_batch_faults(&self, faults: BatchFaults) {
        service::lock(&self.shared.batches).set_faults(faults);
    }

    /// Request bodies received while `record_requests` was on, oldest first.
    pub fn recorded_requests(&self) -> Vec<serde_json::Value> {
        self.shared.recorded_requests()
    }

    /// Serves the batch endpoints (the default), or answers 404 on them like
    /// an OpenAI-compatible server without a Batch API.
    pub fn set_batch_api(&self, on: bool) {
        self.shared.set_batch_api(on);
    }

    /// Keeps at most the `limit` most recent recorded bodies (default
    /// [`DEFAULT_RECORD_LIMIT`]); 0 records nothing.
    pub fn set_record_limit(&self, limit: usize) {
        self.shared.set_record_limit(limit);
    }

    /// Adds a scripted fault; its window counts from the clock's start (see
    /// [`SimServer::reset_clock`]). Refused if invalid or if
    /// [`MAX_FAULTS`] are set already.
    pub fn add_fault(&self, fault: Fault) -> Result<(), FaultError> {
        self.shared.add_faults(vec![fault])
    }

    /// Removes every fault; a closed listener reopens at once.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    pub fn faults(&self) -> Vec<Fault> {
        self.shared.faults()
    }

    /// Time on the faults' clock: since the start or the last reset.
    pub fn clock(&self) -> Duration {
        self.shared.clock()
    }

    /// Starts the faults' clock again at zero, so windows count from now.
    pub fn reset_clock(&self) {
        self.shared.reset_clock();
    }

    /// Changes the behaviour for the following requests. Changing `rpm` or
    /// `tpm` starts new, full budgets; changing `seed` restarts the sequence.
    pub fn set_config(&self, f: impl FnOnce(&mut SimConfig)) {
        self.shared.update_config(f);
    }

    /// Stops accepting connections and waits for in-flight requests, at most
    /// a few seconds.
    pub async fn shutdown(self) {
        let SimServer { stop, mut task, .. } = self;
        // An error means the server task is already gone.
        let _ = stop.send(());
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("simulated provider did not stop in time; aborting it");
            task.abort();
        }
    }
}

/// `batchd sim`: serves until ctrl-c (or SIGTERM).
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut faults = args.faults.clone();
    if let Some(path) = &args.faults_file {
        faults.extend(load_faults(path)?);
    }
    let server = SimServer::start(args.addr, SimConfig::from(&args)).await?;
    server.shared.add_faults(faults)?;
    server.set_batch_api(!args.no_batch_api);
    if !args.flex_models.is_empty() {
        server.set_flex_models(args.flex_models.clone());
    }
    let base_url = server.base_url();
    println!("batchd sim: simulated OpenAI-compatible provider at {base_url}");
    println!(
        "  latency {} ms + jitter up to {} ms, error rate {}, rpm {}, tpm {}, seed {}",
        args.latency_ms,
        args.jitter_ms,
        args.error_rate,
        limit_text(args.rpm),
        limit_text(args.tpm),
        args.seed
    );
    println!(
        "  flex for {} ({}x latency, {} refused), priority {}x latency",
        server.shared.flex_models().join(", "),
        args.flex_latency_factor,
        args.flex_unavailable_rate,
        args.priority_latency_factor
    );
    for fault in server.faults() {
        println!("  fault {fault}");
    }
    println!("Point OpenAI clients at it (any API key works):");
    println!("  export OPENAI_BASE_URL={base_url}");
    println!("Press ctrl-c to stop.");

    wait_for_stop_signal().await?;
    let stats = server.stats();
    server.shutdown().await;
    println!(
        "batchd sim: served {} requests: {} succeeded, {} rate limited, {} server errors, \
         {} bad requests, {} unavailable, {} auth errors, {} not found, {} quota errors, \
         {} flex refusals; {} connections dropped",
        stats.requests,
        stats.succeeded,
        stats.rate_limited,
        stats.server_errors,
        stats.bad_requests,
        stats.unavailable,
        stats.auth_errors,
        stats.not_found,
        stats.quota_errors,
        stats.resource_unavailable,
        stats.dropped_connections
    );
    Ok(())
}

fn limit_text(limit: u32) -> String {
    if limit == 0 {
        "unlimited".to_owned()
    } else {
        limit.to_string()
    }
}

/// Ctrl-c, or SIGTERM on Unix (what `docker stop` sends).
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = terminate.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn cli_defaults_match_the_documented_ones() {
        let args = Cli::try_parse_from(["sim"]).unwrap().sim;
        assert_eq!(args.addr, "127.0.0.1:8089".parse().unwrap());
        let config = SimConfig::from(&args);
        assert_eq!(config.latency, Duration::from_millis(50));
        assert_eq!(config.error_rate, 0.0);
        assert_eq!((config.rpm, config.tpm, config.seed), (0, 0, 42));
    }

    #[test]
    fn cli_refuses_an_error_rate_outside_zero_to_one() {
        assert!(Cli::try_parse_from(["sim", "--error-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["sim", "--error-rate", "nan"]).is_err());
        let args = Cli::try_parse_from(["sim", "--error-rate", "0.25", "--rpm", "600"])
            .unwrap()
            .sim;
        assert_eq!(SimConfig::from(&args).error_rate, 0.25);
        assert_eq!(SimConfig::from(&args).rpm, 600);
    }

    #[test]
    fn cli_takes_the_service_tier_knobs_and_refuses_bad_ones() {
        let args = Cli::try_parse_from(["sim"]).unwrap().sim;
        let tiers = SimConfig::from(&args).tiers;
        assert_eq!(
            (
                tiers.flex_latency_factor,
                tiers.flex_unavailable_rate,
                tiers.priority_latency_factor
            ),
            (3.0, 0.02, 0.5)
        );
        assert!(args.flex_models.is_empty());
        let args = Cli::try_parse_from([
            "sim",
            "--flex-latency-factor",
            "5",
            "--flex-unavailable-rate",
            "0.1",
            "--flex-model",
            "gpt-4.1-mini",
            "--flex-model",
            "gpt-5",
        ])
        .unwrap()
        .sim;
        assert_eq!(SimConfig::from(&args).tiers.flex_latency_factor, 5.0);
        assert_eq!(SimConfig::from(&args).tiers.flex_unavailable_rate, 0.1);
        assert_eq!(args.flex_models, ["gpt-4.1-mini", "gpt-5"]);
        for bad in [
            ["--flex-latency-factor", "-1"],
            ["--flex-latency-factor", "inf"],
            ["--flex-unavailable-rate", "2"],
            ["--priority-latency-factor", "x"],
        ] {
            assert!(
                Cli::try_parse_from(["sim", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cli_takes_repeated_faults_and_a_faults_file() {
        let args = Cli::try_parse_from([
            "sim",
            "--fault",
            "outage@10s..20s",
            "--fault",
            "unauthorized@0s..30s:gpt-4.1-nano",
            "--fault",
            "slow=2000@5s..15s",
            "--faults",
            "chaos.toml",
        ])
        .unwrap()
        .sim;
        let specs: Vec<String> = args.faults.iter().map(Fault::to_string).collect();
        assert_eq!(
            specs,
            [
                "outage@10s..20s",
                "unauthorized@0s..30s:gpt-4.1-nano",
                "slow=2000@5s..15s"
            ]
        );
        assert_eq!(args.faults_file, Some(PathBuf::from("chaos.toml")));
        assert!(Cli::try_parse_from(["sim"]).unwrap().sim.faults.is_empty());
    }

    #[test]
    fn cli_names_the_bad_fault_and_the_problem() {
        let cases = [
            ("outage@20s..10s", "the window 20s..10s is empty"),
            ("meltdown@1s..2s", "unknown fault kind 'meltdown'"),
            ("refuse@0s..5s:gpt-5", "cannot be limited to one model"),
            ("slow@0s..5s", "slow needs its extra latency in ms"),
        ];
        for (spec, reason) in cases {
            let error = Cli::try_parse_from(["sim", "--fault", spec]).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(spec) && message.contains(reason),
                "{spec}: {message}"
            );
        }
    }

    #[tokio::test]
    async fn base_url_reports_loopback_for_a_wildcard_address() {
        let server = SimServer::start("0.0.0.0:0".parse().unwrap(), SimConfig::default())
            .await
            .unwrap();
        let port = server.addr().port();
        assert_eq!(server.base_url(), format!("http://127.0.0.1:{port}/v1"));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let first = SimServer::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
            .await
            .unwrap();
        let taken = first.addr();
        let Err(error) = SimServer::start(taken, SimConfig::default()).await else {
            panic!("bound an address already in use");
        };
        assert!(error.to_string().contains(&taken.to_string()), "{error}");
        first.shutdown().await;
    }
}
