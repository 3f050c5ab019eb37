//! Reading a provider's answer: a chat completion body into a
//! [`Completion`], and an error body into the provider's error type and
//! message. Pure functions over bytes a provider controls, so they are
//! fuzzed (`fuzz/`) and never panic; a 200 that carries no usable answer
//! (an error body, no choices, a `null` content) is an `Err`, which the
//! caller treats as a transient failure, never as an empty success.

use serde_json::Value;

use crate::codec::{self, bounded, truncate, MAX_QUOTE_CHARS};
use crate::ports::Completion;
use crate::task::{Encoding, Usage};

/// The most of a provider's error message an outcome repeats.
pub const MAX_PROVIDER_MESSAGE_CHARS: usize = 300;

/// Reads a 200 answer of the Chat Completions API. The `Err` says why it is
/// not a usable answer.
pub fn parse_chat_completion(body: &[u8]) -> Result<Completion, String> {
    let v = codec::parse_body(body, Encoding::Json)
        .map_err(|e| format!("unreadable response body: {}", truncate(&e, 200)))?;
    let Value::Object(map) = &v else {
        return Err(format!(
            "the response body is {}, not a chat completion",
            codec::json_type_name(&v)
        ));
    };
    if let Some(error) = map.get("error").filter(|e| !e.is_null()) {
        let (kind, message) = error_parts(error);
        return Err(bounded(&format!(
            "the provider answered 200 with an error: {}",
            describe(kind.as_deref(), message.as_deref())
        )));
    }
    let choice = match map.get("choices") {
        Some(Value::Array(choices)) if !choices.is_empty() => &choices[0],
        _ => return Err("the response has no choices".into()),
    };
    let finish_reason = choice["finish_reason"].as_str().map(str::to_owned);
    let message = &choice["message"];
    let output = match (&message["content"], &message["refusal"]) {
        (Value::String(text), _) => text.clone(),
        // A refusal is the model's answer: retrying would only pay again.
        (Value::Null, Value::String(refusal)) => refusal.clone(),
        _ => {
            return Err(format!(
                "the response has no usable content (finish_reason {})",
                codec::quote(finish_reason.as_deref().unwrap_or("null"))
            ))
        }
    };
    let u = map.get("usage").unwrap_or(&Value::Null);
    Ok(Completion {
        output: Some(output),
        finish_reason,
        usage: read_usage(u),
        limits: Default::default(),
        service_tier: map
            .get("service_tier")
            .and_then(Value::as_str)
            .and_then(crate::task::ServiceTier::from_answer),
    })
}

/// Usage in either provider's words, made inclusive. OpenAI counts cached
/// tokens inside `prompt_tokens`; Anthropic's `input_tokens` leaves out
/// `cache_read_input_tokens` and `cache_creation_input_tokens`, which are added.
pub fn read_usage(u: &Value) -> Usage {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    if u.get("prompt_tokens").is_some() {
        return Usage {
            input_tokens: n(&u["prompt_tokens"]),
            cached_input_tokens: n(&u["prompt_tokens_details"]["cached_tokens"]),
            output_tokens: n(&u["completion_tokens"]),
            cache_write_input_tokens: 0,
        };
    }
    let (read, written) = (
        n(&u["cache_read_input_tokens"]),
        n(&u["cache_creation_input_tokens"]),
    );
    Usage {
        input_tokens: n(&u["input_tokens"])
            .saturating_add(read)
            .saturating_add(written),
        cached_input_tokens: read,
        output_tokens: n(&u["output_tokens"]),
        cache_write_input_tokens: written,
    }
}

/// Reads an error body (OpenAI's `{"error": {"message", "type", "code"}}`):
/// the error type (its `code`, else its `type`) and a bounded message that
/// says the type and the provider's message. A body of another shape is
/// quoted, shortened.
pub fn parse_error_body(body: &[u8]) -> (Option<String>, String) {
    let v = codec::parse_body(body, Encoding::Json).ok();
    if let Some(error) = v.as_ref().and_then(|v| v.get("error")) {
        let (kind, message) = error_parts(error);
        if kind.is_some() || message.is_some() {
            return (kind.clone(), describe(kind.as_deref(), message.as_deref()));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let message = if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        truncate(text, MAX_PROVIDER_MESSAGE_CHARS)
    };
    (None, message)
}

fn error_parts(error: &Value) -> (Option<String>, Option<String>) {
    match error {
        Value::String(message) => (None, Some(message.clone())),
        error => {
            let kind = error["code"]
                .as_str()
                .or_else(|| error["type"].as_str())
                .map(|k| truncate(k, MAX_QUOTE_CHARS));
            let message = error["message"].as_str().map(str::to_owned);
            (kind, message)
        }
    }
}

fn describe(kind: Option<&str>, message: Option<&str>) -> String {
    let message = truncate(
        message.unwrap_or("(no message)").trim(),
        MAX_PROVIDER_MESSAGE_CHARS,
    );
    match kind {
        Some(kind) => format!("{kind}: {message}"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_finish_reason_and_usage_including_cached_tokens() {
        let c = parse_chat_completion(
            br#"{"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 812, "completion_tokens": 41, "prompt_tokens_details": {"cached_tokens": 768}}}"#,
        )
        .unwrap();
        assert_eq!(c.output.as_deref(), Some("hi"));
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 812,
                cached_input_tokens: 768,
                output_tokens: 41,
                cache_write_input_tokens: 0,
            }
        );
    }

    #[test]
    fn anthropic_additive_usage_is_made_inclusive() {
        let u = read_usage(&serde_json::json!({
            "input_tokens": 10, "cache_read_input_tokens": 700,
            "cache_creation_input_tokens": 90, "output_tokens": 41
        }));
        assert_eq!(
            u,
            Usage {
                input_tokens: 800,
                cached_input_tokens: 700,
                output_tokens: 41,
                cache_write_input_tokens: 90,
            }
        );
    }

    #[test]
    fn a_200_without_a_usable_answer_is_an_error_not_an_empty_success() {
        let cases: [(&[u8], &str); 8] = [
            (
                br#"{"error": {"message": "overloaded", "type": "server_error"}}"#,
                "answered 200 with an error: server_error: overloaded",
            ),
            (
                br#"{"choices": [{"message": {"content": null}, "finish_reason": "stop"}]}"#,
                "no usable content",
            ),
            (br#"{"choices": [{"message": {}}]}"#, "no usable content"),
            (br#"{"choices": []}"#, "no choices"),
            (br#"{"object": "chat.completion"}"#, "no choices"),
            (b"[]", "not a chat completion"),
            (b"<html>oops</html>", "unreadable response body"),
            (b"", "unreadable response body"),
        ];
        for (body, expected) in cases {
            let e = parse_chat_completion(body).expect_err(expected);
            assert!(e.contains(expected), "{e:?} lacks {expected:?}");
        }
        let refusal = parse_chat_completion(
            br#"{"choices": [{"message": {"content": null, "refusal": "no"}}]}"#,
        )
        .unwrap();
        assert_eq!(refusal.output.as_deref(), Some("no"));
    }

    #[test]
    fn error_bodies_give_type_and_message_only() {
        assert_eq!(
            parse_error_body(br#"{"error":{"message":"bad model","code":"model_not_found"}}"#),
            (
                Some("model_not_found".to_owned()),
                "model_not_found: bad model".to_owned()
            )
        );
        assert_eq!(
            parse_error_body(
                br#"{"error":{"message":"no credit","type":"insufficient_quota","code":null}}"#
            ),
            (
                Some("insufficient_quota".to_owned()),
                "insufficient_quota: no credit".to_owned()
            )
        );
        assert_eq!(parse_error_body(b"plain"), (None, "plain".to_owned()));
        let long = "z".repeat(10_000);
        let (_, m) = parse_error_body(long.as_bytes());
        assert_eq!(m.chars().count(), MAX_PROVIDER_MESSAGE_CHARS);
    }
}
