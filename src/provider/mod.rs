//! Providers over HTTP (reqwest): OpenAI-compatible Chat Completions
//! ([`OpenAiProvider`]) and Anthropic Messages ([`AnthropicProvider`]), both
//! fed the engine's chat request; and an instant in-process provider for
//! benchmarks.
//!
//! Layout: `openai` and `anthropic` hold one adapter each; this module holds
//! what they share: the HTTP client, the capped body read, the rate-limit
//! headers and the scrubbing of secrets out of every message.

mod anthropic;
mod anthropic_batch;
mod openai;
mod openai_batch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::codec::{truncate, MAX_HEADER_BYTES};
use batchd_actors::completion::MAX_PROVIDER_MESSAGE_CHARS;
use batchd_actors::ports::{Completion, Provider, ProviderError};
use batchd_actors::route::limits::{parse_rate_limit_headers, RateLimitInfo};
use batchd_actors::task::Usage;
use serde_json::Value;

pub use anthropic::{AnthropicProvider, ANTHROPIC_VERSION, DEFAULT_MAX_TOKENS};
pub use anthropic_batch::AnthropicBatchApi;
pub use openai::OpenAiProvider;
pub use openai_batch::OpenAiBatchApi;

use crate::config::{ProviderConfig, ProviderKind};
use crate::secrets::{percent_decode, redact_url, url_secrets, Scrubber};

/// Longest wait a provider's rate-limit headers may ask for; longer is clamped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The largest response body read; a larger one is a transient failure.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

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

/// The adapter a provider's `kind` names, from its config section
/// (environment overrides applied).
pub fn from_config(
    c: &ProviderConfig,
    timeout: Duration,
) -> Result<Arc<dyn Provider>, ProviderBuildError> {
    Ok(match c.kind {
        ProviderKind::Openai => Arc::new(OpenAiProvider::from_config(c, timeout)?),
        ProviderKind::Anthropic => Arc::new(AnthropicProvider::from_config(c, timeout)?),
    })
}

/// The batch job API a provider's `kind` names (OpenAI's Files and
/// Batches, or Anthropic's Message Batches).
pub fn batch_api_from_config(
    c: &ProviderConfig,
    timeout: Duration,
) -> Result<Arc<dyn batchd_actors::ports::BatchApi>, ProviderBuildError> {
    Ok(match c.kind {
        ProviderKind::Openai => Arc::new(OpenAiBatchApi::from_config(c, timeout)?),
        ProviderKind::Anthropic => Arc::new(AnthropicBatchApi::from_config(c, timeout)?),
    })
}

/// What both adapters share: the client, its timeout and the secrets that
/// never reach a message.
struct Http {
    client: reqwest::Client,
    timeout: Duration,
    /// The key and the URL's userinfo and query values.
    scrubber: Scrubber,
}

/// An endpoint URL with its userinfo taken out (it travels as a header,
/// never in a URL a library may print).
struct Endpoint {
    url: reqwest::Url,
    /// The base URL's userinfo, decoded.
    basic: Option<(String, String)>,
}

impl Endpoint {
    /// `req` carrying the API key as `with_key` sends it; without a key, the
    /// base URL's userinfo as basic auth; without either, as it is.
    fn authorize(
        &self,
        req: reqwest::RequestBuilder,
        key: Option<&str>,
        with_key: impl FnOnce(reqwest::RequestBuilder, &str) -> reqwest::RequestBuilder,
    ) -> reqwest::RequestBuilder {
        match (key, &self.basic) {
            (Some(key), _) => with_key(req, key),
            (None, Some((user, password))) => req.basic_auth(user, Some(password)),
            (None, None) => req,
        }
    }

    /// `base_url` (a query string is kept) with `path` appended to its path.
    fn new(base_url: &str, path: &str) -> Result<Self, ProviderBuildError> {
        let mut url = reqwest::Url::parse(base_url).map_err(|e| ProviderBuildError::BadUrl {
            url: redact_url(base_url),
            message: e.to_string(),
        })?;
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        let basic = (!url.username().is_empty()).then(|| {
            (
                percent_decode(url.username()),
                percent_decode(url.password().unwrap_or_default()),
            )
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Endpoint { url, basic })
    }
}

/// A response read within the caps: status, rate-limit headers, body.
struct Answer {
    status: u16,
    limits: RateLimitInfo,
    body: Vec<u8>,
}

impl Http {
    fn new(
        base_url: &str,
        api_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ProviderBuildError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .user_agent(concat!("batchd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let scrubber = Scrubber::new(
            url_secrets(base_url)
                .into_iter()
                .chain(api_key.map(str::to_owned)),
        );
        Ok(Http {
            client,
            timeout,
            scrubber,
        })
    }

    /// Sends `req` and reads the answer; a transport failure is transient.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer, ProviderError> {
        self.send_capped(req, MAX_RESPONSE_BYTES).await
    }

    /// [`Http::send`] with a body cap of `cap` bytes.
    async fn send_capped(
        &self,
        req: reqwest::RequestBuilder,
        cap: usize,
    ) -> Result<Answer, ProviderError> {
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
        let status = resp.status().as_u16();
        let limits = parse_rate_limit_headers(
            resp.headers()
                .iter()
                .filter(|(_, value)| value.len() <= MAX_HEADER_BYTES)
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
            chrono::Utc::now(),
            MAX_RETRY_AFTER,
        );
        let body = self.read_body(resp, cap).await?;
        Ok(Answer {
            status,
            limits,
            body,
        })
    }

    /// [`Http::send_capped`] that reads a non-2xx answer as the error it
    /// means (its message scrubbed).
    async fn send_for_2xx(
        &self,
        req: reqwest::RequestBuilder,
        cap: usize,
    ) -> Result<Answer, ProviderError> {
        let answer = self.send_capped(req, cap).await?;
        if (200..300).contains(&answer.status) {
            return Ok(answer);
        }
        let (_, message) = batchd_actors::completion::parse_error_body(&answer.body);
        Err(status_error(
            answer.status,
            answer.limits,
            self.scrubber.scrub(&message),
        ))
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

    /// Reads the body, at most `cap` bytes of it.
    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        cap: usize,
    ) -> Result<Vec<u8>, ProviderError> {
        let status = Some(resp.status().as_u16());
        let too_big = || ProviderError::Transient {
            status,
            message: format!("the response body exceeds {cap} bytes"),
        };
        let declared = resp.content_length().unwrap_or(0);
        if declared > cap as u64 {
            return Err(too_big());
        }
        let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > cap {
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

/// A non-2xx status as the engine reads it: 429 pauses the route; 408, 409
/// and 5xx are transient; any other status rejects the request.
fn status_error(code: u16, limits: RateLimitInfo, message: String) -> ProviderError {
    match code {
        429 => ProviderError::RateLimited { limits, message },
        408 | 409 | 500..=599 => ProviderError::Transient {
            status: Some(code),
            message,
        },
        _ => ProviderError::Rejected {
            status: code,
            message,
        },
    }
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
            service_tier: None,
        })
    }
}
