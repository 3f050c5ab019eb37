//! The bodies of Anthropic's Messages API (`POST /v1/messages`), typed as
//! its API reference defines them: what [`crate::provider::AnthropicProvider`]
//! sends and reads, and what `batchd sim` reads and answers, so both sides
//! share one definition. Fields batchd never uses are left out; a body that
//! carries them still parses.

use serde::{Deserialize, Serialize};

/// The `anthropic-version` header value batchd speaks.
pub const API_VERSION: &str = "2023-06-01";

/// A Messages request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesRequest {
    /// The model id.
    pub model: String,
    /// The output limit; required by the API.
    pub max_tokens: u64,
    /// The conversation, user and assistant turns.
    pub messages: Vec<MessageParam>,
    /// The system prompt, top level (there is no system role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemPrompt>,
    /// Texts that end generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<String>,
    /// 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Streaming (server-sent events); batchd never asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
}

/// One turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageParam {
    /// Who speaks.
    pub role: Role,
    /// A string, or content blocks.
    pub content: Content,
}

/// The two roles of a Messages conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The user.
    User,
    /// The model.
    Assistant,
}

/// A turn's content: shorthand text or blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// A single text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<ContentBlockParam>),
}

/// The system prompt: shorthand text or text blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SystemPrompt {
    /// A single text.
    Text(String),
    /// Text blocks (a block may carry `cache_control`).
    Blocks(Vec<ContentBlockParam>),
}

/// A request content block. Only text is built by batchd; other block
/// types (images, tool results) are read as [`ContentBlockParam::Other`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlockParam {
    /// Text.
    Text {
        /// The text.
        text: String,
        /// Marks the end of a prefix to cache.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache_control: Option<CacheControl>,
    },
    /// Any other block type.
    #[serde(other)]
    Other,
}

/// `{"type": "ephemeral"}`: the prompt up to this block is cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheControl {
    /// Always `ephemeral`.
    #[serde(rename = "type")]
    pub kind: CacheControlKind,
}

/// The only cache type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheControlKind {
    /// A 5-minute cache entry.
    Ephemeral,
}

impl CacheControl {
    /// `{"type": "ephemeral"}`.
    pub fn ephemeral() -> Self {
        CacheControl {
            kind: CacheControlKind::Ephemeral,
        }
    }
}

/// A Messages response (`"type": "message"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `msg_...`.
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `assistant`.
    pub role: Role,
    /// The model that answered.
    pub model: String,
    /// The answer's blocks.
    pub content: Vec<ContentBlock>,
    /// `end_turn`, `max_tokens`, `stop_sequence`, `tool_use`, `pause_turn`
    /// or `refusal`.
    pub stop_reason: Option<String>,
    /// The stop sequence that ended generation, if any.
    #[serde(default)]
    pub stop_sequence: Option<String>,
    /// Tokens billed.
    pub usage: Usage,
}

/// A response content block; batchd reads text only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// Any other block type (`tool_use`, `thinking`, ...).
    #[serde(other)]
    Other,
}

/// Usage, additive: `input_tokens` leaves out the cache reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens neither read from nor written to the cache.
    pub input_tokens: u64,
    /// Input tokens written to the cache.
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    /// Input tokens read from the cache.
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    /// Output tokens.
    pub output_tokens: u64,
}

/// An error body: `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What went wrong.
    pub error: ErrorObject,
}

/// The error inside an [`ErrorResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `request_too_large`, `rate_limit_error`,
    /// `api_error` or `overloaded_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A human-readable message.
    pub message: String,
}

impl ErrorResponse {
    /// The error body for an HTTP status, as Anthropic types it.
    pub fn for_status(status: u16, message: String) -> Self {
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        };
        ErrorResponse {
            kind: "error".to_owned(),
            error: ErrorObject {
                kind: kind.to_owned(),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reference_response_parses_with_additive_usage() {
        let m: Message = serde_json::from_value(json!({
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": "Hi! My name is Claude."},
                        {"type": "tool_use", "id": "t", "name": "x", "input": {}}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 2095, "output_tokens": 503,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "service_tier": "standard"}
        }))
        .unwrap();
        assert_eq!(m.content.len(), 2);
        assert_eq!(m.content[1], ContentBlock::Other);
        assert_eq!(m.usage.input_tokens, 2095);
        assert_eq!(m.usage.cache_read_input_tokens, Some(0));
    }

    #[test]
    fn requests_take_string_or_block_content_and_system() {
        let r: MessagesRequest = serde_json::from_value(json!({
            "model": "claude-3-5-haiku-latest",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]
        }))
        .unwrap();
        assert_eq!(
            r.system,
            Some(SystemPrompt::Blocks(vec![ContentBlockParam::Text {
                text: "Be brief.".into(),
                cache_control: Some(CacheControl::ephemeral())
            }]))
        );
        assert_eq!(r.messages[0].content, Content::Text("Hello".into()));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["system"][0]["cache_control"]["type"], "ephemeral");
        assert!(back.get("temperature").is_none());
    }

    #[test]
    fn error_types_follow_the_status() {
        let e = ErrorResponse::for_status(529, "Overloaded".into());
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        assert_eq!(
            ErrorResponse::for_status(429, String::new()).error.kind,
            "rate_limit_error"
        );
        assert_eq!(
            ErrorResponse::for_status(400, String::new()).error.kind,
            "invalid_request_error"
        );
    }
}
