//! Providers: OpenAI-compatible Chat Completions over HTTP (reqwest), and an
//! instant in-process provider for benchmarks.

use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::ports::{Completion, Provider, ProviderError};
use batchd_actors::route::limits::parse_rate_limit_headers;
use batchd_actors::task::Usage;
use serde_json::Value;

use crate::config::{MaxTokensField, ProviderConfig};

/// Longest wait a provider's rate-limit headers may ask for; longer is clamped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// An OpenAI-compatible endpoint (`{base_url}/chat/completions`).
pub struct OpenAiProvider {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
    timeout: Duration,
    max_tokens_field: MaxTokensField,
}

impl OpenAiProvider {
    /// A client for `base_url` (including `/v1`), with an optional bearer key.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .user_agent(concat!("batchd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(OpenAiProvider {
            client,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            timeout,
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
        })
    }

    /// From a provider's config section, environment overrides applied.
    pub fn from_config(c: &ProviderConfig, timeout: Duration) -> Result<Self, reqwest::Error> {
        let mut p = OpenAiProvider::new(&c.resolved_base_url(), c.resolved_api_key(), timeout)?;
        p.max_tokens_field = c.max_tokens_field;
        Ok(p)
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn complete(&self, request: &Value) -> Result<Completion, ProviderError> {
        let renamed;
        let body = match self.max_tokens_field {
            MaxTokensField::MaxCompletionTokens => request,
            MaxTokensField::MaxTokens => {
                renamed = with_max_tokens(request);
                &renamed
            }
        };
        let mut req = self.client.post(&self.url).json(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.map_err(|e| ProviderError::Transient {
            status: None,
            message: if e.is_timeout() {
                format!("no answer within {:?} from {}", self.timeout, self.url)
            } else {
                format!("request to {} failed: {e}", self.url)
            },
        })?;
        let status = resp.status();
        let limits = parse_rate_limit_headers(
            resp.headers()
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
            chrono::Utc::now(),
            MAX_RETRY_AFTER,
        );
        let body = resp.bytes().await.map_err(|e| ProviderError::Transient {
            status: Some(status.as_u16()),
            message: if e.is_timeout() {
                format!("no answer within {:?} from {}", self.timeout, self.url)
            } else {
                format!("reading the response body: {e}")
            },
        })?;
        if status.is_success() {
            let v: Value = serde_json::from_slice(&body).map_err(|e| ProviderError::Transient {
                status: Some(status.as_u16()),
                message: format!("unreadable response body: {e}"),
            })?;
            let mut completion = parse_completion(&v);
            completion.limits = limits;
            return Ok(completion);
        }
        let (message, kind) = error_message(&body);
        let code = status.as_u16();
        Err(match code {
            429 if kind.as_deref() == Some("insufficient_quota") => {
                ProviderError::QuotaExhausted { message }
            }
            429 => ProviderError::RateLimited { limits, message },
            408 | 409 | 500..=599 => ProviderError::Transient {
                status: Some(code),
                message,
            },
            _ => ProviderError::Rejected {
                status: code,
                message,
            },
        })
    }
}

/// The request with `max_completion_tokens` renamed `max_tokens` (unless the
/// body already sets `max_tokens`).
fn with_max_tokens(request: &Value) -> Value {
    let mut body = request.clone();
    if let Some(map) = body.as_object_mut() {
        if let Some(limit) = map.remove("max_completion_tokens") {
            map.entry("max_tokens").or_insert(limit);
        }
    }
    body
}

/// Reads the text, finish reason and usage of a chat completion.
pub fn parse_completion(v: &Value) -> Completion {
    let choice = &v["choices"][0];
    let u = &v["usage"];
    Completion {
        output: choice["message"]["content"].as_str().map(str::to_owned),
        finish_reason: choice["finish_reason"].as_str().map(str::to_owned),
        usage: Usage {
            input_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
            cached_input_tokens: u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
        },
        limits: Default::default(),
    }
}

/// The provider's error message and its error code (or type), from
/// OpenAI's `{"error": {"message", "type", "code"}}` body.
fn error_message(body: &[u8]) -> (String, Option<String>) {
    let v = serde_json::from_slice::<Value>(body).ok();
    let message = v
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            text.chars().take(300).collect()
        });
    let kind = v.as_ref().and_then(|v| {
        let e = &v["error"];
        e["code"]
            .as_str()
            .or_else(|| e["type"].as_str())
            .map(str::to_owned)
    });
    (message, kind)
}

/// Answers every request at once with a fixed completion: measures the
/// engine without any provider cost.
pub struct InstantProvider;

#[async_trait]
impl Provider for InstantProvider {
    async fn complete(&self, _request: &Value) -> Result<Completion, ProviderError> {
        Ok(Completion {
            output: Some("ok".into()),
            finish_reason: Some("stop".into()),
            usage: Usage {
                input_tokens: 100,
                cached_input_tokens: 0,
                output_tokens: 10,
            },
            limits: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_usage_including_cached_tokens() {
        let c = parse_completion(&json!({
            "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 812, "completion_tokens": 41, "prompt_tokens_details": {"cached_tokens": 768}}
        }));
        assert_eq!(c.output.as_deref(), Some("hi"));
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 812,
                cached_input_tokens: 768,
                output_tokens: 41
            }
        );
    }

    #[test]
    fn renames_the_output_limit_for_servers_that_want_max_tokens() {
        let r = with_max_tokens(&json!({"model": "m", "max_completion_tokens": 5}));
        assert_eq!(r, json!({"model": "m", "max_tokens": 5}));
        let r = with_max_tokens(&json!({"max_completion_tokens": 5, "max_tokens": 9}));
        assert_eq!(r, json!({"max_tokens": 9}));
    }

    #[test]
    fn error_message_prefers_openai_shape() {
        assert_eq!(
            error_message(br#"{"error":{"message":"bad model","code":"model_not_found"}}"#),
            ("bad model".to_owned(), Some("model_not_found".to_owned()))
        );
        assert_eq!(
            error_message(
                br#"{"error":{"message":"no credit","type":"insufficient_quota","code":null}}"#
            ),
            (
                "no credit".to_owned(),
                Some("insufficient_quota".to_owned())
            )
        );
        assert_eq!(error_message(b"plain"), ("plain".to_owned(), None));
    }
}
