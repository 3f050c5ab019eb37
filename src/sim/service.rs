//! The HTTP side of the simulator: routes, the shared state behind them, and
//! the path of one completion request (Chat Completions or Messages).
//!
//! A request goes: authorization → JSON → scripted faults (extra latency,
//! or a fault's answer) → validation → answer (no lock) → one short lock
//! for the rate budgets, the seeded dice and the prompt cache → latency →
//! response. Total counters are atomics, so `stats()` never waits; the
//! counters per model sit behind a short lock taken once per answer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::api_error::ApiError;
use super::batches::BatchStore;
use super::completion::{self, ChatCompletion, Usage};
use super::fault::{Fault, FaultClock, FaultError, FaultKind, ListenPlan};
use super::hash::mix;
use super::messages::{self, Api};
use super::prompt_cache::{self, PromptCache};
use super::rate_limit::{
    format_duration, Admission, BudgetState, LimitKind, Quota, RateLimiter, Refusal,
};
use super::request::{self, ChatRequest};
use super::tiers::{self, ServiceTier, DEFAULT_FLEX_MODELS};
use super::{SimBill, SimConfig, SimStats, DEFAULT_RECORD_LIMIT};

/// Larger bodies get a 413; OpenAI's own limit is in this range.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Models listed by `GET /v1/models`, with their release dates (unix seconds).
/// Completions accept any model name.
const MODELS: [(&str, u64); 7] = [
    ("gpt-4.1", 1_744_316_542),
    ("gpt-4.1-mini", 1_744_318_173),
    ("gpt-4.1-nano", 1_744_321_707),
    ("gpt-4o-mini", 1_721_172_741),
    ("gpt-5", 1_754_425_777),
    ("gpt-5-mini", 1_754_425_867),
    ("gpt-5-nano", 1_754_426_384),
];

/// Distinct models counted in the per-model stats; requests for further
/// models count in the totals only, so odd model names cannot grow memory.
const MAX_MODELS_TRACKED: usize = 1000;

/// The limit named in a storm's 429 message when no `rpm` is configured.
const STORM_NOMINAL_RPM: u32 = 10_000;

/// State shared by all handlers and the `SimServer` handle.
pub(crate) struct Shared {
    state: Mutex<SimState>,
    counters: Counters,
    models: Mutex<HashMap<String, SimStats>>,
    bill: Mutex<HashMap<String, SimBill>>,
    faults: Mutex<FaultClock>,
    /// Tells the listener that faults or the clock changed.
    fault_changes: watch::Sender<()>,
    /// Mirrors `config.record_requests` so the hot path reads it without the lock.
    record_requests: AtomicBool,
    recorded: Mutex<VecDeque<Value>>,
    record_limit: AtomicUsize,
    sequence: AtomicU64,
    /// Makes ids differ between runs; answers do not depend on it.
    id_salt: u64,
    /// Files and batches of the Batch API.
    pub(crate) batches: Mutex<BatchStore>,
    /// Tokens of answered batch lines, per model (billed at the batch rate).
    batch_bill: Mutex<HashMap<String, SimBill>>,
    /// Batches created.
    batch_creations: AtomicU64,
    /// Whether the batch endpoints exist (files, batches, message batches);
    /// off, they answer 404 like a server without them.
    batch_api: AtomicBool,
    /// Tokens of answers served at the flex tier, per model (billed at the
    /// batch rate).
    flex_bill: Mutex<HashMap<String, SimBill>>,
    /// Tokens of answers served at the priority tier, per model (billed at
    /// the priority premium).
    priority_bill: Mutex<HashMap<String, SimBill>>,
    /// Models that take `service_tier: "flex"`.
    flex_models: Mutex<Vec<String>>,
}

/// Everything a request changes, behind one lock.
struct SimState {
    config: SimConfig,
    rng: StdRng,
    limiter: RateLimiter,
    prompt_cache: PromptCache,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    succeeded: AtomicU64,
    rate_limited: AtomicU64,
    server_errors: AtomicU64,
    bad_requests: AtomicU64,
    unavailable: AtomicU64,
    auth_errors: AtomicU64,
    not_found: AtomicU64,
    quota_errors: AtomicU64,
    resource_unavailable: AtomicU64,
    dropped_connections: AtomicU64,
}

/// How a chat completion request was answered; each outcome has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    RateLimited,
    ServerError,
    BadRequest,
    Unavailable,
    AuthError,
    NotFound,
    QuotaError,
    ResourceUnavailable,
}

impl Counters {
    fn of(&self, outcome: Outcome) -> &AtomicU64 {
        match outcome {
            Outcome::Succeeded => &self.succeeded,
            Outcome::RateLimited => &self.rate_limited,
            Outcome::ServerError => &self.server_errors,
            Outcome::BadRequest => &self.bad_requests,
            Outcome::Unavailable => &self.unavailable,
            Outcome::AuthError => &self.auth_errors,
            Outcome::NotFound => &self.not_found,
            Outcome::QuotaError => &self.quota_errors,
            Outcome::ResourceUnavailable => &self.resource_unavailable,
        }
    }
}

impl SimStats {
    fn count(&mut self, outcome: Outcome) {
        self.requests += 1;
        let counter = match outcome {
            Outcome::Succeeded => &mut self.succeeded,
            Outcome::RateLimited => &mut self.rate_limited,
            Outcome::ServerError => &mut self.server_errors,
            Outcome::BadRequest => &mut self.bad_requests,
            Outcome::Unavailable => &mut self.unavailable,
            Outcome::AuthError => &mut self.auth_errors,
            Outcome::NotFound => &mut self.not_found,
            Outcome::QuotaError => &mut self.quota_errors,
            Outcome::ResourceUnavailable => &mut self.resource_unavailable,
        };
        *counter += 1;
    }
}

/// A mutex poisoned by a panicking holder still guards consistent data here
/// (every update is a single assignment), so keep serving.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new(config: SimConfig) -> Self {
        let now = Instant::now();
        let id_salt = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        Shared {
            state: Mutex::new(SimState {
                config,
                rng: StdRng::seed_from_u64(config.seed),
                limiter: RateLimiter::new(config.rpm, config.tpm, now),
                prompt_cache: PromptCache::new(
                    PromptCache::DEFAULT_GENERATION_CAPACITY,
                    PromptCache::DEFAULT_GENERATION_AGE,
                    now,
                ),
            }),
            counters: Counters::default(),
            models: Mutex::new(HashMap::new()),
            bill: Mutex::new(HashMap::new()),
            faults: Mutex::new(FaultClock::new(now)),
            fault_changes: watch::Sender::new(()),
            record_requests: AtomicBool::new(config.record_requests),
            recorded: Mutex::new(VecDeque::new()),
            record_limit: AtomicUsize::new(DEFAULT_RECORD_LIMIT),
            sequence: AtomicU64::new(0),
            id_salt,
            batches: Mutex::new(BatchStore::default()),
            batch_bill: Mutex::new(HashMap::new()),
            batch_creations: AtomicU64::new(0),
            batch_api: AtomicBool::new(true),
            flex_bill: Mutex::new(HashMap::new()),
            priority_bill: Mutex::new(HashMap::new()),
            flex_models: Mutex::new(DEFAULT_FLEX_MODELS.map(str::to_owned).to_vec()),
        }
    }

    /// Serves the batch endpoints, or answers 404 on them.
    pub(crate) fn set_batch_api(&self, on: bool) {
        self.batch_api.store(on, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> SimStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SimStats {
            requests: read(&self.counters.requests),
            succeeded: read(&self.counters.succeeded),
            rate_limited: read(&self.counters.rate_limited),
            server_errors: read(&self.counters.server_errors),
            bad_requests: read(&self.counters.bad_requests),
            unavailable: read(&self.counters.unavailable),
            auth_errors: read(&self.counters.auth_errors),
            not_found: read(&self.counters.not_found),
            quota_errors: read(&self.counters.quota_errors),
            resource_unavailable: read(&self.counters.resource_unavailable),
            dropped_connections: read(&self.counters.dropped_connections),
        }
    }

    pub(crate) fn model_stats(&self) -> BTreeMap<String, SimStats> {
        lock(&self.models)
            .iter()
            .map(|(model, stats)| (model.clone(), *stats))
            .collect()
    }

    /// Counts an answered request in the totals and, when the body named a
    /// model, in that model's stats.
    fn count(&self, outcome: Outcome, model: Option<&str>) {
        self.counters.of(outcome).fetch_add(1, Ordering::Relaxed);
        let Some(model) = model else { return };
        let mut models = lock(&self.models);
        if let Some(stats) = models.get_mut(model) {
            stats.count(outcome);
        } else if models.len() < MAX_MODELS_TRACKED {
            models.entry(model.to_owned()).or_default().count(outcome);
        }
    }

    /// The default tier's bill.
    pub(crate) fn bill(&self) -> BTreeMap<String, SimBill> {
        snapshot(&self.bill)
    }

    /// The flex tier's bill.
    pub(crate) fn flex_bill(&self) -> BTreeMap<String, SimBill> {
        snapshot(&self.flex_bill)
    }

    /// The priority tier's bill.
    pub(crate) fn priority_bill(&self) -> BTreeMap<String, SimBill> {
        snapshot(&self.priority_bill)
    }

    /// Adds one answered request's tokens to its model's bill of `tier`.
    fn charge(&self, tier: ServiceTier, model: &str, tokens: SimBill) {
        let bill = match tier {
            ServiceTier::Default => &self.bill,
            ServiceTier::Flex => &self.flex_bill,
            ServiceTier::Priority => &self.priority_bill,
        };
        add_to_bill(bill, model, tokens);
    }

    pub(crate) fn batch_bill(&self) -> BTreeMap<String, SimBill> {
        snapshot(&self.batch_bill)
    }

    /// Adds one answered batch line's tokens to its model's batch bill.
    pub(crate) fn charge_batch(&self, model: &str, tokens: SimBill) {
        add_to_bill(&self.batch_bill, model, tokens);
    }

    /// Reads one batch line's prompt through the prompt cache, as the batch
    /// processor answers it: (cached tokens, tokens written to the cache).
    /// Lines are read one after another, so a line finds the prefixes of
    /// the lines before it and of recent realtime requests. With
    /// [`SimConfig::batch_cache`] off, nothing is cached.
    pub(crate) fn batch_line_cache(
        &self,
        api: Api,
        request: &ChatRequest,
        cache_prefix: Option<&str>,
    ) -> (u64, u64) {
        let (prefixes, cacheable_tokens) = cache_blocks(api, request, cache_prefix);
        let mut state = lock(&self.state);
        if !state.config.batch_cache {
            return (0, 0);
        }
        let now = Instant::now();
        let cached = state
            .prompt_cache
            .lookup_and_insert(now, now, &prefixes, cacheable_tokens);
        cache_usage(api, prefixes.is_empty(), cached, cacheable_tokens)
    }

    pub(crate) fn flex_models(&self) -> Vec<String> {
        lock(&self.flex_models).clone()
    }

    pub(crate) fn set_flex_models(&self, models: Vec<String>) {
        *lock(&self.flex_models) = models;
    }

    pub(crate) fn batch_created(&self) {
        self.batch_creations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn batch_creations(&self) -> u64 {
        self.batch_creations.load(Ordering::Relaxed)
    }

    pub(crate) fn batch_duration(&self) -> Duration {
        lock(&self.state).config.batch_duration
    }

    pub(crate) fn id_salt(&self) -> u64 {
        self.id_salt
    }

    pub(crate) fn count_dropped_connection(&self) {
        self.counters
            .dropped_connections
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn recorded_requests(&self) -> Vec<Value> {
        lock(&self.recorded).iter().cloned().collect()
    }

    /// Keeps at most `limit` recorded bodies, dropping the oldest first.
    pub(crate) fn set_record_limit(&self, limit: usize) {
        self.record_limit.store(limit, Ordering::Relaxed);
        let mut recorded = lock(&self.recorded);
        while recorded.len() > limit {
            recorded.pop_front();
        }
    }

    fn record(&self, body: &Value) {
        let limit = self.record_limit.load(Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let mut recorded = lock(&self.recorded);
        while recorded.len() >= limit {
            recorded.pop_front();
        }
        recorded.push_back(body.clone());
    }

    /// Adds all of `faults` or, if one is invalid, none.
    pub(crate) fn add_faults(&self, faults: Vec<Fault>) -> Result<(), FaultError> {
        lock(&self.faults).add(faults)?;
        self.fault_changes.send_replace(());
        Ok(())
    }

    /// Removes every fault; returns how many there were.
    pub(crate) fn clear_faults(&self) -> usize {
        let cleared = lock(&self.faults).clear();
        self.fault_changes.send_replace(());
        cleared
    }

    pub(crate) fn faults(&self) -> Vec<Fault> {
        lock(&self.faults).faults().to_vec()
    }

    /// Time on the faults' clock.
    pub(crate) fn clock(&self) -> Duration {
        lock(&self.faults).elapsed(Instant::now())
    }

    /// Restarts the faults' clock at zero.
    pub(crate) fn reset_clock(&self) {
        lock(&self.faults).reset(Instant::now());
        self.fault_changes.send_replace(());
    }

    pub(crate) fn listen_plan(&self) -> ListenPlan {
        lock(&self.faults).listen_plan(Instant::now())
    }

    pub(crate) fn subscribe_fault_changes(&self) -> watch::Receiver<()> {
        self.fault_changes.subscribe()
    }

    /// Applies a config change; new limits start with full budgets and a new
    /// seed restarts the random sequence.
    pub(crate) fn update_config(&self, change: impl FnOnce(&mut SimConfig)) {
        let mut state = lock(&self.state);
        let before = state.config;
        change(&mut state.config);
        let after = state.config;
        if (after.rpm, after.tpm) != (before.rpm, before.tpm) {
            state.limiter = RateLimiter::new(after.rpm, after.tpm, Instant::now());
        }
        if after.seed != before.seed {
            state.rng = StdRng::seed_from_u64(after.seed);
        }
        self.record_requests
            .store(after.record_requests, Ordering::Relaxed);
    }

    /// A number unique to this request, from which its ids are derived.
    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }

    fn request_id(&self, sequence: u64) -> String {
        format!(
            "req_{:016x}{:016x}",
            mix(self.id_salt ^ sequence),
            mix(!self.id_salt ^ sequence)
        )
    }
}

fn snapshot(bill: &Mutex<HashMap<String, SimBill>>) -> BTreeMap<String, SimBill> {
    lock(bill)
        .iter()
        .map(|(model, bill)| (model.clone(), *bill))
        .collect()
}

/// Adds one answer's tokens (`requests` is counted here) to `model`'s line.
fn add_to_bill(bill: &Mutex<HashMap<String, SimBill>>, model: &str, tokens: SimBill) {
    let mut bill = lock(bill);
    if !bill.contains_key(model) && bill.len() >= MAX_MODELS_TRACKED {
        return;
    }
    let b = bill.entry(model.to_owned()).or_default();
    b.requests += 1;
    b.prompt_tokens += tokens.prompt_tokens;
    b.cached_tokens += tokens.cached_tokens;
    b.completion_tokens += tokens.completion_tokens;
    b.cache_write_tokens += tokens.cache_write_tokens;
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(chat_completions).fallback(invalid_url),
        )
        .route(
            "/v1/messages",
            post(anthropic_messages).fallback(invalid_url),
        )
        .route("/v1/models", get(list_models).fallback(invalid_url))
        .route(
            "/v1/models/{model}",
            get(retrieve_model).fallback(invalid_url),
        )
        .merge(
            super::batches::routes()
                .merge(super::message_batches::routes())
                .route_layer(middleware::from_fn_with_state(
                    shared.clone(),
                    batch_api_gate,
                )),
        )
        .merge(super::admin::routes())
        .fallback(invalid_url)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// What the locked section decided for a valid request.
enum Decision {
    Limited(Refusal),
    /// Flex capacity short: a 429 `resource_unavailable`, not billed.
    FlexUnavailable,
    Fail {
        quota: Quota,
        delay: Duration,
    },
    Answer {
        quota: Quota,
        delay: Duration,
        cached_tokens: u64,
        written_tokens: u64,
        seed: u64,
    },
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(&shared, &headers, body, Api::OpenAi).await
}

async fn anthropic_messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(&shared, &headers, body, Api::Anthropic).await
}

/// One completion request through either API, counted and billed alike.
async fn serve(
    shared: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Response {
    let started = Instant::now();
    let sequence = shared.next_sequence();
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);

    let (model, result) = match read_body(shared, headers, body, api) {
        Err(error) => (None, Err(Failure::invalid(&error, api))),
        Ok(body) => {
            let model = body.get("model").and_then(Value::as_str).map(str::to_owned);
            let result = complete(shared, sequence, headers, &body, model.as_deref(), api).await;
            (model, result)
        }
    };
    let (outcome, mut response) = match result {
        Ok(response) => (Outcome::Succeeded, response),
        Err(Failure { outcome, response }) => (outcome, response),
    };
    shared.count(outcome, model.as_deref());

    let elapsed_ms = started.elapsed().as_millis().to_string();
    let headers = response.headers_mut();
    match api {
        Api::OpenAi => {
            insert(headers, "x-request-id", &shared.request_id(sequence));
            insert(headers, "openai-processing-ms", &elapsed_ms);
        }
        Api::Anthropic => insert(headers, "request-id", &shared.request_id(sequence)),
    }
    response
}

/// A finished error response and what it counts as.
struct Failure {
    outcome: Outcome,
    response: Response,
}

impl Failure {
    fn new(outcome: Outcome, error: &ApiError, api: Api) -> Self {
        Failure {
            outcome,
            response: api_error_response(error, api),
        }
    }

    /// A request refused as invalid: 400, 401 or 413.
    fn invalid(error: &ApiError, api: Api) -> Self {
        Failure::new(Outcome::BadRequest, error, api)
    }
}

/// An error in the shape of the API the request came through.
pub(crate) fn api_error_response(error: &ApiError, api: Api) -> Response {
    match api {
        Api::OpenAi => error_response(error),
        Api::Anthropic => bytes_response(error.status, error.to_anthropic_body()),
    }
}

/// Authorization, size and JSON checks; records the body when asked to.
fn read_body(
    shared: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Value, ApiError> {
    match api {
        Api::OpenAi => check_authorization(headers)?,
        Api::Anthropic => messages::check_headers(headers)?,
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large(MAX_BODY_BYTES)
        } else {
            ApiError::unparsable_json()
        }
    })?;
    let body: Value = serde_json::from_slice(&body).map_err(|_| ApiError::unparsable_json())?;
    if shared.record_requests.load(Ordering::Relaxed) {
        shared.record(&body);
    }
    Ok(body)
}

/// Serves one parsed chat completion request for `model` (the body's
/// `model` when it is a string).
async fn complete(
    shared: &Shared,
    sequence: u64,
    headers: &HeaderMap,
    body: &Value,
    model: Option<&str>,
    api: Api,
) -> Result<Response, Failure> {
    let effects = lock(&shared.faults).effects(Instant::now(), model);
    sleep(effects.extra_latency).await;
    if let Some(failure) = effects
        .answer
        .and_then(|kind| fault_answer(shared, kind, headers, model, api))
    {
        return Err(failure);
    }

    let (request, cache_prefix) = match api {
        Api::OpenAi => (request::parse(body), None),
        Api::Anthropic => match messages::parse(body) {
            Ok(parsed) => (Ok(parsed.chat), parsed.cache_prefix),
            Err(e) => (Err(e), None),
        },
    };
    let request = request.map_err(|error| Failure::invalid(&error, api))?;

    // The expensive parts happen before the lock.
    let generated = completion::generate(&request);
    let prompt_tokens = request.prompt.tokens;
    let (prefixes, cacheable_tokens) = cache_blocks(api, &request, cache_prefix.as_deref());
    let billed_tokens = prompt_tokens + generated.completion_tokens;
    let tier = match api {
        Api::OpenAi => request
            .service_tier
            .used_for(&request.model, &lock(&shared.flex_models)),
        Api::Anthropic => ServiceTier::Default,
    };

    let decision = {
        let mut state = lock(&shared.state);
        let now = Instant::now();
        let tiers = state.config.tiers;
        let refused =
            tier == ServiceTier::Flex && state.rng.random::<f64>() < tiers.flex_unavailable_rate;
        if refused {
            Decision::FlexUnavailable
        } else {
            match state.limiter.admit(now, billed_tokens) {
                Admission::Limited(refusal) => Decision::Limited(refusal),
                Admission::Granted(quota) => {
                    let config = state.config;
                    let fail = state.rng.random::<f64>() < config.error_rate;
                    let jitter_us = u64::try_from(config.jitter.as_micros()).unwrap_or(u64::MAX);
                    let jitter = match jitter_us {
                        0 => Duration::ZERO,
                        max => Duration::from_micros(state.rng.random_range(0..=max)),
                    };
                    let delay = config
                        .latency
                        .saturating_add(jitter)
                        .mul_f64(tiers.latency_factor(tier));
                    if fail {
                        Decision::Fail { quota, delay }
                    } else {
                        // The cache is written as the prompt is read: later
                        // requests find these prefixes once that is done.
                        let prefill = delay.mul_f64(prefill_share(config.prefill_share));
                        let cached_tokens = state.prompt_cache.lookup_and_insert(
                            now,
                            now + prefill,
                            &prefixes,
                            cacheable_tokens,
                        );
                        let (cached_tokens, written_tokens) =
                            cache_usage(api, prefixes.is_empty(), cached_tokens, cacheable_tokens);
                        Decision::Answer {
                            quota,
                            delay,
                            cached_tokens,
                            written_tokens,
                            seed: config.seed,
                        }
                    }
                }
            }
        }
    };

    match decision {
        // Refused at the door: no model time spent.
        Decision::Limited(refusal) => Err(Failure {
            outcome: Outcome::RateLimited,
            response: rate_limited_response(&request.model, &refusal, api),
        }),
        Decision::FlexUnavailable => Err(Failure::new(
            Outcome::ResourceUnavailable,
            &tiers::resource_unavailable(),
            api,
        )),
        Decision::Fail { quota, delay } => {
            sleep(delay).await;
            let error = match api {
                Api::OpenAi => ApiError::server_error(),
                Api::Anthropic => messages::overloaded(),
            };
            let mut failure = Failure::new(Outcome::ServerError, &error, api);
            insert_quota(failure.response.headers_mut(), &quota, api);
            Err(failure)
        }
        Decision::Answer {
            quota,
            delay,
            cached_tokens,
            written_tokens,
            seed,
        } => {
            sleep(delay).await;
            // Billed once the answer is ready, as `succeeded` counts it.
            shared.charge(
                tier,
                &request.model,
                SimBill {
                    requests: 0,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens: generated.completion_tokens,
                    cache_write_tokens: written_tokens,
                },
            );
            if api == Api::Anthropic {
                let message = messages::answer(
                    format!("msg_{:024x}", mix(shared.id_salt ^ sequence)),
                    &request.model,
                    generated,
                    prompt_tokens,
                    cached_tokens,
                    written_tokens,
                );
                let mut response = json_response(StatusCode::OK, &message);
                insert_quota(response.headers_mut(), &quota, api);
                return Ok(response);
            }
            let completion = ChatCompletion {
                id: completion_id(shared.id_salt ^ sequence),
                object: "chat.completion",
                created: unix_seconds(),
                model: &request.model,
                usage: Usage::new(prompt_tokens, cached_tokens, generated.completion_tokens),
                choices: generated.into_choices(),
                service_tier: tier.as_str(),
                system_fingerprint: format!("fp_{:010x}", mix(seed) & 0xff_ffff_ffff),
            };
            let mut response = json_response(StatusCode::OK, &completion);
            insert_quota(response.headers_mut(), &quota, api);
            Ok(response)
        }
    }
}

/// The block hashes of what the provider caches of `request`, and how many
/// tokens that is. OpenAI caches any long prompt's beginning; Anthropic only
/// the prefix marked with cache_control, whole.
fn cache_blocks(api: Api, request: &ChatRequest, cache_prefix: Option<&str>) -> (Vec<u64>, u64) {
    let prompt_tokens = request.prompt.tokens;
    let (cacheable, cacheable_tokens) = match (api, cache_prefix) {
        (Api::OpenAi, _) => (request.prompt.text.as_str(), prompt_tokens),
        (Api::Anthropic, Some(prefix)) => (prefix, messages::prefix_tokens(prefix, prompt_tokens)),
        (Api::Anthropic, None) => ("", 0),
    };
    let prefixes = if cacheable_tokens >= prompt_cache::MIN_CACHED_TOKENS {
        prompt_cache::prefix_hashes(&request.model, cacheable)
    } else {
        Vec::new()
    };
    (prefixes, cacheable_tokens)
}

/// (cached, written) tokens as each API reports them: OpenAI the cached
/// blocks; Anthropic the whole marked prefix, read when found, else written.
fn cache_usage(api: Api, uncacheable: bool, cached: u64, cacheable_tokens: u64) -> (u64, u64) {
    match api {
        Api::OpenAi => (cached, 0),
        Api::Anthropic if uncacheable => (0, 0),
        Api::Anthropic if cached > 0 => (cacheable_tokens, 0),
        Api::Anthropic => (0, cacheable_tokens),
    }
}

/// A prefill share made safe to multiply a delay by.
fn prefill_share(share: f64) -> f64 {
    if share.is_nan() {
        1.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// The answer of a scripted fault, in OpenAI's words; `None` for the
/// kinds that do not answer (`slow`, `refuse`).
fn fault_answer(
    shared: &Shared,
    kind: FaultKind,
    headers: &HeaderMap,
    model: Option<&str>,
    api: Api,
) -> Option<Failure> {
    let fail = |outcome, error: &ApiError| Failure::new(outcome, error, api);
    if api == Api::Anthropic {
        if let Some((outcome, error)) = messages::fault_error(kind, model) {
            return Some(fail(outcome, &error));
        }
    }
    let failure = match kind {
        FaultKind::Outage { status: 500 } => fail(Outcome::Unavailable, &ApiError::server_error()),
        FaultKind::Outage { .. } => fail(Outcome::Unavailable, &ApiError::overloaded()),
        FaultKind::Unauthorized => fail(
            Outcome::AuthError,
            &ApiError::invalid_api_key(bearer_key(headers)),
        ),
        FaultKind::Forbidden => fail(Outcome::AuthError, &ApiError::forbidden()),
        FaultKind::ModelNotFound => fail(
            Outcome::NotFound,
            &ApiError::model_not_found(model.unwrap_or_default()),
        ),
        FaultKind::Quota => fail(Outcome::QuotaError, &ApiError::insufficient_quota()),
        FaultKind::BadRequest => fail(Outcome::BadRequest, &ApiError::rejected()),
        FaultKind::RateLimitStorm { retry_after } => {
            let rpm = match lock(&shared.state).config.rpm {
                0 => STORM_NOMINAL_RPM,
                rpm => rpm,
            };
            let budget = BudgetState {
                limit: rpm,
                remaining: 0,
                reset: retry_after,
            };
            let refusal = Refusal {
                kind: LimitKind::Requests,
                retry_after: Some(retry_after),
                limit: rpm,
                used: u64::from(rpm),
                requested: 1,
                quota: Quota {
                    requests: Some(budget),
                    tokens: None,
                },
            };
            Failure {
                outcome: Outcome::RateLimited,
                response: rate_limited_response(model.unwrap_or("unknown"), &refusal, api),
            }
        }
        FaultKind::Refuse | FaultKind::Slow { .. } => return None,
    };
    Some(failure)
}

async fn sleep(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// A key is optional, but a present `Authorization` header must be `Bearer <key>`.
fn check_authorization(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(AUTHORIZATION) {
        None => Ok(()),
        Some(_) if bearer_key(headers).is_some() => Ok(()),
        Some(_) => Err(ApiError::bad_authorization()),
    }
}

/// The key of a well-formed `Authorization: Bearer <key>` header.
fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|key| !key.is_empty())
}

fn rate_limited_response(model: &str, refusal: &Refusal, api: Api) -> Response {
    let (unit, abbreviation) = match refusal.kind {
        LimitKind::Requests => ("requests", "RPM"),
        LimitKind::Tokens => ("tokens", "TPM"),
    };
    let learn_more = "Visit https://platform.openai.com/account/rate-limits to learn more.";
    let (message, retry_after) = match refusal.retry_after {
        Some(wait) => (
            format!(
                "Rate limit reached for {model} in organization org-simulator on {unit} per min \
                 ({abbreviation}): Limit {}, Used {}, Requested {}. Please try again in {}. \
                 {learn_more}",
                refusal.limit,
                refusal.used,
                refusal.requested,
                format_duration(wait)
            ),
            wait,
        ),
        None => (
            format!(
                "Request too large for {model} in organization org-simulator on {unit} per min \
                 ({abbreviation}): Limit {}, Requested {}. The input or output tokens must be \
                 reduced in order to run successfully. {learn_more}",
                refusal.limit, refusal.requested
            ),
            // It will never fit; a full window is the honest upper bound.
            Duration::from_secs(60),
        ),
    };
    let mut response =
        api_error_response(&ApiError::rate_limited(refusal.kind.as_str(), message), api);
    let headers = response.headers_mut();
    let millis = retry_after.as_micros().div_ceil(1000).max(1);
    if api == Api::OpenAi {
        insert(headers, "retry-after-ms", &millis.to_string());
    }
    insert(
        headers,
        RETRY_AFTER.as_str(),
        &millis.div_ceil(1000).to_string(),
    );
    insert_quota(headers, &refusal.quota, api);
    response
}

#[derive(Serialize)]
struct ModelObject {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

fn model_object((id, created): (&'static str, u64)) -> ModelObject {
    ModelObject {
        id,
        object: "model",
        created,
        owned_by: "system",
    }
}

async fn list_models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let response = match check_authorization(&headers) {
        Err(error) => error_response(&error),
        Ok(()) => {
            let list = ModelList {
                object: "list",
                data: MODELS.into_iter().map(model_object).collect(),
            };
            json_response(StatusCode::OK, &list)
        }
    };
    with_request_id(&shared, response)
}

async fn retrieve_model(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Response {
    let found = MODELS.into_iter().find(|(id, _)| *id == model);
    let response = match (check_authorization(&headers), found) {
        (Err(error), _) => error_response(&error),
        (Ok(()), None) => error_response(&ApiError::model_not_found(&model)),
        (Ok(()), Some(entry)) => json_response(StatusCode::OK, &model_object(entry)),
    };
    with_request_id(&shared, response)
}

/// Lets batch endpoint requests through only while the batch API is served.
async fn batch_api_gate(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if shared.batch_api.load(Ordering::Relaxed) {
        next.run(request).await
    } else {
        let (method, uri) = (request.method().clone(), request.uri().clone());
        invalid_url(State(shared), method, uri).await
    }
}

pub(crate) async fn invalid_url(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
) -> Response {
    let response = error_response(&ApiError::invalid_url(method.as_str(), uri.path()));
    with_request_id(&shared, response)
}

fn with_request_id(shared: &Shared, mut response: Response) -> Response {
    let request_id = shared.request_id(shared.next_sequence());
    insert(response.headers_mut(), "x-request-id", &request_id);
    response
}

pub(crate) fn error_response(error: &ApiError) -> Response {
    bytes_response(error.status, error.to_body())
}

pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => bytes_response(status, bytes),
        Err(_) => error_response(&ApiError::server_error()),
    }
}

fn bytes_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The `x-ratelimit-*` (or `anthropic-ratelimit-*`) headers of the
/// configured budgets.
fn insert_quota(headers: &mut HeaderMap, quota: &Quota, api: Api) {
    if api == Api::Anthropic {
        for (name, value) in messages::quota_headers(quota) {
            insert(headers, &name, &value);
        }
        return;
    }
    let budgets = [("requests", quota.requests), ("tokens", quota.tokens)];
    for (unit, budget) in budgets {
        let Some(budget) = budget else { continue };
        insert(
            headers,
            &format!("x-ratelimit-limit-{unit}"),
            &budget.limit.to_string(),
        );
        insert(
            headers,
            &format!("x-ratelimit-remaining-{unit}"),
            &budget.remaining.to_string(),
        );
        insert(
            headers,
            &format!("x-ratelimit-reset-{unit}"),
            &format_duration(budget.reset),
        );
    }
}

/// Inserts a header whose name and value the simulator itself wrote.
fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(name, value);
    }
}

/// `chatcmpl-` and 29 base-62 characters, like OpenAI's ids.
pub(crate) fn completion_id(seed: u64) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(38);
    id.push_str("chatcmpl-");
    let mut state = seed;
    for _ in 0..29 {
        state = mix(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
        id.push(char::from(ALPHABET[(state % 62) as usize]));
    }
    id
}

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_is_optional_but_must_be_bearer_when_present() {
        let mut headers = HeaderMap::new();
        assert!(check_authorization(&headers).is_ok());
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer sk-test"));
        assert!(check_authorization(&headers).is_ok());
        for bad in ["sk-test", "Bearer ", "Basic dXNlcjpwYXNz"] {
            headers.insert(AUTHORIZATION, HeaderValue::from_static(bad));
            let error = check_authorization(&headers).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED, "{bad}");
        }
    }

    /// Sends one chat completion with `instructions` as its system prompt.
    async fn chat(shared: &Shared, sequence: u64, instructions: &str, question: &str) {
        let body = serde_json::json!({
            "model": "gpt-4.1-mini",
            "messages": [
                {"role": "system", "content": instructions},
                {"role": "user", "content": question}
            ]
        });
        let answer = complete(
            shared,
            sequence,
            &HeaderMap::new(),
            &body,
            Some("gpt-4.1-mini"),
            Api::OpenAi,
        )
        .await;
        assert!(answer.is_ok(), "request {sequence} answered");
    }

    fn cached_tokens(shared: &Shared) -> u64 {
        lock(&shared.bill)
            .get("gpt-4.1-mini")
            .map_or(0, |b| b.cached_tokens)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_with_a_new_prefix_miss_and_a_later_one_hits() {
        let shared = Shared::new(SimConfig {
            latency: Duration::from_secs(2),
            prefill_share: 0.5,
            ..SimConfig::default()
        });
        // About 1500 tokens of shared instructions.
        let instructions = "Follow the house style guide for every answer. ".repeat(125);

        // Both arrive before the first has been read: both miss.
        let started = Instant::now();
        tokio::join!(chat(&shared, 1, &instructions, "ticket 1"), async {
            tokio::time::sleep(Duration::from_millis(900)).await;
            chat(&shared, 2, &instructions, "ticket 2").await;
        });
        assert_eq!(cached_tokens(&shared), 0, "no request found the prefix");

        // After the first one's prefill (1 s), the prefix is there.
        assert!(started.elapsed() >= Duration::from_secs(2));
        chat(&shared, 3, &instructions, "ticket 3").await;
        assert!(cached_tokens(&shared) >= 1024, "the third request hit");
    }

    #[tokio::test(start_paused = true)]
    async fn batch_lines_find_the_prefixes_of_the_lines_before_them_unless_batch_cache_is_off() {
        let instructions = "Follow the house style guide for every answer. ".repeat(125);
        let line = |text: &str| {
            request::parse(&serde_json::json!({
                "model": "gpt-4.1-mini",
                "messages": [
                    {"role": "system", "content": instructions},
                    {"role": "user", "content": text},
                ],
            }))
            .unwrap()
        };
        let on = Shared::new(SimConfig::default());
        assert_eq!(on.batch_line_cache(Api::OpenAi, &line("a"), None), (0, 0));
        let (cached, written) = on.batch_line_cache(Api::OpenAi, &line("b"), None);
        assert!(cached >= 1024 && cached % 128 == 0, "cached {cached}");
        assert_eq!(written, 0);

        let off = Shared::new(SimConfig {
            batch_cache: false,
            ..SimConfig::default()
        });
        off.batch_line_cache(Api::OpenAi, &line("a"), None);
        assert_eq!(off.batch_line_cache(Api::OpenAi, &line("b"), None), (0, 0));
    }

    #[test]
    fn prefill_shares_are_clamped() {
        assert_eq!(prefill_share(f64::NAN), 1.0);
        assert_eq!(prefill_share(-1.0), 0.0);
        assert_eq!(prefill_share(2.0), 1.0);
        assert_eq!(prefill_share(0.25), 0.25);
    }

    #[test]
    fn completion_ids_look_like_openai_ids_and_differ() {
        let id = completion_id(1);
        assert_eq!(id.len(), "chatcmpl-".len() + 29);
        assert!(id.starts_with("chatcmpl-"));
        assert!(id["chatcmpl-".len()..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(completion_id(1), completion_id(2));
    }
}
