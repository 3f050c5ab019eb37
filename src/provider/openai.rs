//! OpenAI-compatible Chat Completions (`{base_url}/chat/completions`).

use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::completion::{parse_chat_completion, parse_error_body};
use batchd_actors::ports::{Completion, Provider, ProviderError};
use serde_json::Value;

use super::{status_error, Endpoint, Http, ProviderBuildError};
use crate::config::{MaxTokensField, ProviderConfig};

/// An OpenAI-compatible endpoint (`{base_url}/chat/completions`).
pub struct OpenAiProvider {
    http: Http,
    endpoint: Endpoint,
    api_key: Option<String>,
    max_tokens_field: MaxTokensField,
}

impl OpenAiProvider {
    /// A client for `base_url` (including `/v1`; a query string is kept),
    /// with an optional bearer key.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ProviderBuildError> {
        Ok(OpenAiProvider {
            http: Http::new(base_url, api_key.as_deref(), timeout)?,
            endpoint: Endpoint::new(base_url, "/chat/completions")?,
            api_key,
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
        })
    }

    /// From a provider's config section, environment overrides applied.
    pub fn from_config(c: &ProviderConfig, timeout: Duration) -> Result<Self, ProviderBuildError> {
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
        let req = self.endpoint.authorize(
            self.http.client.post(self.endpoint.url.clone()).json(body),
            self.api_key.as_deref(),
            |req, key| req.bearer_auth(key),
        );
        let answer = self.http.send(req).await?;
        let code = answer.status;
        if (200..300).contains(&code) {
            // A 200 without a usable answer is a transient failure.
            let mut completion = parse_chat_completion(&answer.body).map_err(|message| {
                ProviderError::Transient {
                    status: Some(code),
                    message: self.http.scrubber.scrub(&message),
                }
            })?;
            completion.limits = answer.limits;
            return Ok(completion);
        }
        let (kind, message) = parse_error_body(&answer.body);
        let message = self.http.scrubber.scrub(&message);
        if code == 429 && kind.as_deref() == Some("insufficient_quota") {
            return Err(ProviderError::QuotaExhausted { message });
        }
        if code == 429 && is_flex(request) && kind.as_deref() == Some("resource_unavailable") {
            return Err(ProviderError::FlexUnavailable { message });
        }
        Err(status_error(code, answer.limits, message))
    }
}

/// True for a request that asks for the flex service tier.
fn is_flex(request: &Value) -> bool {
    request.get("service_tier").and_then(Value::as_str) == Some("flex")
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renames_the_output_limit_for_servers_that_want_max_tokens() {
        let r = with_max_tokens(&json!({"model": "m", "max_completion_tokens": 5}));
        assert_eq!(r, json!({"model": "m", "max_tokens": 5}));
        let r = with_max_tokens(&json!({"max_completion_tokens": 5, "max_tokens": 9}));
        assert_eq!(r, json!({"max_tokens": 9}));
    }

    #[test]
    fn the_request_url_keeps_a_query_and_no_secret_reaches_a_message() {
        let p = OpenAiProvider::new(
            "http://user:pa55word@127.0.0.1:9/v1/?api-key=qu3ry-key",
            Some("sk-canary-key".into()),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(p.endpoint.url.path(), "/v1/chat/completions");
        assert_eq!(p.endpoint.url.username(), "");
        assert_eq!(p.endpoint.basic, Some(("user".into(), "pa55word".into())));
        assert_eq!(p.endpoint.url.query(), Some("api-key=qu3ry-key"));
        let scrubbed = p
            .http
            .scrubber
            .scrub("key sk-canary-key, password pa55word, query qu3ry-key");
        assert_eq!(scrubbed, "key ***, password ***, query ***");
    }

    #[tokio::test]
    async fn a_connection_error_names_no_url() {
        let p = OpenAiProvider::new(
            "http://user:pa55word@127.0.0.1:9/v1?api-key=qu3ry-key",
            Some("sk-canary-key".into()),
            Duration::from_secs(2),
        )
        .unwrap();
        let e = p.complete(&json!({"model": "m"})).await.unwrap_err();
        let text = e.to_string();
        for secret in ["pa55word", "qu3ry-key", "sk-canary-key", "127.0.0.1"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            matches!(e, ProviderError::Transient { status: None, .. }),
            "{e}"
        );
    }
}
