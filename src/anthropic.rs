//! The bodies of Anthropic's Messages API (`POST /v1/messages`) and Message
//! Batches API (`/v1/messages/batches`), typed as
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

/// A Message Batches create body (`POST /v1/messages/batches`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageBatchCreate {
    /// The requests, each with its own `custom_id`.
    pub requests: Vec<MessageBatchRequest>,
}

/// One request of a Message Batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageBatchRequest {
    /// 1-64 characters of `[A-Za-z0-9_-]`, unique in the batch.
    pub custom_id: String,
    /// The Messages request.
    pub params: MessagesRequest,
}

/// A `message_batch` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageBatch {
    /// `msgbatch_...`.
    pub id: String,
    /// Always `message_batch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Where processing stands.
    pub processing_status: ProcessingStatus,
    /// Requests by state.
    pub request_counts: RequestCounts,
    /// RFC 3339, once ended.
    pub ended_at: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: 24 hours after creation, when unfinished requests expire.
    pub expires_at: String,
    /// RFC 3339, once archived (results gone).
    #[serde(default)]
    pub archived_at: Option<String>,
    /// RFC 3339, once a cancellation was asked for.
    #[serde(default)]
    pub cancel_initiated_at: Option<String>,
    /// Where the results are, once ended.
    pub results_url: Option<String>,
}

/// A Message Batch's `processing_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingStatus {
    /// Requests are being answered.
    InProgress,
    /// A cancellation is under way.
    Canceling,
    /// Every request has its result.
    Ended,
}

/// A Message Batch's `request_counts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Not answered yet.
    pub processing: u64,
    /// Answered.
    pub succeeded: u64,
    /// Failed.
    pub errored: u64,
    /// Cancelled before they were answered.
    pub canceled: u64,
    /// Not answered within 24 hours.
    pub expired: u64,
}

/// One line of a Message Batch's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageBatchResultLine {
    /// The request's `custom_id`.
    pub custom_id: String,
    /// How it ended.
    pub result: MessageBatchResult,
}

/// How one request of a Message Batch ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageBatchResult {
    /// Answered.
    Succeeded {
        /// The answer.
        message: Message,
    },
    /// Failed, with the error body a Messages call would have had.
    Errored {
        /// The error.
        error: ErrorResponse,
    },
    /// Cancelled before it was answered.
    Canceled,
    /// Not answered within 24 hours.
    Expired,
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

    #[test]
    fn reference_message_batch_objects_and_result_lines_parse() {
        // The shape of the API reference's example of a retrieved batch.
        let b: MessageBatch = serde_json::from_value(json!({
            "id": "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message_batch",
            "archived_at": null,
            "cancel_initiated_at": null,
            "created_at": "2024-08-20T18:37:24.100435Z",
            "ended_at": "2024-08-20T18:37:24.100435Z",
            "expires_at": "2024-08-21T18:37:24.100435Z",
            "processing_status": "ended",
            "request_counts": {"canceled": 10, "errored": 30, "expired": 10,
                               "processing": 0, "succeeded": 50},
            "results_url": "https://api.anthropic.com/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results"
        }))
        .unwrap();
        assert_eq!(b.processing_status, ProcessingStatus::Ended);
        assert_eq!(b.request_counts.errored, 30);
        let lines = [
            json!({"custom_id": "a", "result": {"type": "succeeded", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-0",
                "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 1}}}}),
            json!({"custom_id": "b", "result": {"type": "errored", "error": {"type": "error",
                "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}}}),
            json!({"custom_id": "c", "result": {"type": "canceled"}}),
            json!({"custom_id": "d", "result": {"type": "expired"}}),
        ];
        let read: Vec<MessageBatchResultLine> = lines
            .iter()
            .map(|l| serde_json::from_value(l.clone()).unwrap())
            .collect();
        assert!(matches!(
            read[0].result,
            MessageBatchResult::Succeeded { .. }
        ));
        assert!(
            matches!(&read[1].result, MessageBatchResult::Errored { error } if error.error.kind == "invalid_request_error")
        );
        assert_eq!(read[2].result, MessageBatchResult::Canceled);
        assert_eq!(read[3].result, MessageBatchResult::Expired);
        // What the simulator writes reads back the same.
        for (line, json) in read.iter().zip(&lines) {
            assert_eq!(
                &serde_json::to_value(line).unwrap()["result"]["type"],
                &json["result"]["type"]
            );
        }
    }
}
