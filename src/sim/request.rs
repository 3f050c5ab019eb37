//! Reads a Chat Completions request body the way OpenAI validates it, and
//! renders its messages into one prompt text with a token count.
//!
//! Only the fields that change the simulator's answer are checked in depth
//! (`model`, `messages`, `stream`, `n`, `max_tokens`, `max_completion_tokens`,
//! `response_format`); other fields are accepted as they are.

use serde_json::{Map, Value};

use super::api_error::ApiError;

/// The roles OpenAI accepts; `function` is deprecated but still served.
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// OpenAI's upper bound on `n`.
const MAX_CHOICES: i64 = 128;

/// Tokens an image part costs (OpenAI's price of a low-detail image).
const IMAGE_TOKENS: u64 = 85;

/// Per-message framing tokens, as in OpenAI's token-counting cookbook.
const TOKENS_PER_MESSAGE: u64 = 3;

/// Tokens that prime the assistant's reply, counted once per request.
const REPLY_PRIMING_TOKENS: u64 = 3;

/// A validated request, reduced to what the simulator needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub prompt: Prompt,
    /// The smaller of `max_completion_tokens` and `max_tokens`, when either is set.
    pub max_output_tokens: Option<u64>,
    pub choices: u32,
    /// `response_format` asks for JSON, so the answer is a JSON object.
    pub json_output: bool,
    /// The `json_schema.schema` of a `response_format` of type
    /// `json_schema`: the answer is an object valid for it.
    pub json_schema: Option<Value>,
    /// The `service_tier` asked for.
    pub service_tier: super::tiers::ServiceTier,
}

/// The conversation as one text, ChatML-style, so that its hash does not
/// depend on how the client ordered JSON keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prompt {
    pub text: String,
    pub tokens: u64,
    /// Where the last user message's content sits in `text` (the answer quotes it).
    pub last_user: std::ops::Range<usize>,
}

impl Prompt {
    pub(crate) fn last_user_text(&self) -> &str {
        self.text.get(self.last_user.clone()).unwrap_or_default()
    }
}

/// Approximate token count of a text: OpenAI's rule of thumb of four characters a token.
pub(crate) fn count_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

pub(crate) fn parse(body: &Value) -> Result<ChatRequest, ApiError> {
    let Some(fields) = body.as_object() else {
        return Err(ApiError::invalid_type("body", "a JSON object", body));
    };

    let model = match fields.get("model") {
        None | Some(Value::Null) => return Err(ApiError::missing_model()),
        Some(Value::String(model)) if model.is_empty() => return Err(ApiError::missing_model()),
        Some(Value::String(model)) => model.clone(),
        Some(other) => return Err(ApiError::invalid_type("model", "a string", other)),
    };

    match fields.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(ApiError::streaming_unsupported()),
        Some(other) => return Err(ApiError::invalid_type("stream", "a boolean", other)),
    }

    let messages = match fields.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::missing("messages")),
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err(ApiError::empty_array("messages"))
        }
        Some(Value::Array(messages)) => messages,
        Some(other) => {
            return Err(ApiError::invalid_type(
                "messages",
                "an array of objects",
                other,
            ))
        }
    };

    let mut prompt = PromptBuilder::default();
    for (index, message) in messages.iter().enumerate() {
        prompt.push_message(index, message)?;
    }
    if let Some(tools) = fields.get("tools").filter(|tools| !tools.is_null()) {
        // Tool definitions are part of the prompt OpenAI bills.
        prompt.tokens += serde_json::to_string(tools).map_or(0, |json| count_tokens(&json));
    }

    let max_completion_tokens = optional_count(fields, "max_completion_tokens", 1, None)?;
    let max_tokens = optional_count(fields, "max_tokens", 1, None)?;
    let max_output_tokens = match (max_completion_tokens, max_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let choices = optional_count(fields, "n", 1, Some(MAX_CHOICES))?.unwrap_or(1);
    let service_tier = super::tiers::ServiceTier::parse(fields.get("service_tier"))?;

    Ok(ChatRequest {
        model,
        prompt: prompt.finish(),
        max_output_tokens,
        choices: u32::try_from(choices).unwrap_or(1),
        json_output: wants_json(fields.get("response_format")),
        json_schema: schema_of(fields.get("response_format")),
        service_tier,
    })
}

/// An optional integer field with bounds; `null` means absent.
fn optional_count(
    fields: &Map<String, Value>,
    name: &str,
    min: i64,
    max: Option<i64>,
) -> Result<Option<u64>, ApiError> {
    let value = match fields.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(value) => value,
    };
    if let Some(n) = value.as_u64() {
        return match max {
            Some(max) if n > max.unsigned_abs() => Err(ApiError::above_max(name, max, value)),
            _ if n < min.unsigned_abs() => Err(ApiError::below_min(name, min, value)),
            _ => Ok(Some(n)),
        };
    }
    if value.is_i64() {
        // Only negative integers are left here.
        return Err(ApiError::below_min(name, min, value));
    }
    Err(ApiError::invalid_type(name, "an integer", value))
}

fn wants_json(response_format: Option<&Value>) -> bool {
    let kind = response_format
        .and_then(|format| format.get("type"))
        .and_then(Value::as_str);
    matches!(kind, Some("json_object" | "json_schema"))
}

/// The schema a `{"type": "json_schema", "json_schema": {"schema": ...}}`
/// response format asks for.
fn schema_of(response_format: Option<&Value>) -> Option<Value> {
    let format = response_format?;
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return None;
    }
    format.get("json_schema")?.get("schema").cloned()
}

#[derive(Default)]
struct PromptBuilder {
    text: String,
    tokens: u64,
    last_user: Option<std::ops::Range<usize>>,
    last_any: std::ops::Range<usize>,
}

impl PromptBuilder {
    fn push_message(&mut self, index: usize, message: &Value) -> Result<(), ApiError> {
        let param = format!("messages[{index}]");
        let Some(fields) = message.as_object() else {
            return Err(ApiError::invalid_type(&param, "an object", message));
        };
        let role = match fields.get("role") {
            None | Some(Value::Null) => return Err(ApiError::missing(&format!("{param}.role"))),
            Some(Value::String(role)) => role.as_str(),
            Some(other) => {
                return Err(ApiError::invalid_type(
                    &format!("{param}.role"),
                    "a string",
                    other,
                ))
            }
        };
        if !ROLES.contains(&role) {
            return Err(ApiError::invalid_value(
                &format!("{param}.role"),
                format!(
                    "Invalid value: '{role}'. Supported values are: 'system', 'assistant', \
                     'user', 'function', 'tool', and 'developer'."
                ),
            ));
        }

        let name = match fields.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(name.as_str()),
            Some(other) => {
                return Err(ApiError::invalid_type(
                    &format!("{param}.name"),
                    "a string",
                    other,
                ))
            }
        };
        if role == "function" && name.is_none() {
            return Err(ApiError::missing(&format!("{param}.name")));
        }
        if role == "tool" {
            match fields.get("tool_call_id") {
                Some(Value::String(_)) => {}
                None | Some(Value::Null) => {
                    return Err(ApiError::missing(&format!("{param}.tool_call_id")))
                }
                Some(other) => {
                    return Err(ApiError::invalid_type(
                        &format!("{param}.tool_call_id"),
                        "a string",
                        other,
                    ))
                }
            }
        }

        self.text.push_str("<|im_start|>");
        self.text.push_str(role);
        self.tokens += TOKENS_PER_MESSAGE + 1;
        if let Some(name) = name {
            self.text.push(':');
            self.push_counted(name);
            self.tokens += 1;
        }
        self.text.push('\n');

        let content_start = self.text.len();
        let calls = fields.get("tool_calls").filter(|calls| !calls.is_null());
        let may_omit_content = role == "assistant"
            && (calls.is_some() || fields.get("function_call").is_some_and(|c| !c.is_null()));
        let content_param = format!("{param}.content");
        match fields.get("content") {
            None | Some(Value::Null) if may_omit_content || role == "function" => {}
            None | Some(Value::Null) => return Err(ApiError::missing(&content_param)),
            Some(Value::String(text)) => self.push_counted(text),
            Some(Value::Array(parts)) if parts.is_empty() => {
                return Err(ApiError::empty_array(&content_param))
            }
            Some(Value::Array(parts)) => {
                for (part_index, part) in parts.iter().enumerate() {
                    self.push_part(&format!("{content_param}[{part_index}]"), part)?;
                }
            }
            Some(other) => {
                return Err(ApiError::invalid_type(
                    &content_param,
                    "one of a string or array of objects",
                    other,
                ))
            }
        }
        let content = content_start..self.text.len();
        if let Some(Value::Array(calls)) = calls {
            for call in calls {
                self.push_tool_call(call);
            }
        }
        self.text.push_str("<|im_end|>\n");

        if role == "user" {
            self.last_user = Some(content.clone());
        }
        self.last_any = content;
        Ok(())
    }

    fn push_part(&mut self, param: &str, part: &Value) -> Result<(), ApiError> {
        let Some(kind) = part.get("type") else {
            return Err(ApiError::missing(&format!("{param}.type")));
        };
        match kind.as_str() {
            Some(key @ ("text" | "refusal")) => {
                // A text part carries `text`, a refusal part `refusal`.
                match part.get(key) {
                    Some(Value::String(text)) => self.push_counted(text),
                    None | Some(Value::Null) => {
                        return Err(ApiError::missing(&format!("{param}.{key}")))
                    }
                    Some(other) => {
                        return Err(ApiError::invalid_type(
                            &format!("{param}.{key}"),
                            "a string",
                            other,
                        ))
                    }
                }
            }
            Some("image_url") => {
                // A marker rather than the URL: data URLs can be megabytes of base64.
                let url = part
                    .get("image_url")
                    .and_then(|image| image.get("url"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let digest = super::hash::Fnv64::new().write(url.as_bytes()).finish();
                self.text.push_str(&format!("[image {digest:016x}]"));
                self.tokens += IMAGE_TOKENS;
            }
            Some(_) => {
                // Audio and file parts: counted by their JSON size, a rough stand-in.
                let json = serde_json::to_string(part).unwrap_or_default();
                self.push_counted(&json);
            }
            None => {
                return Err(ApiError::invalid_type(
                    &format!("{param}.type"),
                    "a string",
                    kind,
                ))
            }
        }
        self.text.push('\n');
        Ok(())
    }

    fn push_tool_call(&mut self, call: &Value) {
        let function = call.get("function");
        for key in ["name", "arguments"] {
            if let Some(text) = function.and_then(|f| f.get(key)).and_then(Value::as_str) {
                self.push_counted(text);
                self.text.push('\n');
            }
        }
    }

    fn push_counted(&mut self, text: &str) {
        self.text.push_str(text);
        self.tokens += count_tokens(text);
    }

    fn finish(self) -> Prompt {
        Prompt {
            text: self.text,
            tokens: self.tokens + REPLY_PRIMING_TOKENS,
            last_user: self.last_user.unwrap_or(self.last_any),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error_of(body: Value) -> ApiError {
        match parse(&body) {
            Ok(request) => panic!("expected an error, got {request:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn counts_four_characters_a_token_rounded_up() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
        assert_eq!(count_tokens("éééé"), 1, "characters, not bytes");
    }

    #[test]
    fn prompt_tokens_are_content_plus_framing() {
        let request = parse(&json!({
            "model": "gpt-4.1-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there, world"}
            ]
        }))
        .unwrap();
        // 3 priming + (4 + ceil(9/4)=3) + (4 + ceil(18/4)=5)
        assert_eq!(request.prompt.tokens, 3 + 7 + 9);
        assert_eq!(request.prompt.last_user_text(), "Hello there, world");
        assert_eq!(request.choices, 1);
        assert_eq!(request.max_output_tokens, None);
    }

    #[test]
    fn key_order_does_not_change_the_prompt() {
        let a = parse(&json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        let b = parse(&json!({"messages": [{"content": "x", "role": "user"}], "model": "m"}));
        assert_eq!(a.unwrap().prompt, b.unwrap().prompt);
    }

    #[test]
    fn content_parts_and_images_are_counted() {
        let request = parse(&json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "abcdefgh"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            ]}]
        }))
        .unwrap();
        assert_eq!(request.prompt.tokens, 3 + 4 + 2 + IMAGE_TOKENS);
    }

    #[test]
    fn assistant_with_tool_calls_may_omit_content() {
        let request = parse(&json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
            ]
        }));
        assert!(request.is_ok(), "{request:?}");
    }

    #[test]
    fn output_limit_is_the_smaller_of_both_fields() {
        let request = parse(&json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 50, "max_completion_tokens": 20, "n": 3
        }))
        .unwrap();
        assert_eq!(request.max_output_tokens, Some(20));
        assert_eq!(request.choices, 3);
    }

    #[test]
    fn rejects_what_openai_rejects() {
        let user = json!([{"role": "user", "content": "x"}]);
        let cases = [
            (json!([1, 2]), None, "invalid_type"),
            (json!({"messages": user}), None, ""),
            (
                json!({"model": 4, "messages": user}),
                Some("model"),
                "invalid_type",
            ),
            (
                json!({"model": "m"}),
                Some("messages"),
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": []}),
                Some("messages"),
                "empty_array",
            ),
            (
                json!({"model": "m", "messages": "hi"}),
                Some("messages"),
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": ["hi"]}),
                Some("messages[0]"),
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                Some("messages[0].role"),
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
                Some("messages[0].role"),
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                Some("messages[0].content"),
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 3}]}),
                Some("messages[0].content"),
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                Some("messages[0].tool_call_id"),
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": user, "stream": true}),
                Some("stream"),
                "unsupported_value",
            ),
            (
                json!({"model": "m", "messages": user, "n": 0}),
                Some("n"),
                "integer_below_min_value",
            ),
            (
                json!({"model": "m", "messages": user, "n": 129}),
                Some("n"),
                "integer_above_max_value",
            ),
            (
                json!({"model": "m", "messages": user, "max_tokens": -5}),
                Some("max_tokens"),
                "integer_below_min_value",
            ),
            (
                json!({"model": "m", "messages": user, "max_completion_tokens": 1.5}),
                Some("max_completion_tokens"),
                "invalid_type",
            ),
        ];
        for (body, param, code) in cases {
            let error = error_of(body.clone());
            assert_eq!(error.status, 400, "{body}");
            assert_eq!(error.kind, "invalid_request_error", "{body}");
            if let Some(param) = param {
                assert_eq!(error.param.as_deref(), Some(param), "{body}");
            }
            if !code.is_empty() {
                assert_eq!(error.code, Some(code), "{body}");
            }
        }
    }
}
