//! Anthropic's Messages API in the simulator: the headers it requires, the
//! request read with the shared Messages types, explicit prompt caching
//! (`cache_control`), the `message` answer with additive usage, and the
//! `anthropic-ratelimit-*` headers.
//!
//! The request is answered by the same model as chat completions: it is
//! rewritten as a chat request (system first), so the same conversation gets
//! the same answer and the same token count through either API.

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use super::api_error::ApiError;
use super::completion::Generated;
use super::fault::FaultKind;
use super::rate_limit::Quota;
use super::request::{self, count_tokens, ChatRequest};
use super::service::Outcome;
use crate::anthropic::{
    Content, ContentBlock, ContentBlockParam, Message, MessagesRequest, Role, SystemPrompt, Usage,
};

/// Which API a request came in through; it decides the error shapes, the
/// headers and the usage's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
}

/// Anthropic's status while overloaded.
pub(crate) const OVERLOADED: u16 = 529;

/// A Messages request, reduced to what the simulator needs.
pub(crate) struct Parsed {
    pub chat: ChatRequest,
    /// The text up to the last block marked `cache_control` in the system
    /// prompt: the prefix Anthropic caches.
    pub cache_prefix: Option<String>,
}

/// `x-api-key` and `anthropic-version` are both required.
pub(crate) fn check_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let present = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().is_empty())
    };
    if !present("x-api-key") {
        return Err(status_error(
            StatusCode::UNAUTHORIZED,
            "x-api-key header is required".to_owned(),
        ));
    }
    if !present("anthropic-version") {
        return Err(status_error(
            StatusCode::BAD_REQUEST,
            "anthropic-version: header is required".to_owned(),
        ));
    }
    Ok(())
}

/// An error whose Anthropic type follows from its status (see
/// [`crate::anthropic::ErrorResponse::for_status`]).
pub(crate) fn status_error(status: StatusCode, message: String) -> ApiError {
    ApiError {
        status,
        message,
        kind: "",
        param: None,
        code: None,
    }
}

/// The 529 of an overloaded API.
pub(crate) fn overloaded() -> ApiError {
    status_error(
        StatusCode::from_u16(OVERLOADED).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "Overloaded".to_owned(),
    )
}

/// The message of a 400 for an account out of credit (Anthropic has no 429
/// for it).
pub const CREDIT_TOO_LOW: &str = "Your credit balance is too low to access the Anthropic API. \
     Please go to Plans & Billing to upgrade or purchase credits.";

/// A scripted fault's answer in Anthropic's words, where they differ from
/// OpenAI's (`None`: the shared answer, or no answer).
pub(crate) fn fault_error(kind: FaultKind, model: Option<&str>) -> Option<(Outcome, ApiError)> {
    let error = |status: StatusCode, message: &str| status_error(status, message.to_owned());
    Some(match kind {
        FaultKind::Outage { status: 500 } => (
            Outcome::Unavailable,
            error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error"),
        ),
        FaultKind::Outage { .. } => (Outcome::Unavailable, overloaded()),
        FaultKind::Unauthorized => (
            Outcome::AuthError,
            error(StatusCode::UNAUTHORIZED, "invalid x-api-key"),
        ),
        FaultKind::Forbidden => (
            Outcome::AuthError,
            error(
                StatusCode::FORBIDDEN,
                "Your API key does not have permission to use the specified resource.",
            ),
        ),
        FaultKind::ModelNotFound => (
            Outcome::NotFound,
            status_error(
                StatusCode::NOT_FOUND,
                format!("model: {}", model.unwrap_or_default()),
            ),
        ),
        FaultKind::Quota => (
            Outcome::QuotaError,
            error(StatusCode::BAD_REQUEST, CREDIT_TOO_LOW),
        ),
        FaultKind::BadRequest => (
            Outcome::BadRequest,
            error(
                StatusCode::BAD_REQUEST,
                "Output blocked by content filtering policy",
            ),
        ),
        FaultKind::RateLimitStorm { .. } | FaultKind::Refuse | FaultKind::Slow { .. } => {
            return None
        }
    })
}

/// Reads a Messages body as the API validates it.
pub(crate) fn parse(body: &Value) -> Result<Parsed, ApiError> {
    let invalid = |message: String| status_error(StatusCode::BAD_REQUEST, message);
    let r: MessagesRequest =
        serde_json::from_value(body.clone()).map_err(|e| invalid(format!("body: {e}")))?;
    if r.max_tokens < 1 {
        return Err(invalid(
            "max_tokens: must be greater than or equal to 1".into(),
        ));
    }
    if r.messages.is_empty() {
        return Err(invalid("messages: at least one message is required".into()));
    }
    if r.stream == Some(true) {
        return Err(invalid("stream: not supported by the simulator".into()));
    }
    let mut chat_messages = Vec::with_capacity(r.messages.len() + 1);
    let mut cache_prefix = None;
    if let Some(system) = &r.system {
        let (text, cached) = match system {
            SystemPrompt::Text(text) => (text.clone(), None),
            SystemPrompt::Blocks(blocks) => {
                let mut text = String::new();
                let mut cached = None;
                for block in blocks {
                    if let ContentBlockParam::Text {
                        text: t,
                        cache_control,
                    } = block
                    {
                        text.push_str(t);
                        if cache_control.is_some() {
                            cached = Some(text.clone());
                        }
                    }
                }
                (text, cached)
            }
        };
        cache_prefix = cached;
        chat_messages.push(json!({"role": "system", "content": text}));
    }
    // What comes before a marked block of the messages, for a cache
    // prefix that runs past the system prompt.
    let mut before = chat_messages
        .first()
        .and_then(|m| m["content"].as_str())
        .map(str::to_owned)
        .unwrap_or_default();
    for m in &r.messages {
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        before.push('\n');
        let text = match &m.content {
            Content::Text(text) => text.clone(),
            Content::Blocks(blocks) => {
                let mut texts = Vec::with_capacity(blocks.len());
                for b in blocks {
                    if let ContentBlockParam::Text {
                        text,
                        cache_control,
                    } = b
                    {
                        texts.push(text.as_str());
                        if cache_control.is_some() {
                            cache_prefix = Some(format!("{before}{}", texts.join("\n")));
                        }
                    }
                }
                texts.join("\n")
            }
        };
        before.push_str(&text);
        chat_messages.push(json!({"role": role, "content": text}));
    }
    let chat = request::parse(&json!({
        "model": r.model,
        "messages": chat_messages,
        "max_tokens": r.max_tokens,
    }))
    .map_err(|e| invalid(e.message))?;
    Ok(Parsed { chat, cache_prefix })
}

/// Tokens of a cache prefix, never more than the whole prompt.
pub(crate) fn prefix_tokens(prefix: &str, prompt_tokens: u64) -> u64 {
    count_tokens(prefix).min(prompt_tokens)
}

/// The `message` answer; `read` and `written` are the prompt tokens served
/// from and written to the cache (the rest is `input_tokens`).
pub(crate) fn answer(
    id: String,
    model: &str,
    generated: Generated,
    prompt_tokens: u64,
    read: u64,
    written: u64,
) -> Message {
    let (text, stop) = generated
        .choices
        .into_iter()
        .next()
        .map(|c| (c.content, c.finish_reason))
        .unwrap_or_default();
    Message {
        id,
        kind: "message".to_owned(),
        role: Role::Assistant,
        model: model.to_owned(),
        content: vec![ContentBlock::Text { text }],
        stop_reason: Some(
            if stop == "length" {
                "max_tokens"
            } else {
                "end_turn"
            }
            .to_owned(),
        ),
        stop_sequence: None,
        usage: Usage {
            input_tokens: prompt_tokens.saturating_sub(read + written),
            cache_creation_input_tokens: Some(written),
            cache_read_input_tokens: Some(read),
            output_tokens: generated.completion_tokens,
        },
    }
}

/// The `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`
/// headers (reset as an RFC 3339 instant).
pub(crate) fn quota_headers(quota: &Quota) -> Vec<(String, String)> {
    let now = chrono::Utc::now();
    let mut headers = Vec::new();
    for (unit, budget) in [("requests", quota.requests), ("tokens", quota.tokens)] {
        let Some(b) = budget else { continue };
        let reset = now + chrono::Duration::from_std(b.reset).unwrap_or_default();
        headers.extend([
            (
                format!("anthropic-ratelimit-{unit}-limit"),
                b.limit.to_string(),
            ),
            (
                format!("anthropic-ratelimit-{unit}-remaining"),
                b.remaining.to_string(),
            ),
            (
                format!("anthropic-ratelimit-{unit}-reset"),
                reset.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        ]);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_prefix_ends_at_the_last_marked_system_block() {
        let p = parse(&json!({
            "model": "claude-3-5-haiku-latest", "max_tokens": 5,
            "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                       {"type": "text", "text": "B"}],
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert_eq!(p.cache_prefix.as_deref(), Some("A"));
        assert_eq!(p.chat.max_output_tokens, Some(5));
        assert_eq!(p.chat.prompt.last_user_text(), "hi");
    }

    #[test]
    fn a_marked_block_of_the_first_message_extends_the_cached_prefix_past_the_system_prompt() {
        let p = parse(&json!({
            "model": "claude-3-5-haiku-latest", "max_tokens": 5,
            "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Head: ", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "doc"}]}]
        }))
        .unwrap();
        assert_eq!(p.cache_prefix.as_deref(), Some("A\nHead: "));
        assert_eq!(p.chat.prompt.last_user_text(), "Head: \ndoc");
    }

    #[test]
    fn missing_fields_and_headers_are_invalid_requests() {
        for body in [
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            json!({"model": "m", "max_tokens": 1, "messages": []}),
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
        ] {
            let e = parse(&body).err().expect("invalid");
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(
            check_headers(&headers).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        headers.insert("x-api-key", "k".parse().unwrap());
        assert_eq!(
            check_headers(&headers).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        headers.insert("anthropic-version", "2023-06-01".parse().unwrap());
        assert!(check_headers(&headers).is_ok());
    }
}
