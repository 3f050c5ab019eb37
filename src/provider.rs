//! Providers: OpenAI-compatible Chat Completions over HTTP (reqwest), and an
//! instant in-process provider for benchmarks.

use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::ports::{Completion, Provider, ProviderError};
use batchd_actors::route::limits::parse_rate_limit_headers;
use batchd_actors::task::Usage;
use serde_json::Value;

use batchd_actors::codec::{truncate, MAX_HEADER_BYTES};
use batchd_actors::completion::{
    parse_chat_completion, parse_error_body, MAX_PROVIDER_MESSAGE_CHARS,
};

use crate::config::{MaxTokensField, ProviderConfig};
use crate::secrets::{percent_decode, redact_url, url_secrets, Scrubber};

/// Longest wait a provider's rate-limit headers may ask for; longer is clamped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The largest response body read; a larger one is a transient failure.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// An OpenAI-compatible endpoint (`{base_url}/chat/completions`).
pub struct OpenAiProvider {
    client: reqwest::Client,
    url: reqwest::Url,
    api_key: Option<String>,
    /// The base URL's userinfo, sent as Basic auth when there is no key.
    basic: Option<(String, String)>,
    timeout: Duration,
    max_tokens_field: MaxTokensField,
    /// The key and the URL's userinfo and query values: never in a message.
    scrubber: Scrubber,
}

/// Errors building a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderBuildError {
    /// The base URL does not parse.
    #[error("base URL {url} is not a URL: {message}")]
    BadUrl {
        /// The URL, redacted.
        url: String,
        /// Why.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl OpenAiProvider {
    /// A client for `base_url` (including `/v1`; a query string is kept),
    /// with an optional bearer key.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ProviderBuildError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .user_agent(concat!("batchd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut url = reqwest::Url::parse(base_url).map_err(|e| ProviderBuildError::BadUrl {
            url: redact_url(base_url),
            message: e.to_string(),
        })?;
        let path = format!("{}/chat/completions", url.path().trim_end_matches('/'));
        url.set_path(&path);
        // Userinfo travels as a header, never in the URL a library may print.
        let basic = (!url.username().is_empty()).then(|| {
            (
                percent_decode(url.username()),
                percent_decode(url.password().unwrap_or_default()),
            )
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let scrubber = Scrubber::new(url_secrets(base_url).into_iter().chain(api_key.clone()));
        Ok(OpenAiProvider {
            client,
            url,
            api_key,
            basic,
            timeout,
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
            scrubber,
        })
    }

    /// From a provider's config section, environment overrides applied.
    pub fn from_config(c: &ProviderConfig, timeout: Duration) -> Result<Self, ProviderBuildError> {
        let mut p = OpenAiProvider::new(&c.resolved_base_url(), c.resolved_api_key(), timeout)?;
        p.max_tokens_field = c.max_tokens_field;
        Ok(p)
    }

    /// A transport error as a message: what failed and why, never the URL.
    fn transport_error(&self, e: reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {:?}", self.timeout);
        }
        let e = e.without_url();
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        truncate(&self.scrubber.scrub(&message), MAX_PROVIDER_MESSAGE_CHARS)
    }

    /// Reads the body, at most [`MAX_RESPONSE_BYTES`] of it.
    async fn read_body(&self, mut resp: reqwest::Response) -> Result<Vec<u8>, ProviderError> {
        let status = Some(resp.status().as_u16());
        let too_big = || ProviderError::Transient {
            status,
            message: format!("the response body exceeds {MAX_RESPONSE_BYTES} bytes"),
        };
        let declared = resp.content_length().unwrap_or(0);
        if declared > MAX_RESPONSE_BYTES as u64 {
            return Err(too_big());
        }
        let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(too_big());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(ProviderError::Transient {
                        status,
                        message: format!("reading the response body: {}", self.transport_error(e)),
                    })
                }
            }
        }
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
        let mut req = self.client.post(self.url.clone()).json(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        } else if let Some((user, password)) = &self.basic {
            req = req.basic_auth(user, Some(password));
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                ProviderError::Timeout {
                    message: self.transport_error(e),
                }
            } else {
                ProviderError::Transient {
                    status: None,
                    message: self.transport_error(e),
                }
            }
        })?;
        let status = resp.status();
        let limits = parse_rate_limit_headers(
            resp.headers()
                .iter()
                .filter(|(_, value)| value.len() <= MAX_HEADER_BYTES)
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
            chrono::Utc::now(),
            MAX_RETRY_AFTER,
        );
        let body = self.read_body(resp).await?;
        let code = status.as_u16();
        if status.is_success() {
            // A 200 without a usable answer is a transient failure.
            let mut completion =
                parse_chat_completion(&body).map_err(|message| ProviderError::Transient {
                    status: Some(code),
                    message: self.scrubber.scrub(&message),
                })?;
            completion.limits = limits;
            return Ok(completion);
        }
        let (kind, message) = parse_error_body(&body);
        let message = self.scrubber.scrub(&message);
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
                ..Usage::default()
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
        assert_eq!(p.url.path(), "/v1/chat/completions");
        assert_eq!(p.url.username(), "");
        assert_eq!(p.basic, Some(("user".into(), "pa55word".into())));
        assert_eq!(p.url.query(), Some("api-key=qu3ry-key"));
        let scrubbed = p
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
