//! Decoding and validating task bodies (JSON or MessagePack) and encoding
//! outcomes and dead letters in the task's encoding. Pure functions: every
//! rule of the protocol's task table lives here, each failure a [`Rejection`]
//! with a message that names the field.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::task::{Encoding, Payload, Priority, Task, Tier};

/// The longest allowed task id.
pub const MAX_TASK_ID_LEN: usize = 128;

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

/// Decodes and validates one task message.
pub fn decode_task(inbound: Inbound<'_>) -> Result<Task, Box<Rejection>> {
    let encoding = encoding_for(inbound.content_type);
    let mut rejection = Box::new(Rejection {
        message: String::new(),
        task_id: None,
        reply_to: None,
        original: None,
        encoding: encoding.unwrap_or_default(),
        metadata: None,
        tenant: None,
    });
    let Some(encoding) = encoding else {
        rejection.message = format!(
            "unsupported Content-Type {:?}: use application/json or application/msgpack",
            inbound.content_type.unwrap_or_default()
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
            salvage(&map, &mut rejection);
        }
        return Err(rejection);
    }
    let value = match parse_body(inbound.body, encoding) {
        Ok(v) => v,
        Err(message) => {
            rejection.message = message;
            return Err(rejection);
        }
    };
    let Value::Object(map) = &value else {
        rejection.message = format!(
            "task body must be an object, got {}",
            json_type_name(&value)
        );
        rejection.original = Some(value);
        return Err(rejection);
    };
    // The hot path: no copies of the body unless it is rejected.
    match build_task(map, &inbound, encoding) {
        Ok(mut task) => {
            task.original = value;
            task.generation = inbound.generation;
            Ok(task)
        }
        Err(message) => {
            salvage(map, &mut rejection);
            rejection.message = message;
            rejection.original = Some(value);
            Err(rejection)
        }
    }
}

fn parse_body(body: &[u8], encoding: Encoding) -> Result<Value, String> {
    match encoding {
        Encoding::Json => serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}")),
        Encoding::MessagePack => {
            rmp_serde::from_slice(body).map_err(|e| format!("malformed MessagePack: {e}"))
        }
    }
}

/// Reads what it can of a bad body, so the failure reaches its producer.
fn salvage(map: &Map<String, Value>, r: &mut Rejection) {
    let id = map
        .get("task_id")
        .or_else(|| map.get("custom_id"))
        .and_then(Value::as_str);
    r.task_id = id.filter(|id| is_valid_task_id(id)).map(str::to_owned);
    r.reply_to = map
        .get("reply_to")
        .and_then(Value::as_str)
        .filter(|s| is_valid_subject(s))
        .map(str::to_owned);
    r.metadata = map.get("metadata").filter(|v| !v.is_null()).cloned();
    r.tenant = map.get("tenant").and_then(Value::as_str).map(str::to_owned);
}

fn build_task(
    map: &Map<String, Value>,
    inbound: &Inbound<'_>,
    encoding: Encoding,
) -> Result<Task, String> {
    // An OpenAI Batch API input line.
    if map.contains_key("custom_id") && !map.contains_key("task_id") {
        return build_batch_line(map, inbound, encoding);
    }
    let task_id = required_str(map, "task_id")?;
    check_task_id(task_id)?;
    let payload = match map.get("payload") {
        None | Some(Value::Null) => return Err("missing required field `payload`".into()),
        Some(Value::Object(p)) => parse_payload(p)?,
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
                .ok_or_else(|| format!("field `priority` must be 1, 2 or 3, got {v}"))?;
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
                format!("field `retry_count` must be a non-negative integer, got {v}")
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
    if model.as_deref() == Some("") {
        return Err("field `model` must not be empty".into());
    }
    let tier = optional_str(map, "tier")?
        .map(|s| {
            Tier::parse(s).ok_or_else(|| {
                format!("field `tier` must be simple, standard, complex or auto, got {s:?}")
            })
        })
        .transpose()?;
    let tenant = optional_str(map, "tenant")?.unwrap_or("default");
    if tenant.is_empty() || tenant.len() > 128 {
        return Err("field `tenant` must be 1 to 128 characters".into());
    }
    let reply_to = optional_str(map, "reply_to")?
        .map(|s| {
            if is_valid_subject(s) {
                Ok(s.to_owned())
            } else {
                Err(format!(
                    "field `reply_to` is not a valid NATS subject: {s:?}"
                ))
            }
        })
        .transpose()?;
    Ok(Task {
        task_id: task_id.to_owned(),
        task_type,
        payload,
        priority,
        retry_count,
        created_at,
        model,
        tier,
        tenant: tenant.to_owned(),
        reply_to,
        deadline,
        metadata: map.get("metadata").filter(|v| !v.is_null()).cloned(),
        original: Value::Null,
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
            return Err(format!("field `method` must be \"POST\", got {method:?}"));
        }
    }
    if let Some(url) = optional_str(map, "url")? {
        if url != "/v1/chat/completions" {
            return Err(format!(
                "field `url` must be \"/v1/chat/completions\" (the only endpoint batchd serves), got {url:?}"
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
    let mut chat = body.clone();
    chat.remove("model");
    let payload = parse_payload(&chat)?;
    Ok(Task {
        task_id: task_id.to_owned(),
        task_type: None,
        payload,
        priority: inbound.priority,
        retry_count: 0,
        created_at: inbound.published_at,
        model,
        tier: None,
        tenant: "default".into(),
        reply_to: None,
        deadline: None,
        metadata: None,
        original: Value::Null,
        encoding,
        generation: 0,
    })
}

fn parse_payload(p: &Map<String, Value>) -> Result<Payload, String> {
    if let Some(messages) = p.get("messages") {
        let Value::Array(list) = messages else {
            return Err("field `payload.messages` must be an array".into());
        };
        if list.is_empty() {
            return Err("field `payload.messages` must not be empty".into());
        }
        for (i, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str);
            match role {
                Some("system" | "developer" | "user" | "assistant" | "tool") => {}
                Some(r) => {
                    return Err(format!(
                        "`payload.messages[{i}].role` {r:?} is not a chat role"
                    ))
                }
                None => return Err(format!("`payload.messages[{i}]` needs a string `role`")),
            }
        }
        if matches!(p.get("stream"), Some(Value::Bool(true))) {
            return Err("`payload.stream` must not be true: batchd does not stream".into());
        }
        let mut chat = p.clone();
        chat.remove("model");
        return Ok(Payload::Chat(chat));
    }
    let text = match p.get("text") {
        Some(Value::String(t)) => t.clone(),
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
    };
    let options = match p.get("options") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(other) => {
            return Err(format!(
                "field `payload.options` must be an object, got {}",
                json_type_name(other)
            ))
        }
    };
    Ok(Payload::Text { text, options })
}

fn check_task_id(id: &str) -> Result<(), String> {
    if is_valid_task_id(id) {
        Ok(())
    } else {
        Err(format!(
            "field `task_id` must be 1-{MAX_TASK_ID_LEN} characters of [A-Za-z0-9_-] (it becomes a subject token), got {:?}",
            truncate(id, 80)
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
        .map_err(|e| format!("field `{key}` must be an RFC 3339 timestamp, got {s:?}: {e}"))
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

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
            (b"{not json".to_vec(), None, "malformed JSON"),
            (
                vec![0xc1, 0xff],
                Some("application/msgpack"),
                "malformed MessagePack",
            ),
            (b"[1,2]".to_vec(), None, "must be an object"),
            (
                br#"{"payload":{"text":"x"},"type":"a"}"#.to_vec(),
                None,
                "missing required field `task_id`",
            ),
            (
                br#"{"task_id":5,"payload":{"text":"x"}}"#.to_vec(),
                None,
                "`task_id` must be a string",
            ),
            (
                br#"{"task_id":"a.b","type":"a","payload":{"text":"x"}}"#.to_vec(),
                None,
                "subject token",
            ),
            (
                br#"{"task_id":"a","type":"a"}"#.to_vec(),
                None,
                "missing required field `payload`",
            ),
            (
                br#"{"task_id":"a","type":"a","payload":{"text":1}}"#.to_vec(),
                None,
                "`payload.text` must be a string",
            ),
            (
                br#"{"task_id":"a","type":"a","payload":{"text":"x"},"priority":1}"#.to_vec(),
                None,
                "arrived on the p2 subject",
            ),
            (
                br#"{"task_id":"a","type":"a","payload":{"text":"x"},"tier":"huge"}"#.to_vec(),
                None,
                "field `tier`",
            ),
            (
                br#"{"task_id":"a","type":"a","payload":{"text":"x"},"deadline":"soon"}"#.to_vec(),
                None,
                "RFC 3339",
            ),
            (
                br#"{"task_id":"a","payload":{"messages":[]}}"#.to_vec(),
                None,
                "must not be empty",
            ),
            (
                br#"{"task_id":"a","payload":{"messages":[{"role":"wizard"}]}}"#.to_vec(),
                None,
                "not a chat role",
            ),
            (
                b"{}".to_vec(),
                Some("text/plain"),
                "unsupported Content-Type",
            ),
        ];
        for (body, ct, expected) in cases {
            let mut i = inbound(&body);
            i.content_type = ct;
            let r = decode_task(i).expect_err(expected);
            assert!(
                r.message.contains(expected),
                "{expected:?} not in {:?}",
                r.message
            );
        }
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
        let r = decode_json(json!({"task_id": "ok_1", "reply_to": "inbox.1", "payload": 3}))
            .unwrap_err();
        assert_eq!(r.task_id.as_deref(), Some("ok_1"));
        assert_eq!(r.reply_to.as_deref(), Some("inbox.1"));
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
