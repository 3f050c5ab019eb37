//! Anthropic Messages (`{base_url}/v1/messages`), realtime.
//!
//! The engine hands every provider the same chat request (OpenAI's shape);
//! this adapter turns it into a Messages request (system prompt at the top
//! level with `cache_control`, `max_tokens` always set) and reads the answer
//! back into the protocol's meaning: `stop_reason` as a finish reason, and
//! Anthropic's additive usage made inclusive (docs/PROTOCOL.md).

use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::codec::truncate;
use batchd_actors::completion::{parse_error_body, MAX_PROVIDER_MESSAGE_CHARS};
use batchd_actors::ports::{CachedPrefix, Completion, Provider, ProviderError};
use batchd_actors::task::Usage;
use serde_json::Value;

use super::{status_error, Answer, Endpoint, Http, ProviderBuildError};
use crate::anthropic::{
    CacheControl, Content, ContentBlock, ContentBlockParam, Message, MessageParam, MessagesRequest,
    Role, SystemPrompt, Usage as AnthropicUsage,
};
use crate::config::ProviderConfig;
use crate::secrets::Scrubber;

pub use crate::anthropic::API_VERSION as ANTHROPIC_VERSION;

/// `max_tokens` sent when the request names no output limit (the API
/// requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// An Anthropic Messages endpoint.
pub struct AnthropicProvider {
    http: Http,
    endpoint: Endpoint,
    api_key: Option<String>,
}

impl AnthropicProvider {
    /// A client for `base_url` (without `/v1`, as the Anthropic SDK takes
    /// it; a trailing `/v1` is tolerated), with an optional key.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ProviderBuildError> {
        Ok(AnthropicProvider {
            http: Http::new(base_url, api_key.as_deref(), timeout)?,
            endpoint: Endpoint::new(sdk_base(base_url), "/v1/messages")?,
            api_key,
        })
    }

    /// From a provider's config section, environment overrides applied.
    pub fn from_config(c: &ProviderConfig, timeout: Duration) -> Result<Self, ProviderBuildError> {
        AnthropicProvider::new(&c.resolved_base_url(), c.resolved_api_key(), timeout)
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn cached_prefix(&self) -> CachedPrefix {
        // `cache_control` marks the system prompt and the template head
        // (the engine's first text part), nothing after them.
        CachedPrefix::Marked
    }

    async fn complete(&self, request: &Value) -> Result<Completion, ProviderError> {
        let body = messages_request(request).map_err(|message| ProviderError::Rejected {
            status: 400,
            message: format!("not expressible as an Anthropic Messages request: {message}"),
        })?;
        let mut req = self
            .http
            .client
            .post(self.endpoint.url.clone())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        if let Some(key) = &self.api_key {
            req = req.header("x-api-key", key);
        }
        let answer = self.http.send(req).await?;
        read_answer(answer, &self.http.scrubber)
    }
}

/// The base URL as the Anthropic SDK takes it: without `/v1` (a trailing
/// `/v1` or `/` is dropped).
pub(super) fn sdk_base(base_url: &str) -> &str {
    let trimmed = base_url.trim_end_matches('/');
    trimmed.strip_suffix("/v1").unwrap_or(trimmed)
}

/// The Messages request for the engine's chat request.
pub fn messages_request(chat: &Value) -> Result<MessagesRequest, String> {
    let model = chat["model"]
        .as_str()
        .ok_or("the request has no `model`")?
        .to_owned();
    let Some(turns) = chat["messages"].as_array() else {
        return Err("the request has no `messages` array".into());
    };
    let mut system = Vec::new();
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let role = turn["role"].as_str().unwrap_or_default();
        // The first message, a user's in text parts: the engine sent the
        // template head as its first part, the end of the shared prefix.
        if role == "user" && messages.is_empty() {
            if let Some(blocks) = marked_head(&turn["content"]) {
                messages.push(MessageParam {
                    role: Role::User,
                    content: Content::Blocks(blocks),
                });
                continue;
            }
        }
        let text = turn_text(&turn["content"])
            .ok_or_else(|| format!("messages[{i}].content is neither a string nor text parts"))?;
        let role = match role {
            "system" | "developer" => {
                system.push(text);
                continue;
            }
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(format!(
                    "messages[{i}].role {} has no Anthropic equivalent",
                    truncate(other, 40)
                ))
            }
        };
        messages.push(MessageParam {
            role,
            content: Content::Text(text),
        });
    }
    if messages.is_empty() {
        return Err("the request has no user or assistant message".into());
    }
    // The system prompt is the prefix tasks share: mark it for caching.
    let system = (!system.is_empty()).then(|| {
        SystemPrompt::Blocks(vec![ContentBlockParam::Text {
            text: system.join("\n\n"),
            cache_control: Some(CacheControl::ephemeral()),
        }])
    });
    let max_tokens = chat["max_completion_tokens"]
        .as_u64()
        .or_else(|| chat["max_tokens"].as_u64())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let stop_sequences = match &chat["stop"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(list) => list
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(MessagesRequest {
        model,
        max_tokens,
        messages,
        system,
        stop_sequences,
        // OpenAI's range is 0 to 2, Anthropic's 0 to 1.
        temperature: chat["temperature"].as_f64().map(|t| t.clamp(0.0, 1.0)),
        top_p: chat["top_p"].as_f64(),
        stream: None,
    })
}

/// Text parts (two or more, text only) as blocks, the first marked with
/// `cache_control`: the prompt up to it is the prefix the provider caches.
fn marked_head(content: &Value) -> Option<Vec<ContentBlockParam>> {
    let parts = content.as_array().filter(|p| p.len() >= 2)?;
    let texts = parts
        .iter()
        .map(|p| (p["type"] == "text").then(|| p["text"].as_str()).flatten())
        .collect::<Option<Vec<_>>>()?;
    Some(
        texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| ContentBlockParam::Text {
                text: text.to_owned(),
                cache_control: (i == 0).then(CacheControl::ephemeral),
            })
            .collect(),
    )
}

/// A chat message's content as one text: a string, or its text parts.
fn turn_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| (p["type"] == "text").then(|| p["text"].as_str()).flatten())
            .collect::<Option<Vec<_>>>()
            .map(|texts| texts.join("\n")),
        _ => None,
    }
}

/// An answer as the engine reads it: a completion, or the error that
/// decides what happens to the task.
fn read_answer(answer: Answer, scrubber: &Scrubber) -> Result<Completion, ProviderError> {
    let code = answer.status;
    if (200..300).contains(&code) {
        // A 200 without a usable answer is a transient failure.
        let mut completion =
            parse_message(&answer.body).map_err(|message| ProviderError::Transient {
                status: Some(code),
                message: scrubber.scrub(&message),
            })?;
        completion.limits = answer.limits;
        return Ok(completion);
    }
    let (_, message) = parse_error_body(&answer.body);
    let message = scrubber.scrub(&message);
    // Anthropic answers an account out of credit with a 400: no retry helps.
    if code == 400 && message.contains("credit balance is too low") {
        return Err(ProviderError::QuotaExhausted { message });
    }
    // 529 overloaded_error and 500 api_error are transient, as 5xx are.
    Err(status_error(code, answer.limits, message))
}

/// Reads a 200 answer; the `Err` says why it is not a usable answer.
pub fn parse_message(body: &[u8]) -> Result<Completion, String> {
    let m: Message = serde_json::from_slice(body).map_err(|e| {
        format!(
            "unreadable response body: {}",
            truncate(&e.to_string(), MAX_PROVIDER_MESSAGE_CHARS)
        )
    })?;
    completion_of(&m)
}

/// A message as a completion; the `Err` says why it is not a usable answer.
pub fn completion_of(m: &Message) -> Result<Completion, String> {
    let texts: Vec<&str> = m
        .content
        .iter()
        .filter_map(|b| match b {
            ContentBlock::Text { text } => Some(text.as_str()),
            ContentBlock::Other => None,
        })
        .collect();
    let stop = m.stop_reason.as_deref();
    // A refusal is the model's answer: retrying would only pay again.
    if texts.is_empty() && stop != Some("refusal") {
        return Err(format!(
            "the response has no text content (stop_reason {})",
            truncate(stop.unwrap_or("null"), 40)
        ));
    }
    Ok(Completion {
        output: Some(texts.concat()),
        finish_reason: m.stop_reason.as_deref().map(finish_reason),
        usage: inclusive_usage(&m.usage),
        limits: Default::default(),
        service_tier: None,
    })
}

/// `stop_reason` in the protocol's (OpenAI's) words; others pass through.
fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

/// Anthropic's additive usage in the protocol's meaning: `input_tokens`
/// counts every prompt token, cache reads and writes included.
pub fn inclusive_usage(u: &AnthropicUsage) -> Usage {
    let read = u.cache_read_input_tokens.unwrap_or(0);
    let written = u.cache_creation_input_tokens.unwrap_or(0);
    Usage {
        input_tokens: u.input_tokens.saturating_add(read).saturating_add(written),
        cached_input_tokens: read,
        output_tokens: u.output_tokens,
        cache_write_input_tokens: written,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchd_actors::route::limits::RateLimitInfo;
    use serde_json::json;

    #[test]
    fn the_engine_is_told_that_only_the_marked_system_prompt_is_cached() {
        let p = AnthropicProvider::new("http://127.0.0.1:9", None, Duration::from_secs(1))
            .expect("a provider");
        assert_eq!(p.cached_prefix(), CachedPrefix::Marked);
    }

    #[test]
    fn the_system_prompt_goes_top_level_with_cache_control_and_max_tokens_is_always_set() {
        let r = messages_request(&json!({
            "model": "claude-3-5-haiku-latest",
            "messages": [
                {"role": "system", "content": "You summarize."},
                {"role": "user", "content": [{"type": "text", "text": "doc"}]},
            ],
            "max_completion_tokens": 300,
            "temperature": 1.7,
            "stop": "END",
        }))
        .unwrap();
        let body = serde_json::to_value(&r).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-3-5-haiku-latest",
                "max_tokens": 300,
                "system": [{"type": "text", "text": "You summarize.",
                            "cache_control": {"type": "ephemeral"}}],
                "messages": [{"role": "user", "content": "doc"}],
                "stop_sequences": ["END"],
                "temperature": 1.0,
            })
        );
        let r = messages_request(&json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert_eq!(r.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(r.system, None);
        let r = messages_request(&json!({"model": "m", "max_tokens": 7,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(r.max_tokens, 7);
    }

    #[test]
    fn a_first_user_message_in_text_parts_marks_its_first_part_as_the_end_of_the_prefix() {
        let r = messages_request(&json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Rules."},
                {"role": "user", "content": [{"type": "text", "text": "Summarize: "},
                                             {"type": "text", "text": "doc"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]},
            ],
        }))
        .unwrap();
        let body = serde_json::to_value(&r).unwrap();
        assert_eq!(
            body["messages"][0]["content"],
            json!([{"type": "text", "text": "Summarize: ", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "doc"}])
        );
        assert_eq!(
            body["messages"][2]["content"], "a\nb",
            "later turns are one text"
        );
        assert_eq!(body["system"][0]["cache_control"]["type"], "ephemeral");
    }

    #[test]
    fn requests_anthropic_cannot_express_are_refused_by_field() {
        for (chat, expected) in [
            (json!({"messages": []}), "no `model`"),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "system", "content": "s"}]}),
                "no user or assistant message",
            ),
        ] {
            let e = messages_request(&chat).unwrap_err();
            assert!(e.contains(expected), "{e}");
        }
    }

    #[test]
    fn text_blocks_stop_reason_and_additive_usage_are_read() {
        let c = parse_message(
            br#"{"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-0",
                 "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
                 "stop_reason": "max_tokens", "stop_sequence": null,
                 "usage": {"input_tokens": 10, "cache_read_input_tokens": 700,
                           "cache_creation_input_tokens": 90, "output_tokens": 41}}"#,
        )
        .unwrap();
        assert_eq!(c.output.as_deref(), Some("Hello there"));
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 800,
                cached_input_tokens: 700,
                output_tokens: 41,
                cache_write_input_tokens: 90,
            }
        );
        let e = parse_message(
            br#"{"id": "m", "type": "message", "role": "assistant", "model": "x", "content": [],
                 "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 0}}"#,
        )
        .unwrap_err();
        assert!(e.contains("no text content"), "{e}");
        assert!(parse_message(b"<html>").unwrap_err().contains("unreadable"));
    }

    fn answer(status: u16, body: &str, limits: RateLimitInfo) -> Answer {
        Answer {
            status,
            limits,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn overloaded_is_transient_rate_limits_carry_their_headers_and_secrets_are_scrubbed() {
        let scrubber = Scrubber::new(["sk-ant-canary".to_owned()]);
        let e = read_answer(
            answer(
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                RateLimitInfo::default(),
            ),
            &scrubber,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ProviderError::Transient {
                status: Some(529),
                message: "overloaded_error: Overloaded".into()
            }
        );
        let limits = batchd_actors::route::limits::parse_rate_limit_headers(
            [
                ("retry-after", "3"),
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2030-01-01T00:00:00Z"),
            ],
            chrono::Utc::now(),
            Duration::from_secs(60),
        );
        let e = read_answer(
            answer(
                429,
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
                limits.clone(),
            ),
            &scrubber,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ProviderError::RateLimited {
                limits,
                message: "rate_limit_error: slow down".into()
            }
        );
        let e = read_answer(
            answer(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key sk-ant-canary"}}"#,
                RateLimitInfo::default(),
            ),
            &scrubber,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ProviderError::Rejected {
                status: 401,
                message: "authentication_error: invalid x-api-key ***".into()
            }
        );
    }

    #[test]
    fn an_account_out_of_credit_is_quota_exhausted() {
        let e = read_answer(
            answer(
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#,
                RateLimitInfo::default(),
            ),
            &Scrubber::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::QuotaExhausted { .. }), "{e}");
    }

    #[test]
    fn the_endpoint_is_under_v1_whether_or_not_the_base_has_it() {
        for base in [
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/",
            "http://127.0.0.1:9/v1",
        ] {
            let p = AnthropicProvider::new(base, None, Duration::from_secs(1)).unwrap();
            assert_eq!(p.endpoint.url.path(), "/v1/messages", "{base}");
        }
    }
}
