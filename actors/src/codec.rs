//! Decoding and validating task bodies (JSON or MessagePack) and encoding
//! outcomes and dead letters in the task's encoding. Pure functions: every
//! rule of the protocol's task table lives here, each failure a [`Rejection`]
//! with a message that names the field.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, Visitor};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::route_policy::RoutePreference;
use crate::task::{Encoding, Original, Payload, Priority, Task, Tier};
use bytes::Bytes;

/// The longest allowed task id.
pub const MAX_TASK_ID_LEN: usize = 128;

/// The deepest nesting of arrays and objects accepted in a body, in either
/// encoding (a chat request with tools and JSON schemas stays far below).
pub const MAX_DEPTH: usize = 64;

/// The longest `error.message` batchd writes: longer ones end in an ellipsis,
/// so a rejection never repeats a producer's whole input.
pub const MAX_MESSAGE_CHARS: usize = 512;

/// The most of one input value a message quotes.
pub const MAX_QUOTE_CHARS: usize = 64;

/// The longest `Content-Type` header value read.
pub const MAX_HEADER_BYTES: usize = 256;

/// The longest `model` name accepted.
pub const MAX_MODEL_LEN: usize = 256;

/// The longest `tenant` accepted.
pub const MAX_TENANT_LEN: usize = 128;

/// A message as it arrived, before decoding.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// Priority of the subject it arrived on.
    pub priority: Priority,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
    /// The JetStream timestamp, the default `created_at`.
    pub published_at: DateTime<Utc>,
    /// The configured payload limit, in bytes.
    pub max_payload_bytes: usize,
    /// The replay generation (`Batchd-Generation` header; 0 when absent).
    pub generation: u32,
    /// Which subjects a `reply_to` may name.
    pub reply_to: &'a ReplyPolicy,
}

/// Where outcomes may be sent besides the results stream: `reply_to` must
/// match one of `allowed` (NATS subject patterns, `*` and `>` wildcards) and
/// is never a system subject (`$JS.`, `$SYS.`, `$KV.`, anything starting
/// with `$`), one of batchd's own subjects (`<prefix>.` other than
/// `<prefix>.replies.`) or batchd's own inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPolicy {
    prefix: String,
    allowed: Vec<String>,
}

/// The inbox prefix of batchd's own NATS client: never a `reply_to`, so no
/// producer can answer batchd's JetStream API requests in the server's place.
pub const OWN_INBOX_PREFIX: &str = "_BATCHD_INBOX";

impl ReplyPolicy {
    /// The policy of subject prefix `prefix`: `allowed` patterns, where
    /// `{prefix}` stands for the prefix. An `Err` names the bad pattern.
    pub fn new(prefix: &str, allowed: &[String]) -> Result<ReplyPolicy, String> {
        let allowed: Vec<String> = allowed
            .iter()
            .map(|a| a.replace("{prefix}", prefix))
            .collect();
        let policy = ReplyPolicy {
            prefix: prefix.to_owned(),
            allowed: Vec::new(),
        };
        for a in &allowed {
            if !is_valid_pattern(a) {
                return Err(format!("{a:?} is not a NATS subject pattern"));
            }
            if let Some(why) = policy.forbidden(a) {
                return Err(format!("{a:?} would allow {why}"));
            }
        }
        Ok(ReplyPolicy { allowed, ..policy })
    }

    /// The default: `_INBOX.>` and `<prefix>.replies.>`.
    pub fn default_for(prefix: &str) -> ReplyPolicy {
        ReplyPolicy {
            prefix: prefix.to_owned(),
            allowed: vec!["_INBOX.>".into(), format!("{prefix}.replies.>")],
        }
    }

    /// The allowed patterns.
    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// Checks one `reply_to`; the `Err` is the `invalid_request` message.
    pub fn check(&self, subject: &str) -> Result<(), String> {
        let quoted = quote(subject);
        if !is_valid_subject(subject) {
            return Err(format!(
                "field `reply_to` is not a valid NATS subject: {quoted}"
            ));
        }
        if let Some(why) = self.forbidden(subject) {
            return Err(format!("field `reply_to` must not be {why}: {quoted}"));
        }
        if self.allowed.iter().any(|p| subject_matches(p, subject)) {
            return Ok(());
        }
        Err(format!(
            "field `reply_to` {quoted} is not an allowed reply subject: it must match {}",
            self.allowed.join(" or ")
        ))
    }

    /// Why a subject (or pattern) may never receive outcomes, if it may not.
    fn forbidden(&self, subject: &str) -> Option<String> {
        let mut tokens = subject.split('.');
        let first = tokens.next().unwrap_or_default();
        if first.starts_with('$') {
            return Some("a system subject ($JS, $SYS, $KV and every other `$` subject)".into());
        }
        if first == OWN_INBOX_PREFIX || first == ">" {
            return Some("batchd's own inbox".into());
        }
        if first == self.prefix || first == "*" {
            let second = tokens.next();
            if second != Some("replies") {
                return Some(format!(
                    "one of batchd's own subjects ({0}.tasks, {0}.results, {0}.dlq; only {0}.replies is open to replies)",
                    self.prefix
                ));
            }
        }
        None
    }
}

/// True when `pattern` (with `*` and `>` wildcards) matches `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for p in pattern.split('.') {
        match (p, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

fn is_valid_pattern(p: &str) -> bool {
    let tokens: Vec<&str> = p.split('.').collect();
    !p.is_empty()
        && tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && (*t != ">" || i == tokens.len() - 1)
                && !t
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        })
}

/// Why a message is not a valid task, with whatever could still be read of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// What is wrong, naming the field.
    pub message: String,
    /// The task id, when one could be read and is a valid subject token.
    pub task_id: Option<String>,
    /// The `reply_to`, when one could be read.
    pub reply_to: Option<String>,
    /// The decoded body, when it decoded at all.
    pub original: Option<Value>,
    /// The encoding to answer in.
    pub encoding: Encoding,
    /// Echoed metadata, when readable.
    pub metadata: Option<Value>,
    /// Tenant, when readable.
    pub tenant: Option<String>,
}

/// Errors encoding an outcome (only possible for values serde can't represent).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// JSON encoding failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// MessagePack encoding failed.
    #[error("encoding MessagePack: {0}")]
    MessagePack(#[from] rmp_serde::encode::Error),
}

/// Picks the encoding from a `Content-Type` header; `None` for an unsupported one.
pub fn encoding_for(content_type: Option<&str>) -> Option<Encoding> {
    let Some(ct) = content_type else {
        return Some(Encoding::Json);
    };
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "" | "application/json" | "text/json" => Some(Encoding::Json),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            Some(Encoding::MessagePack)
        }
        _ => None,
    }
}

/// Serializes a value in the given encoding (MessagePack with field names, as
/// producers in other languages expect maps).
pub fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Result<Vec<u8>, EncodeError> {
    Ok(match encoding {
        Encoding::Json => serde_json::to_vec(value)?,
        Encoding::MessagePack => rmp_serde::to_vec_named(value)?,
    })
}

/// True when `id` can be a NATS subject token under protocol v1.
pub fn is_valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decodes and validates one task message. Every rejection message is at
/// most [`MAX_MESSAGE_CHARS`] long.
pub fn decode_task(inbound: Inbound<'_>) -> Result<Task, Box<Rejection>> {
    decode_unbounded(inbound).map_err(|mut r| {
        r.message = bounded(&r.message);
        r
    })
}

fn decode_unbounded(inbound: Inbound<'_>) -> Result<Task, Box<Rejection>> {
    let encoding = inbound
        .content_type
        .filter(|ct| ct.len() <= MAX_HEADER_BYTES)
        .map_or(Some(Encoding::Json), |ct| encoding_for(Some(ct)));
    let mut rejection = Box::new(Rejection {
        message: String::new(),
        task_id: None,
        reply_to: None,
        original: None,
        encoding: encoding.unwrap_or_default(),
        metadata: None,
        tenant: None,
    });
    if let Some(ct) = inbound
        .content_type
        .filter(|ct| ct.len() > MAX_HEADER_BYTES)
    {
        rejection.message = format!(
            "the Content-Type header is {} bytes long; at most {MAX_HEADER_BYTES} are read",
            ct.len()
        );
        return Err(rejection);
    }
    let Some(encoding) = encoding else {
        rejection.message = format!(
            "unsupported Content-Type {}: use application/json or application/msgpack",
            quote(inbound.content_type.unwrap_or_default())
        );
        return Err(rejection);
    };
    if inbound.body.len() > inbound.max_payload_bytes {
        rejection.message = format!(
            "payload of {} bytes exceeds the limit of {} bytes",
            inbound.body.len(),
            inbound.max_payload_bytes
        );
        // Still try to read the id so the producer hears about it.
        if let Ok(Value::Object(map)) = parse_body(inbound.body, encoding) {
            salvage(&map, inbound.reply_to, &mut rejection);
        }
        return Err(rejection);
    }
    let mut value = match parse_body(inbound.body, encoding) {
        Ok(v) => v,
        Err(message) => {
            rejection.message = message;
            return Err(rejection);
        }
    };
    let Value::Object(map) = &mut value else {
        rejection.message = format!(
            "task body must be an object, got {}",
            json_type_name(&value)
        );
        rejection.original = Some(value);
        return Err(rejection);
    };
    // The hot path: the task takes its parts out of the tree (no copies),
    // and keeps the body's bytes for a dead letter.
    match build_task(map, &inbound, encoding) {
        Ok(mut task) => {
            task.original = Original::new(Bytes::copy_from_slice(inbound.body), encoding);
            task.generation = inbound.generation;
            Ok(task)
        }
        Err(message) => {
            // Parts may have been taken: the body as received, again.
            let value = parse_body(inbound.body, encoding).unwrap_or(value);
            if let Value::Object(map) = &value {
                salvage(map, inbound.reply_to, &mut rejection);
            }
            rejection.message = message;
            rejection.original = Some(value);
            Err(rejection)
        }
    }
}

/// Parses a body in `encoding` into a JSON value, refusing nesting deeper
/// than [`MAX_DEPTH`] and non-finite numbers (MessagePack NaN and ±Inf, which
/// would otherwise turn into `null`).
pub fn parse_body(body: &[u8], encoding: Encoding) -> Result<Value, String> {
    let seed = ValueSeed { depth: MAX_DEPTH };
    match encoding {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            seed.deserialize(&mut de)
                .and_then(|v| de.end().map(|()| v))
                .map_err(|e| format!("malformed JSON: {e}"))
        }
        Encoding::MessagePack => {
            let mut de = rmp_serde::Deserializer::new(body);
            let v = seed
                .deserialize(&mut de)
                .map_err(|e| format!("malformed MessagePack: {e}"))?;
            if de.get_ref().is_empty() {
                Ok(v)
            } else {
                Err("malformed MessagePack: bytes after the end of the body".into())
            }
        }
    }
}

/// Builds a [`Value`] from any self-describing format, with a depth budget.
struct ValueSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed {
    fn deeper<E: de::Error>(&self) -> Result<ValueSeed, E> {
        match self.depth.checked_sub(1) {
            Some(depth) => Ok(ValueSeed { depth }),
            None => Err(E::custom(format_args!(
                "nested deeper than {MAX_DEPTH} levels"
            ))),
        }
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| {
                E::custom(format_args!(
                    "the number {v} is not finite (NaN and ±Inf are not allowed)"
                ))
            })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        Err(E::custom("binary values are not allowed (use strings)"))
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        // A size hint is the sender's claim: never trust it for allocation.
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(256));
        while let Some(v) = seq.next_element_seed(ValueSeed { depth: inner.depth })? {
            list.push(v);
        }
        Ok(Value::Array(list))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(ValueSeed { depth: inner.depth })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Reads what it can of a bad body, so the failure reaches its producer.
fn salvage(map: &Map<String, Value>, policy: &ReplyPolicy, r: &mut Rejection) {
    let id = map
        .get("task_id")
        .or_else(|| map.get("custom_id"))
        .and_then(Value::as_str);
    r.task_id = id.filter(|id| is_valid_task_id(id)).map(str::to_owned);
    r.reply_to = map
        .get("reply_to")
        .and_then(Value::as_str)
        .filter(|s| policy.check(s).is_ok())
        .map(str::to_owned);
    r.metadata = map.get("metadata").filter(|v| !v.is_null()).cloned();
    r.tenant = map
        .get("tenant")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= MAX_TENANT_LEN)
        .map(str::to_owned);
}

fn build_task(
    map: &mut Map<String, Value>,
    inbound: &Inbound<'_>,
    encoding: Encoding,
) -> Result<Task, String> {
    // An OpenAI Batch API input line.
    if map.contains_key("custom_id") && !map.contains_key("task_id") {
        return build_batch_line(&*map, inbound, encoding);
    }
    let task_id = required_str(map, "task_id")?;
    check_task_id(task_id)?;
    let task_id = task_id.to_owned();
    let payload = match map.get_mut("payload") {
        None | Some(Value::Null) => return Err("missing required field `payload`".into()),
        Some(Value::Object(p)) => take_payload(p)?,
        Some(other) => {
            return Err(format!(
                "field `payload` must be an object, got {}",
                json_type_name(other)
            ))
        }
    };
    let task_type = optional_str(map, "type")?.map(str::to_owned);
    let priority = match map.get("priority") {
        None | Some(Value::Null) => inbound.priority,
        Some(v) => {
            let n = v
                .as_i64()
                .ok_or_else(|| format!("field `priority` must be 1, 2 or 3, got {}", show(v)))?;
            let p = Priority::from_number(n)
                .ok_or_else(|| format!("field `priority` must be 1, 2 or 3, got {n}"))?;
            if p != inbound.priority {
                return Err(format!(
                    "field `priority` is {} but the task arrived on the p{} subject",
                    p.number(),
                    inbound.priority.number()
                ));
            }
            p
        }
    };
    let retry_count = match map.get("retry_count") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                format!(
                    "field `retry_count` must be a non-negative integer, got {}",
                    show(v)
                )
            })?,
    };
    let created_at = match optional_str(map, "created_at")? {
        None => inbound.published_at,
        Some(s) => parse_time(s, "created_at")?,
    };
    let deadline = optional_str(map, "deadline")?
        .map(|s| parse_time(s, "deadline"))
        .transpose()?;
    let model = optional_str(map, "model")?.map(str::to_owned);
    if model
        .as_deref()
        .is_some_and(|m| m.is_empty() || m.len() > MAX_MODEL_LEN)
    {
        return Err(format!(
            "field `model` must be 1 to {MAX_MODEL_LEN} characters"
        ));
    }
    let tier = optional_str(map, "tier")?
        .map(|s| {
            Tier::parse(s).ok_or_else(|| {
                format!(
                    "field `tier` must be simple, standard, complex or auto, got {}",
                    quote(s)
                )
            })
        })
        .transpose()?;
    let route = optional_str(map, "route")?
        .map(|s| {
            RoutePreference::parse(s).ok_or_else(|| {
                format!(
                    "field `route` must be realtime, batch_api or auto, got {}",
                    quote(s)
                )
            })
        })
        .transpose()?;
    let tenant = optional_str(map, "tenant")?.unwrap_or("default");
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN {
        return Err(format!(
            "field `tenant` must be 1 to {MAX_TENANT_LEN} characters"
        ));
    }
    let reply_to = optional_str(map, "reply_to")?
        .map(|s| inbound.reply_to.check(s).map(|()| s.to_owned()))
        .transpose()?;
    Ok(Task {
        task_id,
        task_type,
        payload,
        priority,
        retry_count,
        created_at,
        model,
        tier,
        route,
        tenant: tenant.to_owned(),
        reply_to,
        deadline,
        metadata: map.remove("metadata").filter(|v| !v.is_null()),
        original: Original::default(),
        encoding,
        generation: 0,
    })
}

fn build_batch_line(
    map: &Map<String, Value>,
    inbound: &Inbound<'_>,
    encoding: Encoding,
) -> Result<Task, String> {
    let task_id = required_str(map, "custom_id")?;
    check_task_id(task_id).map_err(|e| e.replace("`task_id`", "`custom_id`"))?;
    if let Some(method) = optional_str(map, "method")? {
        if method != "POST" {
            return Err(format!(
                "field `method` must be \"POST\", got {}",
                quote(method)
            ));
        }
    }
    if let Some(url) = optional_str(map, "url")? {
        if url != "/v1/chat/completions" {
            return Err(format!(
                "field `url` must be \"/v1/chat/completions\" (the only endpoint batchd serves), got {}",
                quote(url)
            ));
        }
    }
    let body = match map.get("body") {
        Some(Value::Object(b)) => b,
        Some(other) => {
            return Err(format!(
                "field `body` must be an object, got {}",
                json_type_name(other)
            ))
        }
        None => return Err("missing required field `body`".into()),
    };
    let model = optional_str(body, "model")
        .map_err(|e| e.replace("`model`", "`body.model`"))?
        .map(str::to_owned);
    if model
        .as_deref()
        .is_some_and(|m| m.is_empty() || m.len() > MAX_MODEL_LEN)
    {
        return Err(format!(
            "field `body.model` must be 1 to {MAX_MODEL_LEN} characters"
        ));
    }
    let mut chat = body.clone();
    chat.remove("model");
    let payload = take_payload(&mut chat)?;
    let task = Task::new(
        task_id.to_owned(),
        payload,
        inbound.priority,
        inbound.published_at,
        encoding,
    );
    Ok(Task { model, ..task })
}

/// Checks a `payload` object: a chat (`messages`) or a text task.
fn check_payload(p: &Map<String, Value>) -> Result<(), String> {
    if let Some(messages) = p.get("messages") {
        let Value::Array(list) = messages else {
            return Err("field `payload.messages` must be an array".into());
        };
        if list.is_empty() {
            return Err("field `payload.messages` must not be empty".into());
        }
        for (i, m) in list.iter().enumerate() {
            check_message(i, m)?;
        }
        if matches!(p.get("stream"), Some(Value::Bool(true))) {
            return Err("`payload.stream` must not be true: batchd does not stream".into());
        }
        for key in ["max_tokens", "max_completion_tokens"] {
            match p.get(key) {
                None | Some(Value::Null) => {}
                Some(v)
                    if v.as_u64()
                        .is_some_and(|n| (1..=u64::from(u32::MAX)).contains(&n)) => {}
                Some(v) => {
                    return Err(format!(
                        "field `payload.{key}` must be a positive integer, got {}",
                        show(v)
                    ))
                }
            }
        }
        match p.get("n") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64() == Some(1) => {}
            Some(v) => {
                return Err(format!(
                    "field `payload.n` must be 1 (batchd returns one choice per task), got {}",
                    show(v)
                ))
            }
        }
        return Ok(());
    }
    match p.get("text") {
        Some(Value::String(_)) => {}
        Some(other) => {
            return Err(format!(
                "field `payload.text` must be a string, got {}",
                json_type_name(other)
            ))
        }
        None => {
            return Err(
                "field `payload` needs either `text` (with optional `options`) or `messages`"
                    .into(),
            )
        }
    }
    match p.get("options") {
        None | Some(Value::Null | Value::Object(_)) => Ok(()),
        Some(other) => Err(format!(
            "field `payload.options` must be an object, got {}",
            json_type_name(other)
        )),
    }
}

/// A checked `payload`, taken out of the task's tree (no copy).
fn take_payload(p: &mut Map<String, Value>) -> Result<Payload, String> {
    check_payload(p)?;
    if p.contains_key("messages") {
        let mut chat = std::mem::take(p);
        chat.remove("model");
        return Ok(Payload::Chat(chat));
    }
    let Some(Value::String(text)) = p.remove("text") else {
        return Err("field `payload.text` must be a string".into());
    };
    let options = match p.remove("options") {
        Some(Value::Object(o)) => o,
        _ => Map::new(),
    };
    Ok(Payload::Text { text, options })
}

/// One chat message: a known role and a content (a string or an array of
/// parts; only an assistant message carrying tool calls may go without).
fn check_message(i: usize, m: &Value) -> Result<(), String> {
    let Value::Object(m) = m else {
        return Err(format!(
            "`payload.messages[{i}]` must be an object, got {}",
            json_type_name(m)
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.as_str(),
        _ => return Err(format!("`payload.messages[{i}]` needs a string `role`")),
    };
    if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
        return Err(format!(
            "`payload.messages[{i}].role` {} is not a chat role",
            quote(role)
        ));
    }
    match m.get("content") {
        Some(Value::String(_) | Value::Array(_)) => Ok(()),
        None | Some(Value::Null)
            if role == "assistant" && m.get("tool_calls").is_some_and(|t| !t.is_null()) =>
        {
            Ok(())
        }
        None | Some(Value::Null) => Err(format!(
            "`payload.messages[{i}]` needs `content` (a string or an array of parts)"
        )),
        Some(other) => Err(format!(
            "`payload.messages[{i}].content` must be a string or an array of parts, got {}",
            json_type_name(other)
        )),
    }
}

fn check_task_id(id: &str) -> Result<(), String> {
    if is_valid_task_id(id) {
        Ok(())
    } else {
        Err(format!(
            "field `task_id` must be 1-{MAX_TASK_ID_LEN} characters of [A-Za-z0-9_-] (it becomes a subject token), got {}",
            quote(id)
        ))
    }
}

fn required_str<'m>(map: &'m Map<String, Value>, key: &str) -> Result<&'m str, String> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(format!("missing required field `{key}`")),
        Some(other) => Err(format!(
            "field `{key}` must be a string, got {}",
            json_type_name(other)
        )),
    }
}

fn optional_str<'m>(map: &'m Map<String, Value>, key: &str) -> Result<Option<&'m str>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "field `{key}` must be a string, got {}",
            json_type_name(other)
        )),
    }
}

fn parse_time(s: &str, key: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!(
                "field `{key}` must be an RFC 3339 timestamp, got {}: {e}",
                quote(s)
            )
        })
}

/// True for a publishable NATS subject: non-empty tokens, no spaces or wildcards.
pub fn is_valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        })
}

/// How a JSON value's type reads in an error message ("a string", "null").
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `s` cut to at most `max` characters, the cut marked with an ellipsis.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max.saturating_sub(1)) {
        Some((i, _)) if s[i..].chars().nth(1).is_some() => format!("{}…", &s[..i]),
        _ => s.to_owned(),
    }
}

/// A message cut to [`MAX_MESSAGE_CHARS`].
pub fn bounded(message: &str) -> String {
    truncate(message, MAX_MESSAGE_CHARS)
}

/// An input string as a message quotes it: in quotes, escaped, at most
/// [`MAX_QUOTE_CHARS`] characters of it.
pub fn quote(s: &str) -> String {
    format!("{:?}", truncate(s, MAX_QUOTE_CHARS))
}

/// An input value as a message shows it, at most [`MAX_QUOTE_CHARS`] characters.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        Value::Array(_) | Value::Object(_) => json_type_name(v).to_owned(),
        v => truncate(&v.to_string(), MAX_QUOTE_CHARS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    static POLICY: std::sync::LazyLock<ReplyPolicy> =
        std::sync::LazyLock::new(|| ReplyPolicy::default_for("batchd"));

    fn inbound(body: &[u8]) -> Inbound<'_> {
        Inbound {
            priority: Priority::P2,
            content_type: None,
            body,
            published_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            max_payload_bytes: 4096,
            generation: 0,
            reply_to: &POLICY,
        }
    }

    fn decode_json(v: Value) -> Result<Task, Box<Rejection>> {
        let bytes = serde_json::to_vec(&v).unwrap();
        decode_task(inbound(&bytes))
    }

    #[test]
    fn decodes_the_seed_shape_with_defaults() {
        let t = decode_json(json!({
            "task_id": "t_1", "type": "summarization",
            "payload": {"text": "hello", "options": {"language": "en"}}
        }))
        .unwrap();
        assert_eq!(t.task_id, "t_1");
        assert_eq!(t.priority, Priority::P2);
        assert_eq!(t.tenant, "default");
        assert_eq!(t.created_at.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert!(matches!(t.payload, Payload::Text { ref text, .. } if text == "hello"));
    }

    #[test]
    fn decodes_messagepack_with_named_fields() {
        let v = json!({"task_id": "m1", "type": "classification", "payload": {"text": "x"}, "priority": 2});
        let bytes = rmp_serde::to_vec_named(&v).unwrap();
        let mut i = inbound(&bytes);
        i.content_type = Some("application/msgpack");
        let t = decode_task(i).unwrap();
        assert_eq!(t.encoding, Encoding::MessagePack);
        assert_eq!(t.task_id, "m1");
    }

    #[test]
    fn maps_an_openai_batch_line() {
        let t = decode_json(json!({
            "custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
        }))
        .unwrap();
        assert_eq!(t.task_id, "req-1");
        assert_eq!(t.model.as_deref(), Some("gpt-4.1-mini"));
        assert!(matches!(t.payload, Payload::Chat(ref m) if !m.contains_key("model")));
    }

    #[test]
    fn rejects_each_bad_input_with_a_message_naming_the_problem() {
        // One JSON body a line, then ` => ` and a fragment of its message.
        let json = r#"
            {not json => malformed JSON
            [1,2] => must be an object
            {"payload":{"text":"x"},"type":"a"} => missing required field `task_id`
            {"task_id":5,"payload":{"text":"x"}} => `task_id` must be a string
            {"task_id":"a.b","type":"a","payload":{"text":"x"}} => subject token
            {"task_id":"a","type":"a"} => missing required field `payload`
            {"task_id":"a","type":"a","payload":{"text":1}} => `payload.text` must be a string
            {"task_id":"a","type":"a","payload":{"text":"x"},"priority":1} => arrived on the p2 subject
            {"task_id":"a","type":"a","payload":{"text":"x"},"tier":"huge"} => field `tier`
            {"task_id":"a","type":"a","payload":{"text":"x"},"route":"batch"} => field `route` must be realtime, batch_api or auto
            {"task_id":"a","type":"a","payload":{"text":"x"},"deadline":"soon"} => RFC 3339
            {"task_id":"a","payload":{"messages":[]}} => must not be empty
            {"task_id":"a","payload":{"messages":[{"role":"wizard"}]}} => not a chat role
        "#;
        let json_cases = json.lines().filter_map(|l| l.trim().split_once(" => "));
        let typed: [(&[u8], &str, &str); 2] = [
            (
                &[0xc1, 0xff],
                "application/msgpack",
                "malformed MessagePack",
            ),
            (b"{}", "text/plain", "unsupported Content-Type"),
        ];
        let cases = json_cases
            .map(|(body, expected)| (body.as_bytes(), None, expected))
            .chain(typed.map(|(body, ct, expected)| (body, Some(ct), expected)));
        let mut checked = 0;
        for (body, ct, expected) in cases {
            let mut i = inbound(body);
            i.content_type = ct;
            let r = decode_task(i).expect_err(expected);
            assert!(
                r.message.contains(expected),
                "{expected:?} not in {:?}",
                r.message
            );
            checked += 1;
        }
        assert_eq!(checked, 15, "every case was read");
    }

    #[test]
    fn oversized_payload_is_rejected_but_keeps_its_task_id() {
        let big = "x".repeat(5000);
        let r = decode_json(json!({"task_id": "big", "type": "a", "payload": {"text": big}}))
            .unwrap_err();
        assert!(r.message.contains("exceeds the limit of 4096 bytes"));
        assert_eq!(r.task_id.as_deref(), Some("big"));
    }

    #[test]
    fn a_rejection_salvages_task_id_and_reply_to() {
        let r = decode_json(json!({"task_id": "ok_1", "reply_to": "_INBOX.1", "payload": 3}))
            .unwrap_err();
        assert_eq!(r.task_id.as_deref(), Some("ok_1"));
        assert_eq!(r.reply_to.as_deref(), Some("_INBOX.1"));
        // A forbidden reply_to is never salvaged.
        let r = decode_json(json!({"task_id": "ok_2", "reply_to": "$JS.API.X", "payload": 3}))
            .unwrap_err();
        assert_eq!(r.reply_to, None);
    }

    #[test]
    fn a_task_keeps_its_whole_body_for_its_dead_letter() {
        let body = json!({
            "task_id": "t_1", "type": "x", "tenant": "acme",
            "payload": {"text": "hello", "options": {"lang": "en"}},
            "metadata": {"n": 7},
        });
        let task = decode_json(body.clone()).unwrap();
        assert_eq!(task.original.to_value(), body, "taken parts included");
        assert_eq!(task.metadata, Some(json!({"n": 7})));
        let Payload::Text { text, options } = &task.payload else {
            panic!("a text payload")
        };
        assert_eq!((text.as_str(), &options["lang"]), ("hello", &json!("en")));
        // Rejected after its payload and metadata were taken: the dead
        // letter still carries them, and the outcome its metadata.
        let bad = json!({
            "task_id": "t_2", "priority": 9, "metadata": {"n": 8},
            "payload": {"messages": [{"role": "user", "content": "hi"}]},
        });
        let r = decode_json(bad.clone()).unwrap_err();
        assert_eq!(r.original, Some(bad));
        assert_eq!(r.metadata, Some(json!({"n": 8})));
        let mp = rmp_serde::to_vec_named(&body).unwrap();
        let inbound = Inbound {
            content_type: Some("application/msgpack"),
            ..inbound(&mp)
        };
        let task = decode_task(inbound).unwrap();
        assert_eq!(task.original.to_value(), body, "read back in its encoding");
    }

    fn chat(extra: Value) -> Value {
        let mut t =
            json!({"task_id": "c", "payload": {"messages": [{"role": "user", "content": "hi"}]}});
        for (k, v) in extra.as_object().unwrap() {
            t["payload"][k] = v.clone();
        }
        t
    }

    #[test]
    fn reply_to_is_confined_to_the_allow_list() {
        let ok = ["_INBOX.abc", "_INBOX.a.b.c", "batchd.replies.acme.1"];
        for s in ok {
            let t = decode_json(json!({"task_id": "r", "reply_to": s, "payload": {"text": "x"}}))
                .unwrap_or_else(|r| panic!("{s}: {}", r.message));
            assert_eq!(t.reply_to.as_deref(), Some(s));
        }
        let forbidden = [
            ("$JS.API.STREAM.DELETE.BATCHD_TASKS", "system subject"),
            ("$JS.ACK.BATCHD_TASKS.x.1.1.1.1.1", "system subject"),
            ("$SYS.REQ.SERVER.PING", "system subject"),
            ("$KV.batchd-attempts.victim", "system subject"),
            ("$O.bucket.x", "system subject"),
            ("batchd.results.victim", "batchd's own subjects"),
            ("batchd.dlq.victim", "batchd's own subjects"),
            ("batchd.tasks.p1", "batchd's own subjects"),
            ("batchd.replies", "not an allowed reply subject"),
            ("_BATCHD_INBOX.abc.1", "batchd's own inbox"),
            ("acme.inbox.42", "not an allowed reply subject"),
            ("_INBOX", "not an allowed reply subject"),
            ("a..b", "not a valid NATS subject"),
            ("_INBOX.*", "not a valid NATS subject"),
        ];
        for (s, expected) in forbidden {
            let r = decode_json(json!({"task_id": "r", "reply_to": s, "payload": {"text": "x"}}))
                .expect_err(s);
            assert!(r.message.contains(expected), "{s}: {}", r.message);
            assert!(r.message.contains("`reply_to`"), "{}", r.message);
            assert_eq!(r.reply_to, None, "{s}");
        }
    }

    #[test]
    fn the_reply_allow_list_is_configurable_but_never_opens_forbidden_subjects() {
        let p = ReplyPolicy::new(
            "jobs",
            &["acme.inbox.>".into(), "{prefix}.replies.*".into()],
        )
        .unwrap();
        assert!(p.check("acme.inbox.1.2").is_ok());
        assert!(p.check("jobs.replies.x").is_ok());
        assert!(p.check("jobs.replies.x.y").is_err());
        assert!(p.check("_INBOX.x").is_err());
        for bad in [
            ">",
            "$JS.>",
            "{prefix}.results.>",
            "*.>",
            "_BATCHD_INBOX.>",
            "a.>.b",
        ] {
            assert!(ReplyPolicy::new("jobs", &[bad.into()]).is_err(), "{bad}");
        }
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.c.d"));
        assert!(!subject_matches("a.>", "a"));
    }

    #[test]
    fn chat_payloads_are_validated_before_any_provider_call() {
        let cases = [
            (
                json!({"max_tokens": -5}),
                "`payload.max_tokens` must be a positive integer, got -5",
            ),
            (
                json!({"max_tokens": 0}),
                "`payload.max_tokens` must be a positive integer, got 0",
            ),
            (
                json!({"max_tokens": 1.5}),
                "`payload.max_tokens` must be a positive integer, got 1.5",
            ),
            (
                json!({"max_tokens": "100"}),
                "`payload.max_tokens` must be a positive integer, got \"100\"",
            ),
            (
                json!({"max_completion_tokens": 1e12}),
                "`payload.max_completion_tokens` must be a positive integer",
            ),
            (json!({"n": 50}), "`payload.n` must be 1"),
            (json!({"n": 0}), "`payload.n` must be 1"),
            (
                json!({"messages": [{"role": "user"}]}),
                "`payload.messages[0]` needs `content`",
            ),
            (
                json!({"messages": [{"role": "user", "content": null}]}),
                "needs `content`",
            ),
            (
                json!({"messages": [{"role": "user", "content": 7}]}),
                "must be a string or an array of parts",
            ),
            (
                json!({"messages": ["hi"]}),
                "`payload.messages[0]` must be an object",
            ),
        ];
        for (extra, expected) in cases {
            let r = decode_json(chat(extra.clone())).expect_err(expected);
            assert!(r.message.contains(expected), "{extra}: {}", r.message);
        }
        for extra in [
            json!({"max_tokens": 100, "n": 1}),
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]}),
        ] {
            decode_json(chat(extra.clone())).unwrap_or_else(|r| panic!("{extra}: {}", r.message));
        }
    }

    fn decode_msgpack(bytes: &[u8]) -> Result<Task, Box<Rejection>> {
        let mut i = inbound(bytes);
        i.content_type = Some("application/msgpack");
        decode_task(i)
    }

    #[test]
    fn non_finite_messagepack_numbers_are_refused_not_turned_into_null() {
        /// A MessagePack value that, unlike `serde_json::Value`, keeps a
        /// non-finite number.
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Mp {
            Num(f64),
            Str(&'static str),
            List(Vec<Mp>),
            Map(std::collections::BTreeMap<&'static str, Mp>),
        }
        let map = |entries: Vec<(&'static str, Mp)>| Mp::Map(entries.into_iter().collect());
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let message = map(vec![("role", Mp::Str("user")), ("content", Mp::Str("x"))]);
            let payload = map(vec![
                ("messages", Mp::List(vec![message])),
                ("temperature", Mp::Num(x)),
            ]);
            let t = map(vec![("task_id", Mp::Str("nan")), ("payload", payload)]);
            let bytes = rmp_serde::to_vec_named(&t).unwrap();
            let r = decode_msgpack(&bytes).expect_err("non-finite");
            assert!(r.message.contains("not finite"), "{}", r.message);
        }
    }

    #[test]
    fn nesting_is_capped_in_both_encodings() {
        let mut deep = json!("x");
        for _ in 0..MAX_DEPTH + 5 {
            deep = json!([deep]);
        }
        let body = json!({"task_id": "deep", "payload": {"text": "x"}, "metadata": deep});
        let r = decode_json(body.clone()).expect_err("too deep");
        assert!(r.message.contains("nested deeper than 64"), "{}", r.message);
        let r = decode_msgpack(&rmp_serde::to_vec_named(&body).unwrap()).expect_err("too deep");
        assert!(r.message.contains("nested deeper than 64"), "{}", r.message);
        // A claimed length far beyond the body allocates nothing and fails.
        let r = decode_msgpack(&[0xdd, 0xff, 0xff, 0xff, 0xff]).expect_err("short");
        assert!(r.message.contains("malformed MessagePack"), "{}", r.message);
    }

    #[test]
    fn messages_are_bounded_and_quote_little_of_the_input() {
        let long = "y".repeat(3_000);
        let r = decode_json(json!({"task_id": "t", "payload": {"text": "x"}, "tier": long}))
            .unwrap_err();
        assert!(r.message.chars().count() < 200, "{}", r.message);
        assert!(r.message.contains("…"), "{}", r.message);
        let mut i = inbound(b"{}");
        let ct = "a".repeat(10_000);
        i.content_type = Some(&ct);
        let r = decode_task(i).unwrap_err();
        assert!(
            r.message.contains("Content-Type header is 10000 bytes"),
            "{}",
            r.message
        );
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
        assert!(bounded(&long).chars().count() == MAX_MESSAGE_CHARS);
    }

    #[test]
    fn encodes_outcomes_in_the_tasks_encoding() {
        let v = json!({"a": 1, "b": [true, null]});
        let j = encode(&v, Encoding::Json).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&j).unwrap(), v);
        let m = encode(&v, Encoding::MessagePack).unwrap();
        assert_eq!(rmp_serde::from_slice::<Value>(&m).unwrap(), v);
    }

    #[test]
    fn subject_validation() {
        assert!(is_valid_subject("acme.inbox.42"));
        assert!(!is_valid_subject("acme..x"));
        assert!(!is_valid_subject("a b"));
        assert!(!is_valid_subject("a.>"));
    }
}
