//! The task model of protocol v1: what a producer publishes ([`Task`]), what
//! batchd answers ([`Outcome`]) and what it parks in the DLQ ([`DeadLetter`]).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The three priority classes, one JetStream subject and consumer each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Priority {
    /// Premium work, served first.
    P1,
    /// Standard work.
    P2,
    /// Bulk or free-tier work.
    P3,
}

impl Priority {
    /// All priorities, highest first.
    pub const ALL: [Priority; 3] = [Priority::P1, Priority::P2, Priority::P3];

    /// The number used on the wire (`priority` field) and in metric labels.
    pub fn number(self) -> u8 {
        match self {
            Priority::P1 => 1,
            Priority::P2 => 2,
            Priority::P3 => 3,
        }
    }

    /// The subject token: `p1`, `p2`, `p3`.
    pub fn token(self) -> &'static str {
        match self {
            Priority::P1 => "p1",
            Priority::P2 => "p2",
            Priority::P3 => "p3",
        }
    }

    /// The metric label value: `"1"`, `"2"`, `"3"`.
    pub fn label(self) -> &'static str {
        match self {
            Priority::P1 => "1",
            Priority::P2 => "2",
            Priority::P3 => "3",
        }
    }

    /// Parses a wire number.
    pub fn from_number(n: i64) -> Option<Priority> {
        match n {
            1 => Some(Priority::P1),
            2 => Some(Priority::P2),
            3 => Some(Priority::P3),
            _ => None,
        }
    }

    /// Parses a subject token (`p1`..`p3`).
    pub fn from_token(token: &str) -> Option<Priority> {
        match token {
            "p1" => Some(Priority::P1),
            "p2" => Some(Priority::P2),
            "p3" => Some(Priority::P3),
            _ => None,
        }
    }

    /// Index into per-priority arrays.
    pub fn index(self) -> usize {
        usize::from(self.number() - 1)
    }
}

/// Body encoding, chosen by the `Content-Type` header; outcomes use the task's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `application/json` (the default).
    #[default]
    Json,
    /// `application/msgpack`: the same fields, MessagePack-encoded.
    MessagePack,
}

impl Encoding {
    /// The `Content-Type` header value.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::MessagePack => "application/msgpack",
        }
    }
}

/// Model tiers a task can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The cheapest model.
    Simple,
    /// The everyday model.
    Standard,
    /// The strongest model.
    Complex,
    /// batchd picks the cheapest tier that fits.
    Auto,
}

impl Tier {
    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "simple" => Some(Tier::Simple),
            "standard" => Some(Tier::Standard),
            "complex" => Some(Tier::Complex),
            "auto" => Some(Tier::Auto),
            _ => None,
        }
    }
}

/// What the task asks the model to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `{"text": ..., "options": {...}}`, rendered through the task type's template.
    Text {
        /// The input text.
        text: String,
        /// Free-form options the template may refer to.
        options: Map<String, Value>,
    },
    /// An OpenAI chat body (`messages`, `max_tokens`, ...), passed through.
    Chat(Map<String, Value>),
}

/// A validated task.
#[derive(Debug, Clone)]
pub struct Task {
    /// Unique id; a NATS subject token.
    pub task_id: String,
    /// The task type from the config, if any.
    pub task_type: Option<String>,
    /// What to ask.
    pub payload: Payload,
    /// The priority of the subject it arrived on.
    pub priority: Priority,
    /// Attempts already spent elsewhere.
    pub retry_count: u32,
    /// When the producer created it (default: the JetStream timestamp).
    pub created_at: DateTime<Utc>,
    /// An explicit model, skipping tier routing.
    pub model: Option<String>,
    /// The requested tier, if any.
    pub tier: Option<Tier>,
    /// How it asks to be sent (`route`: realtime, batch_api or auto), if it says.
    pub route: Option<crate::route_policy::RoutePreference>,
    /// Cost attribution.
    pub tenant: String,
    /// Extra core-NATS subject for the outcome.
    pub reply_to: Option<String>,
    /// Latest useful completion.
    pub deadline: Option<DateTime<Utc>>,
    /// Echoed back in the outcome.
    pub metadata: Option<Value>,
    /// The body as received, for dead letters.
    pub original: Original,
    /// The encoding it arrived in; the outcome uses the same.
    pub encoding: Encoding,
    /// 0 for a first run; N for the N-th replay of a dead letter (the
    /// `Batchd-Generation` header). Only an outcome of the same or a later
    /// generation counts as this task's outcome.
    pub generation: u32,
}

impl Task {
    /// A first run of `task_id` on `priority` with every optional field
    /// unset: no type, model, tier, reply subject, deadline or metadata,
    /// the default tenant and no attempts spent.
    pub fn new(
        task_id: String,
        payload: Payload,
        priority: Priority,
        created_at: DateTime<Utc>,
        encoding: Encoding,
    ) -> Task {
        Task {
            task_id,
            task_type: None,
            payload,
            priority,
            retry_count: 0,
            created_at,
            model: None,
            tier: None,
            route: None,
            tenant: "default".into(),
            reply_to: None,
            deadline: None,
            metadata: None,
            original: Original::default(),
            encoding,
            generation: 0,
        }
    }
}

/// A task's body as received, decoded again only when its dead letter
/// needs it: the hot path keeps the bytes, not a copy of the tree.
#[derive(Debug, Clone, Default)]
pub struct Original {
    body: bytes::Bytes,
    encoding: Encoding,
}

impl Original {
    /// `body`, in `encoding`.
    pub fn new(body: bytes::Bytes, encoding: Encoding) -> Original {
        Original { body, encoding }
    }

    /// The body as a JSON value (`null` when there is none).
    pub fn to_value(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        crate::codec::parse_body(&self.body, self.encoding).unwrap_or(Value::Null)
    }
}

/// Token usage reported by the provider.
/// Token usage reported by the provider, inclusive: `input_tokens` counts
/// the cached and cache-write tokens too (Anthropic's additive usage is
/// summed into it when read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Prompt tokens written to the provider's cache (priced at the
    /// cache-write rate); absent when 0.
    #[serde(default, skip_serializing_if = "no_tokens")]
    pub cache_write_input_tokens: u64,
}

fn no_tokens(n: &u64) -> bool {
    *n == 0
}

/// Why a task failed, as `error.kind` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The task itself is wrong.
    InvalidRequest,
    /// It ran out of attempts.
    MaxRetries,
    /// The tenant's budget is spent.
    BudgetExceeded,
    /// Its deadline passed.
    Expired,
    /// The provider refused it (4xx other than 429).
    ProviderRejected,
    /// It was cancelled.
    Cancelled,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::InvalidRequest,
        ErrorKind::MaxRetries,
        ErrorKind::BudgetExceeded,
        ErrorKind::Expired,
        ErrorKind::ProviderRejected,
        ErrorKind::Cancelled,
    ];

    /// The wire name, also the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::MaxRetries => "max_retries",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Expired => "expired",
            ErrorKind::ProviderRejected => "provider_rejected",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

/// The `error` object of a failed outcome and of a dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What went wrong, for a person.
    pub message: String,
    /// The provider's HTTP status, when there was one.
    pub status_code: Option<u16>,
}

impl TaskError {
    /// An error without a status code.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> TaskError {
        TaskError {
            kind,
            message: message.into(),
            status_code: None,
        }
    }
}

/// `succeeded` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The provider answered.
    Succeeded,
    /// See `error`.
    Failed,
}

impl Status {
    /// Both statuses.
    pub const ALL: [Status; 2] = [Status::Succeeded, Status::Failed];

    /// The wire name, also the `status` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// How a task was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// One provider request per task.
    Realtime,
    /// A provider batch job.
    BatchApi,
}

impl RouteKind {
    /// Both routes.
    pub const ALL: [RouteKind; 2] = [RouteKind::Realtime, RouteKind::BatchApi];

    /// The wire name, also the `route` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Realtime => "realtime",
            RouteKind::BatchApi => "batch_api",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<RouteKind> {
        RouteKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The service tier a realtime call asked for and was served at (OpenAI's
/// `service_tier`): `flex` at Batch API rates, slower and sometimes refused;
/// `priority` faster at a premium.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ServiceTier {
    /// The provider's standard processing (no `service_tier` sent).
    #[default]
    Default,
    /// Flex processing.
    Flex,
    /// Priority processing.
    Priority,
}

impl ServiceTier {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Default => "default",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
        }
    }

    /// The tier a provider's answer names (`service_tier` of a chat
    /// completion); `None` for a name that is not one of these (`auto`).
    pub fn from_answer(name: &str) -> Option<ServiceTier> {
        match name {
            "default" => Some(ServiceTier::Default),
            "flex" => Some(ServiceTier::Flex),
            "priority" | "fast" => Some(ServiceTier::Priority),
            _ => None,
        }
    }

    /// True for the default tier (skipped on the wire).
    pub fn is_default(&self) -> bool {
        *self == ServiceTier::Default
    }
}

/// Time spent, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Created → dispatched.
    pub queued_ms: u64,
    /// Dispatched → answered.
    pub processing_ms: u64,
    /// Created → outcome.
    pub total_ms: u64,
}

/// The one terminal outcome of a task, published on `<prefix>.results.<task_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The task's id.
    pub task_id: String,
    /// `succeeded` or `failed`.
    pub status: Status,
    /// The assistant's text; `null` when failed.
    pub output: Option<String>,
    /// The provider's finish reason.
    pub finish_reason: Option<String>,
    /// Why it failed; `null` when it succeeded.
    pub error: Option<TaskError>,
    /// The model that served it (or would have).
    pub model: Option<String>,
    /// The provider that served it (or would have).
    pub provider: Option<String>,
    /// How it was sent.
    pub route: Option<RouteKind>,
    /// The service tier that served a realtime call (`default`, `flex` or
    /// `priority`); absent for batch jobs and tasks that made no call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<ServiceTier>,
    /// The tier its model was picked from (absent when the task named a model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Why that tier: `task`, `task_type`, `rule:<name>`, `classifier` or
    /// `prompt_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_reason: Option<String>,
    /// What the tier classifier's call for this task cost (included in
    /// `cost_usd`); absent when the task made no classifier call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_cost_usd: Option<f64>,
    /// True when the answer came from one provider call shared by
    /// identical requests (dedupe); `call_id` names that call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_call: bool,
    /// The shared call's id (present when `shared_call`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Tokens used.
    pub usage: Usage,
    /// What it cost, from the price table.
    pub cost_usd: f64,
    /// Provider attempts, the producer's `retry_count` included.
    pub attempts: u32,
    /// The batch it travelled in.
    pub batch_id: Option<String>,
    /// Its priority number.
    pub priority: u8,
    /// Its tenant.
    pub tenant: String,
    /// Time spent.
    pub timings: Timings,
    /// The task's metadata, echoed.
    pub metadata: Option<Value>,
    /// The replay generation that produced it (absent for 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
    /// When the outcome was made, RFC 3339 with milliseconds.
    pub completed_at: String,
}

impl Outcome {
    /// A failed outcome of a task that spent nothing: no output, model,
    /// provider, route, usage, cost, attempts or batch, and all of
    /// `total_ms` spent waiting. Callers add what they know beyond that.
    pub fn failure(
        task_id: String,
        error: TaskError,
        priority: u8,
        tenant: String,
        total_ms: u64,
        completed_at: String,
    ) -> Outcome {
        Outcome {
            task_id,
            status: Status::Failed,
            output: None,
            finish_reason: None,
            error: Some(error),
            model: None,
            provider: None,
            route: None,
            service_tier: None,
            tier: None,
            tier_reason: None,
            classifier_cost_usd: None,
            shared_call: false,
            call_id: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            attempts: 0,
            batch_id: None,
            priority,
            tenant,
            timings: Timings {
                queued_ms: total_ms,
                processing_ms: 0,
                total_ms,
            },
            metadata: None,
            generation: 0,
            completed_at,
        }
    }
}

/// A message parked on `<prefix>.dlq.<task_id>` with the reason it died.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The original task body (for an unreadable body: the raw bytes, see `raw`).
    pub task: Value,
    /// Why it died.
    pub error: TaskError,
    /// Attempts spent.
    pub attempts: u32,
    /// When it died.
    pub dead_at: String,
    /// The subject it arrived on.
    pub subject: String,
    /// The raw bytes, base64-encoded, when the body could not be decoded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub raw_base64: Option<String>,
}

/// RFC 3339 with milliseconds and a `Z`, as in the protocol's examples.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_round_trips_through_its_wire_forms() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_number(i64::from(p.number())), Some(p));
            assert_eq!(Priority::from_token(p.token()), Some(p));
        }
        assert_eq!(Priority::from_number(4), None);
        assert_eq!(Priority::from_token("p0"), None);
    }

    #[test]
    fn outcome_serializes_with_protocol_field_names() {
        let o = Outcome {
            task_id: "t1".into(),
            status: Status::Failed,
            output: None,
            finish_reason: None,
            error: Some(TaskError::new(ErrorKind::InvalidRequest, "bad")),
            model: None,
            provider: None,
            route: Some(RouteKind::Realtime),
            service_tier: None,
            tier: None,
            tier_reason: None,
            classifier_cost_usd: None,
            shared_call: false,
            call_id: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            attempts: 0,
            batch_id: None,
            priority: 2,
            tenant: "default".into(),
            timings: Timings::default(),
            metadata: None,
            generation: 0,
            completed_at: "2026-01-01T00:00:00.000Z".into(),
        };
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["kind"], "invalid_request");
        assert_eq!(v["route"], "realtime");
        assert_eq!(v["usage"]["cached_input_tokens"], 0);
        assert!(v["output"].is_null());
    }
}
