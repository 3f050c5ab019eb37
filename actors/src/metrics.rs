//! Every metric batchd reports, named once, as PROTOCOL.md spells them, with
//! small typed functions so business logic never spells a metric name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{LazyLock, Mutex, RwLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::messages::ActorKind;
use crate::task::{ErrorKind, Priority, RouteKind, Status, Usage};

/// A route's adaptive concurrency limit.
pub const ROUTE_CONCURRENCY_LIMIT: &str = "batchd_route_concurrency_limit";
/// A route's rate budget per minute (`kind`: requests or tokens), configured
/// or learned from the provider's headers; absent until known.
pub const ROUTE_RATE_LIMIT: &str = "batchd_route_rate_limit";
/// 1 while a route's circuit is open for `reason`.
pub const ROUTE_CIRCUIT_OPEN: &str = "batchd_route_circuit_open";
/// Every `reason` label of [`ROUTE_CIRCUIT_OPEN`].
pub const CIRCUIT_REASONS: [&str; 4] = [
    "unavailable",
    "unauthorized",
    "model_not_found",
    "quota_exhausted",
];

/// Tasks of a route whose circuit is open, requeued at the back of their queue.
pub const TASKS_PARKED_TOTAL: &str = "batchd_tasks_parked_total";
/// Tasks handed back because another replica holds the claim on their call.
pub const CALLS_CLAIMED_ELSEWHERE_TOTAL: &str = "batchd_calls_claimed_elsewhere_total";
/// Tasks answered from a call made for an identical request (dedupe).
pub const TASKS_DEDUPLICATED_TOTAL: &str = "batchd_tasks_deduplicated_total";
/// Tier classifier verdicts for `auto` tasks, by `result`.
pub const TIER_CLASSIFIER_TOTAL: &str = "batchd_tier_classifier_total";
/// Every `result` label of [`TIER_CLASSIFIER_TOTAL`]: a call answered with a
/// tier, a verdict from the cache, one shared with an identical prompt's
/// call in flight, and no verdict (failed, timed out or unparseable: the
/// task falls back to prompt size).
pub const TIER_CLASSIFIER_RESULTS: [&str; 4] = ["ok", "cached", "shared", "failed"];

/// Tasks waiting or in flight, per priority.
pub const QUEUE_DEPTH: &str = "batchd_queue_depth";
/// Age of the oldest unfinished task, per priority.
pub const OLDEST_TASK_AGE_SECONDS: &str = "batchd_oldest_task_age_seconds";
/// Tasks received (first deliveries), per priority.
pub const TASKS_RECEIVED_TOTAL: &str = "batchd_tasks_received_total";
/// Terminal outcomes, per priority, status and model.
pub const TASKS_COMPLETED_TOTAL: &str = "batchd_tasks_completed_total";
/// Publish → dispatch.
pub const TASK_QUEUE_SECONDS: &str = "batchd_task_queue_seconds";
/// Publish → outcome.
pub const TASK_LATENCY_SECONDS: &str = "batchd_task_latency_seconds";
/// Tasks per sealed batch.
pub const BATCH_SIZE: &str = "batchd_batch_size";
/// Tasks per sealed batch over the batch's max size.
pub const BATCH_FILL_RATIO: &str = "batchd_batch_fill_ratio";
/// Provider requests by outcome.
pub const PROVIDER_REQUESTS_TOTAL: &str = "batchd_provider_requests_total";
/// Provider request duration.
pub const PROVIDER_REQUEST_SECONDS: &str = "batchd_provider_request_seconds";
/// 429 answers seen.
pub const RATE_LIMITED_TOTAL: &str = "batchd_rate_limited_total";
/// Flex calls refused for want of flex capacity, by where the task went.
pub const FLEX_FALLBACKS_TOTAL: &str = "batchd_flex_fallbacks_total";
/// Provider batch jobs of priority-2 work cancelled for outlasting their
/// patience (their unanswered tasks went realtime).
pub const BATCH_JOBS_CANCELLED_TOTAL: &str = "batchd_batch_jobs_cancelled_total";
/// 1 while a route waits out a Retry-After.
pub const ROUTE_PAUSED: &str = "batchd_route_paused";
/// Tasks sent back for another attempt, by reason.
pub const RETRIES_TOTAL: &str = "batchd_retries_total";
/// Dead letters, by reason.
pub const DEAD_LETTERS_TOTAL: &str = "batchd_dead_letters_total";
/// Spend, per model, tenant and priority.
pub const COST_USD_TOTAL: &str = "batchd_cost_usd_total";
/// Tokens, per model and kind.
pub const TOKENS_TOTAL: &str = "batchd_tokens_total";
/// Preemptions of bulk batches.
pub const PREEMPTIONS_TOTAL: &str = "batchd_preemptions_total";
/// Checkpoints written.
pub const CHECKPOINTS_TOTAL: &str = "batchd_checkpoints_total";
/// Batches preempted now, waiting to resume.
pub const PREEMPTED_BATCHES: &str = "batchd_preempted_batches";
/// Per priority: the larger of its oldest wait and its recent p99, over its target.
pub const PRIORITY_TARGET_RATIO: &str = "batchd_priority_target_ratio";
/// Actor restarts, per actor.
pub const ACTOR_RESTARTS_TOTAL: &str = "batchd_actor_restarts_total";
/// Spend over budget per tenant and period (`daily`, `monthly`).
pub const BUDGET_USED_RATIO: &str = "batchd_budget_used_ratio";
/// Prompt tokens of answered realtime calls, per route (provider, model).
pub const ROUTE_PROMPT_TOKENS_TOTAL: &str = "batchd_route_prompt_tokens_total";
/// Of those, the tokens read from the provider's prompt cache, per route.
pub const ROUTE_CACHED_TOKENS_TOTAL: &str = "batchd_route_cached_tokens_total";
/// USD the cached tokens saved (input price less cached price), per route.
pub const CACHE_SAVED_USD_TOTAL: &str = "batchd_cache_saved_usd_total";

/// Histogram metrics measured in seconds (they share latency buckets).
pub const SECONDS_HISTOGRAMS: [&str; 3] = [
    TASK_QUEUE_SECONDS,
    TASK_LATENCY_SECONDS,
    PROVIDER_REQUEST_SECONDS,
];

/// The histograms: Prometheus sees each as `_bucket`, `_sum` and `_count` series.
pub const HISTOGRAMS: [&str; 5] = concat(SECONDS_HISTOGRAMS, [BATCH_SIZE, BATCH_FILL_RATIO]);

/// Every metric name above: rules and dashboards may use these and no others.
pub const ALL: [&str; 34] = concat(
    HISTOGRAMS,
    [
        FLEX_FALLBACKS_TOTAL,
        BATCH_JOBS_CANCELLED_TOTAL,
        QUEUE_DEPTH,
        OLDEST_TASK_AGE_SECONDS,
        TASKS_RECEIVED_TOTAL,
        TASKS_COMPLETED_TOTAL,
        PROVIDER_REQUESTS_TOTAL,
        RATE_LIMITED_TOTAL,
        ROUTE_PAUSED,
        ROUTE_CONCURRENCY_LIMIT,
        ROUTE_RATE_LIMIT,
        ROUTE_CIRCUIT_OPEN,
        RETRIES_TOTAL,
        DEAD_LETTERS_TOTAL,
        TASKS_PARKED_TOTAL,
        CALLS_CLAIMED_ELSEWHERE_TOTAL,
        TASKS_DEDUPLICATED_TOTAL,
        TIER_CLASSIFIER_TOTAL,
        COST_USD_TOTAL,
        TOKENS_TOTAL,
        PREEMPTIONS_TOTAL,
        CHECKPOINTS_TOTAL,
        PREEMPTED_BATCHES,
        PRIORITY_TARGET_RATIO,
        ACTOR_RESTARTS_TOTAL,
        BUDGET_USED_RATIO,
        ROUTE_PROMPT_TOKENS_TOTAL,
        ROUTE_CACHED_TOKENS_TOTAL,
        CACHE_SAVED_USD_TOTAL,
    ],
);

/// `a` then `b`, as one list of `N` names (`N` must be their two lengths'
/// sum: the compiler checks it where a constant is built).
const fn concat<const A: usize, const B: usize, const N: usize>(
    a: [&'static str; A],
    b: [&'static str; B],
) -> [&'static str; N] {
    assert!(A + B == N, "concat: N is not A + B");
    let mut out = [""; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

/// True when `series` is a name batchd exports: a metric of [`ALL`], or a
/// histogram's `_bucket`, `_sum` or `_count` series.
pub fn is_exported(series: &str) -> bool {
    if ALL.contains(&series) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        series
            .strip_suffix(suffix)
            .is_some_and(|base| HISTOGRAMS.contains(&base))
    })
}

/// Every `outcome` label of [`PROVIDER_REQUESTS_TOTAL`].
pub const PROVIDER_OUTCOMES: [&str; 6] = [
    "ok",
    "rate_limited",
    "route_down",
    "rejected",
    "transient",
    "flex_unavailable",
];
/// Every `to` label of [`FLEX_FALLBACKS_TOTAL`].
pub const FLEX_FALLBACK_TARGETS: [&str; 2] = ["standard", "batch_api"];
/// Every `reason` label of [`RETRIES_TOTAL`].
pub const RETRY_REASONS: [&str; 4] = ["server_error", "timeout", "conflict", "connection"];
/// Every `kind` label of [`TOKENS_TOTAL`].
pub const TOKEN_KINDS: [&str; 3] = ["input", "cached_input", "output"];
/// The label value standing for every model or tenant outside the bounded set.
pub const OTHER: &str = "other";
/// The tenant of a task that names none.
pub const DEFAULT_TENANT: &str = "default";

/// Buckets for the seconds histograms: 5 ms to 1 h (Batch API jobs take hours).
pub const SECONDS_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Buckets for batch sizes.
pub const BATCH_SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Buckets for fill ratios.
pub const FILL_RATIO_BUCKETS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// A first delivery of a task.
pub fn task_received(p: Priority) {
    counter!(TASKS_RECEIVED_TOTAL, "priority" => p.label()).increment(1);
}

/// A terminal outcome, with its end-to-end latency.
pub fn task_completed(p: Priority, status: Status, model: &str, latency: Duration) {
    counter!(TASKS_COMPLETED_TOTAL, "priority" => p.label(), "status" => status.as_str(), "model" => model_label(model))
        .increment(1);
    histogram!(TASK_LATENCY_SECONDS, "priority" => p.label()).record(latency.as_secs_f64());
}

/// A task handed to a provider after waiting `queued`.
pub fn task_dispatched(p: Priority, queued: Duration) {
    histogram!(TASK_QUEUE_SECONDS, "priority" => p.label()).record(queued.as_secs_f64());
}

/// A sealed batch.
pub fn batch_sealed(p: Priority, route: RouteKind, size: usize, fill_ratio: f64) {
    histogram!(BATCH_SIZE, "priority" => p.label(), "route" => route.as_str()).record(size as f64);
    histogram!(BATCH_FILL_RATIO, "priority" => p.label(), "route" => route.as_str())
        .record(fill_ratio);
}

/// One provider request and how it went (`ok`, `rate_limited`, `transient`, `rejected`, `timeout`).
pub fn provider_request(provider: &str, model: &str, outcome: &'static str, took: Duration) {
    counter!(PROVIDER_REQUESTS_TOTAL, "provider" => provider.to_owned(), "model" => model.to_owned(), "outcome" => outcome)
        .increment(1);
    histogram!(PROVIDER_REQUEST_SECONDS, "provider" => provider.to_owned(), "model" => model.to_owned())
        .record(took.as_secs_f64());
}

/// A 429 from a provider.
pub fn rate_limited(provider: &str, model: &str) {
    counter!(RATE_LIMITED_TOTAL, "provider" => provider.to_owned(), "model" => model.to_owned())
        .increment(1);
}

/// What a route's gauges show at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteGauges {
    /// Waiting out a Retry-After.
    pub paused: bool,
    /// Current adaptive concurrency limit.
    pub concurrency_limit: usize,
    /// Requests per minute, when known.
    pub rpm_limit: Option<u64>,
    /// Tokens per minute, when known.
    pub tpm_limit: Option<u64>,
    /// Why the circuit is open, if it is.
    pub circuit: Option<&'static str>,
}

/// A route's state: pause, concurrency, rate budget, circuit.
pub fn route_status(provider: &str, model: &str, g: &RouteGauges) {
    let (p, m) = (provider.to_owned(), model.to_owned());
    gauge!(ROUTE_PAUSED, "provider" => p.clone(), "model" => m.clone()).set(if g.paused {
        1.0
    } else {
        0.0
    });
    gauge!(ROUTE_CONCURRENCY_LIMIT, "provider" => p.clone(), "model" => m.clone())
        .set(g.concurrency_limit as f64);
    for (kind, limit) in [("requests", g.rpm_limit), ("tokens", g.tpm_limit)] {
        if let Some(limit) = limit {
            gauge!(ROUTE_RATE_LIMIT, "provider" => p.clone(), "model" => m.clone(), "kind" => kind)
                .set(limit as f64);
        }
    }
    for reason in CIRCUIT_REASONS {
        let open = g.circuit == Some(reason);
        gauge!(ROUTE_CIRCUIT_OPEN, "provider" => p.clone(), "model" => m.clone(), "reason" => reason)
            .set(if open { 1.0 } else { 0.0 });
    }
}

/// A task of a route that is down, requeued at the back of its queue.
pub fn parked() {
    counter!(TASKS_PARKED_TOTAL).increment(1);
}

/// A task handed back because another replica holds the claim on its call.
pub fn claimed_elsewhere() {
    counter!(CALLS_CLAIMED_ELSEWHERE_TOTAL).increment(1);
}

/// A flex call refused (429 resource unavailable); the task went `to`
/// (`standard` or `batch_api`).
pub fn flex_fallback(provider: &str, model: &str, to: &'static str) {
    counter!(FLEX_FALLBACKS_TOTAL, "provider" => provider.to_owned(), "model" => model.to_owned(), "to" => to)
        .increment(1);
}

/// A priority-2 batch job cancelled for outlasting its patience.
pub fn batch_job_cancelled(provider: &str, model: &str) {
    counter!(BATCH_JOBS_CANCELLED_TOTAL, "provider" => provider.to_owned(), "model" => model.to_owned())
        .increment(1);
}

/// A task answered from a call made for an identical request.
pub fn deduplicated() {
    counter!(TASKS_DEDUPLICATED_TOTAL).increment(1);
}

/// A tier classifier verdict (one of [`TIER_CLASSIFIER_RESULTS`]).
pub fn tier_classified(result: &'static str) {
    counter!(TIER_CLASSIFIER_TOTAL, "result" => result).increment(1);
}

/// A task sent back for another attempt.
pub fn retried(reason: &'static str) {
    counter!(RETRIES_TOTAL, "reason" => reason).increment(1);
}

/// A dead letter.
pub fn dead_lettered(reason: &'static str) {
    counter!(DEAD_LETTERS_TOTAL, "reason" => reason).increment(1);
}

/// Spend and tokens of one task.
pub fn spent(model: &str, tenant: &str, p: Priority, cost_usd: f64, usage: &Usage) {
    let model = model_label(model);
    add_cost(&model, &tenant_label(tenant), p, cost_usd);
    let model = model.as_str();
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    counter!(TOKENS_TOTAL, "model" => model.to_owned(), "kind" => "input")
        .increment(usage.input_tokens - cached);
    counter!(TOKENS_TOTAL, "model" => model.to_owned(), "kind" => "cached_input").increment(cached);
    counter!(TOKENS_TOTAL, "model" => model.to_owned(), "kind" => "output")
        .increment(usage.output_tokens);
}

/// Prompt and cached tokens of one answered realtime call on a route, and
/// what its cached tokens saved.
pub fn prompt_cache(provider: &str, model: &str, usage: &Usage, saved_usd: f64) {
    let model = model_label(model);
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    counter!(ROUTE_PROMPT_TOKENS_TOTAL, "provider" => provider.to_owned(), "model" => model.clone())
        .increment(usage.input_tokens);
    counter!(ROUTE_CACHED_TOKENS_TOTAL, "provider" => provider.to_owned(), "model" => model.clone())
        .increment(cached);
    if saved_usd.is_finite() && saved_usd > 0.0 {
        let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
        *saved.entry((provider.to_owned(), model)).or_insert(0.0) += saved_usd;
    }
}

/// Spend over budget of one tenant in one period.
pub fn budget_used(tenant: &str, period: &'static str, ratio: f64) {
    gauge!(BUDGET_USED_RATIO, "tenant" => tenant_label(tenant), "period" => period).set(ratio);
}

/// Queue depth and oldest age of one priority.
pub fn backlog(p: Priority, depth: u64, oldest_age: Option<Duration>) {
    gauge!(QUEUE_DEPTH, "priority" => p.label()).set(depth as f64);
    gauge!(OLDEST_TASK_AGE_SECONDS, "priority" => p.label())
        .set(oldest_age.map_or(0.0, |a| a.as_secs_f64()));
}

/// A bulk batch of priority `p` preempted.
pub fn preempted(p: Priority) {
    counter!(PREEMPTIONS_TOTAL, "priority" => p.label()).increment(1);
}

/// A checkpoint written.
pub fn checkpoint_written() {
    counter!(CHECKPOINTS_TOTAL).increment(1);
}

/// Batches preempted now.
pub fn preempted_batches(count: usize) {
    gauge!(PREEMPTED_BATCHES).set(count as f64);
}

/// How close priority `p` is to its service target (1: at it).
pub fn priority_target_ratio(p: Priority, ratio: f64) {
    gauge!(PRIORITY_TARGET_RATIO, "priority" => p.label()).set(ratio);
}

/// An actor restarted by the supervisor.
pub fn actor_restarted(actor: &'static str) {
    counter!(ACTOR_RESTARTS_TOTAL, "actor" => actor).increment(1);
}

/// Registers every metric with its help text so `/metrics` lists them from the start.
pub fn describe() {
    for name in ALL {
        let Some(help) = help(name) else { continue };
        // Prometheus naming: `_seconds` is the unit; `_total` marks a counter.
        let unit = name.ends_with("_seconds").then_some(metrics::Unit::Seconds);
        metrics::with_recorder(|r| {
            if HISTOGRAMS.contains(&name) {
                r.describe_histogram(name.into(), unit, help.into());
            } else if name.ends_with("_total") {
                r.describe_counter(name.into(), unit, help.into());
            } else {
                r.describe_gauge(name.into(), unit, help.into());
            }
        });
    }
    // Counters that only later work increments still show at zero.
    for p in [Priority::P2, Priority::P3] {
        counter!(PREEMPTIONS_TOTAL, "priority" => p.label()).absolute(0);
    }
    counter!(CHECKPOINTS_TOTAL).absolute(0);
    gauge!(PREEMPTED_BATCHES).set(0.0);
    for p in Priority::ALL {
        gauge!(PRIORITY_TARGET_RATIO, "priority" => p.label()).set(0.0);
    }
}

/// The help text `/metrics` shows for `name`, for the metrics that have one.
fn help(name: &str) -> Option<&'static str> {
    Some(match name {
        QUEUE_DEPTH => "Tasks waiting or in flight, per priority",
        OLDEST_TASK_AGE_SECONDS => "Age of the oldest unfinished task",
        TASKS_RECEIVED_TOTAL => "Tasks received (first deliveries)",
        TASKS_COMPLETED_TOTAL => "Terminal outcomes published",
        TASK_QUEUE_SECONDS => "Publish to dispatch",
        TASK_LATENCY_SECONDS => "Publish to outcome",
        BATCH_SIZE => "Tasks per sealed batch",
        BATCH_FILL_RATIO => "Batch size over the priority's max size",
        PROVIDER_REQUESTS_TOTAL => "Provider requests by outcome",
        PROVIDER_REQUEST_SECONDS => "Provider request duration",
        RATE_LIMITED_TOTAL => "429 answers from providers",
        FLEX_FALLBACKS_TOTAL => "Flex calls refused for want of capacity (429 resource_unavailable), by where the task went",
        BATCH_JOBS_CANCELLED_TOTAL => "Provider batch jobs of priority-2 work cancelled for outlasting their patience",
        ROUTE_PAUSED => "1 while a route waits out a Retry-After",
        RETRIES_TOTAL => "Tasks sent back for another attempt, by reason",
        ROUTE_CONCURRENCY_LIMIT => "Adaptive concurrency limit per route",
        ROUTE_RATE_LIMIT => {
            "Rate budget per minute per route (kind: requests or tokens), configured or learned"
        }
        ROUTE_CIRCUIT_OPEN => "1 while a route's circuit is open, by reason",
        DEAD_LETTERS_TOTAL => "Dead letters by reason",
        TOKENS_TOTAL => "Tokens by kind",
        PREEMPTIONS_TOTAL => "Bulk batches preempted by priority-1 work",
        CHECKPOINTS_TOTAL => "Checkpoints written",
        PREEMPTED_BATCHES => "Bulk batches preempted now, waiting to resume",
        PRIORITY_TARGET_RATIO => "Per priority: the larger of its oldest waiting task's age and its recent p99 publish-to-outcome time, over its service target (1: at the target)",
        ACTOR_RESTARTS_TOTAL => "Actor restarts by the supervisor",
        BUDGET_USED_RATIO => "Spend over budget per tenant and period (daily, monthly)",
        ROUTE_PROMPT_TOKENS_TOTAL => "Prompt tokens of answered realtime calls, per route",
        TIER_CLASSIFIER_TOTAL => "Tier classifier verdicts for auto tasks, by result (ok, cached, shared, failed)",
        ROUTE_CACHED_TOKENS_TOTAL => {
            "Prompt tokens read from the provider's prompt cache, per route"
        }
        _ => return None,
    })
}

/// The label values `/metrics` may use for what producers control.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownLabels {
    /// Configured routes: (provider, model).
    pub routes: Vec<(String, String)>,
    /// Tenants with a label of their own; later ones are [`OTHER`].
    pub max_tenants: usize,
    /// Tenants with a budget and its periods (`daily`, `monthly`).
    pub budgets: Vec<(String, Vec<&'static str>)>,
}

/// The bounded label sets, once [`init`] has run; before it (engine tests
/// without a config) labels pass through.
#[derive(Debug, Default)]
struct Bounds {
    models: BTreeSet<String>,
    max_tenants: usize,
    tenants: BTreeSet<String>,
}

static BOUNDS: RwLock<Option<Bounds>> = RwLock::new(None);

impl Bounds {
    fn model(&self, model: &str) -> String {
        if model.is_empty() || self.models.contains(model) {
            model.to_owned()
        } else {
            OTHER.to_owned()
        }
    }

    fn tenant(&mut self, tenant: &str) -> String {
        if self.tenants.contains(tenant) {
            return tenant.to_owned();
        }
        if self.tenants.len() < self.max_tenants {
            self.tenants.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        OTHER.to_owned()
    }
}

/// The `model` label of `model`: itself when a configured route serves it
/// (or when it is empty: no model was chosen), else [`OTHER`].
pub fn model_label(model: &str) -> String {
    let bounds = BOUNDS.read().unwrap_or_else(|e| e.into_inner());
    match &*bounds {
        Some(b) => b.model(model),
        None => model.to_owned(),
    }
}

/// The `tenant` label of `tenant`: itself while fewer than the cap of
/// tenants have a label (first come, first labelled), else [`OTHER`].
pub fn tenant_label(tenant: &str) -> String {
    // Every task's spend passes here: a shared read lock answers for known
    // tenants and a full cap; only a new tenant under the cap takes the
    // write lock.
    {
        let bounds = BOUNDS.read().unwrap_or_else(|e| e.into_inner());
        match &*bounds {
            None => return tenant.to_owned(),
            Some(b) if b.tenants.contains(tenant) => return tenant.to_owned(),
            Some(b) if b.tenants.len() >= b.max_tenants => return OTHER.to_owned(),
            Some(_) => {}
        }
    }
    let mut bounds = BOUNDS.write().unwrap_or_else(|e| e.into_inner());
    match bounds.as_mut() {
        Some(b) => b.tenant(tenant),
        None => tenant.to_owned(),
    }
}

/// Bounds the label values and sets every known series to zero, so
/// `/metrics` is complete from the first scrape and `rate()` sees the first
/// event. Routes add up when called again (several engines in one process).
pub fn init(known: &KnownLabels) {
    {
        let mut bounds = BOUNDS.write().unwrap_or_else(|e| e.into_inner());
        let b = bounds.get_or_insert_with(Bounds::default);
        b.models
            .extend(known.routes.iter().map(|(_, model)| model.clone()));
        b.max_tenants = known.max_tenants;
        b.tenant(DEFAULT_TENANT);
    }
    for kind in ActorKind::ALL {
        counter!(ACTOR_RESTARTS_TOTAL, "actor" => kind.name()).absolute(0);
    }
    for (tenant, periods) in &known.budgets {
        for period in periods {
            gauge!(BUDGET_USED_RATIO, "tenant" => tenant_label(tenant), "period" => *period)
                .increment(0.0);
        }
    }
    counter!(TASKS_PARKED_TOTAL).absolute(0);
    counter!(CALLS_CLAIMED_ELSEWHERE_TOTAL).absolute(0);
    counter!(TASKS_DEDUPLICATED_TOTAL).absolute(0);
    for result in TIER_CLASSIFIER_RESULTS {
        counter!(TIER_CLASSIFIER_TOTAL, "result" => result).increment(0);
    }
    for reason in RETRY_REASONS {
        counter!(RETRIES_TOTAL, "reason" => reason).increment(0);
    }
    for kind in ErrorKind::ALL {
        counter!(DEAD_LETTERS_TOTAL, "reason" => kind.as_str()).increment(0);
    }
    for p in Priority::ALL {
        counter!(TASKS_RECEIVED_TOTAL, "priority" => p.label()).increment(0);
        gauge!(QUEUE_DEPTH, "priority" => p.label()).increment(0.0);
        gauge!(OLDEST_TASK_AGE_SECONDS, "priority" => p.label()).increment(0.0);
        let _ = histogram!(TASK_QUEUE_SECONDS, "priority" => p.label());
        let _ = histogram!(TASK_LATENCY_SECONDS, "priority" => p.label());
        for route in RouteKind::ALL {
            let _ = histogram!(BATCH_SIZE, "priority" => p.label(), "route" => route.as_str());
            let _ =
                histogram!(BATCH_FILL_RATIO, "priority" => p.label(), "route" => route.as_str());
        }
        for status in Status::ALL {
            counter!(TASKS_COMPLETED_TOTAL, "priority" => p.label(), "status" => status.as_str(), "model" => "")
                .increment(0);
        }
    }
    for (provider, model) in &known.routes {
        let (pr, mo) = (provider.clone(), model.clone());
        for outcome in PROVIDER_OUTCOMES {
            counter!(PROVIDER_REQUESTS_TOTAL, "provider" => pr.clone(), "model" => mo.clone(), "outcome" => outcome)
                .increment(0);
        }
        let _ =
            histogram!(PROVIDER_REQUEST_SECONDS, "provider" => pr.clone(), "model" => mo.clone());
        counter!(RATE_LIMITED_TOTAL, "provider" => pr.clone(), "model" => mo.clone()).increment(0);
        for to in FLEX_FALLBACK_TARGETS {
            counter!(FLEX_FALLBACKS_TOTAL, "provider" => pr.clone(), "model" => mo.clone(), "to" => to)
                .increment(0);
        }
        counter!(BATCH_JOBS_CANCELLED_TOTAL, "provider" => pr.clone(), "model" => mo.clone())
            .increment(0);
        gauge!(ROUTE_PAUSED, "provider" => pr.clone(), "model" => mo.clone()).increment(0.0);
        for reason in CIRCUIT_REASONS {
            gauge!(ROUTE_CIRCUIT_OPEN, "provider" => pr.clone(), "model" => mo.clone(), "reason" => reason)
                .increment(0.0);
        }
        for kind in TOKEN_KINDS {
            counter!(TOKENS_TOTAL, "model" => mo.clone(), "kind" => kind).increment(0);
        }
        counter!(ROUTE_PROMPT_TOKENS_TOTAL, "provider" => pr.clone(), "model" => mo.clone())
            .increment(0);
        counter!(ROUTE_CACHED_TOKENS_TOTAL, "provider" => pr.clone(), "model" => mo.clone())
            .increment(0);
        SAVED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((pr.clone(), mo.clone()))
            .or_insert(0.0);
        for p in Priority::ALL {
            for status in Status::ALL {
                counter!(TASKS_COMPLETED_TOTAL, "priority" => p.label(), "status" => status.as_str(), "model" => mo.clone())
                    .increment(0);
            }
            let mut cost = COST.lock().unwrap_or_else(|e| e.into_inner());
            cost.entry((mo.clone(), DEFAULT_TENANT.to_owned(), p.label()))
                .or_insert(0.0);
        }
    }
}

/// Spend totals by (model, tenant, priority). The `metrics` facade only has
/// integer counters, so USD totals are kept here; the exporter renders
/// [`cost_totals`] next to its own output under [`COST_USD_TOTAL`].
static COST: LazyLock<Mutex<BTreeMap<CostKey, f64>>> = LazyLock::new(Mutex::default);

/// (model, tenant, priority label).
type CostKey = (String, String, &'static str);

fn add_cost(model: &str, tenant: &str, p: Priority, usd: f64) {
    if !usd.is_finite() || usd <= 0.0 {
        return;
    }
    let mut cost = COST.lock().unwrap_or_else(|e| e.into_inner());
    *cost
        .entry((model.to_owned(), tenant.to_owned(), p.label()))
        .or_insert(0.0) += usd;
}

/// One spend total of [`COST_USD_TOTAL`].
#[derive(Debug, Clone, PartialEq)]
pub struct CostTotal {
    /// The `model` label.
    pub model: String,
    /// The `tenant` label.
    pub tenant: String,
    /// The `priority` label.
    pub priority: &'static str,
    /// USD so far.
    pub usd: f64,
}

/// USD saved by cached tokens per (provider, model), rendered by the
/// exporter under [`CACHE_SAVED_USD_TOTAL`] like [`COST`].
static SAVED: LazyLock<Mutex<BTreeMap<(String, String), f64>>> = LazyLock::new(Mutex::default);

/// The cache savings so far per route: (provider, model, USD), ordered.
pub fn cache_savings() -> Vec<(String, String, f64)> {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
    saved
        .iter()
        .map(|((provider, model), usd)| (provider.clone(), model.clone(), *usd))
        .collect()
}

/// The spend totals so far, ordered by model, tenant and priority.
pub fn cost_totals() -> Vec<CostTotal> {
    let cost = COST.lock().unwrap_or_else(|e| e.into_inner());
    cost.iter()
        .map(|((model, tenant, priority), usd)| CostTotal {
            model: model.clone(),
            tenant: tenant.clone(),
            priority,
            usd: *usd,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_model_is_grouped_as_other_and_no_model_stays_empty() {
        let b = Bounds {
            models: ["gpt-4.1-mini".to_owned()].into(),
            ..Bounds::default()
        };
        assert_eq!(b.model("gpt-4.1-mini"), "gpt-4.1-mini");
        assert_eq!(b.model("made-up-model-42"), OTHER);
        assert_eq!(b.model(""), "");
    }

    #[test]
    fn tenants_beyond_the_cap_are_grouped_as_other() {
        let mut b = Bounds {
            max_tenants: 2,
            ..Bounds::default()
        };
        assert_eq!(b.tenant("a"), "a");
        assert_eq!(b.tenant("b"), "b");
        assert_eq!(b.tenant("c"), OTHER);
        assert_eq!(b.tenant("a"), "a", "a labelled tenant keeps its label");
    }

    #[test]
    fn every_histogram_is_a_metric_and_its_series_are_exported() {
        for h in HISTOGRAMS {
            assert!(ALL.contains(&h), "{h}");
            for suffix in ["_bucket", "_sum", "_count"] {
                assert!(is_exported(&format!("{h}{suffix}")));
            }
        }
        assert!(is_exported(QUEUE_DEPTH));
        assert!(!is_exported("batchd_queue_depth_bucket"));
        assert!(is_exported("batchd_budget_used_ratio"));
        assert!(!is_exported("batchd_budget_used_ratio_bucket"));
    }

    #[test]
    fn spend_adds_up_per_label_set() {
        add_cost("m-total", "t1", Priority::P2, 0.25);
        add_cost("m-total", "t1", Priority::P2, 0.5);
        add_cost("m-total", "t1", Priority::P2, f64::NAN);
        let totals: Vec<CostTotal> = cost_totals()
            .into_iter()
            .filter(|t| t.model == "m-total")
            .collect();
        assert_eq!(
            totals,
            vec![CostTotal {
                model: "m-total".into(),
                tenant: "t1".into(),
                priority: "2",
                usd: 0.75
            }]
        );
    }
}
