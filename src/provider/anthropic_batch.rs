//! Anthropic's Message Batches API (`{base_url}/v1/messages/batches`): the
//! [`BatchApi`] the engine's provider jobs go through for a provider of
//! `kind = "anthropic"`.
//!
//! Anthropic has no files: nothing is uploaded ([`INLINE_INPUT`] stands
//! for the input), and the creation carries every request, each line's
//! chat request turned into a Messages request as on the realtime route
//! ([`super::anthropic::messages_request`]). Results are streamed from
//! the batch's results endpoint once it has `ended`, one per request:
//! `succeeded` is an answer (usage made inclusive), `errored` a failure
//! with the status its error type stands for, `expired` and `canceled` are
//! left out (unanswered: their tasks go back to their queue). Batches
//! carry no metadata, so [`BatchApi::recent`] finds nothing: see
//! docs/ARCHITECTURE.md for a crash between creation and its record.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::completion::parse_error_body;
use batchd_actors::ports::{BatchApi, BatchJobStatus, ProviderError};
use batchd_actors::provider_jobs::LineResult;
use bytes::Bytes;
use serde_json::Value;

use super::anthropic::{completion_of, messages_request, sdk_base, ANTHROPIC_VERSION};
use super::{Answer, Endpoint, Http, ProviderBuildError};
use crate::anthropic::{
    MessageBatch, MessageBatchCreate, MessageBatchRequest, MessageBatchResult,
    MessageBatchResultLine, ProcessingStatus,
};
use crate::config::ProviderConfig;

/// The input id of a job whose requests travel with its creation.
pub const INLINE_INPUT: &str = "inline";

/// The longest `custom_id` Anthropic takes.
pub const MAX_CUSTOM_ID_LEN: usize = 64;

/// The largest results body read (a 100,000-request batch's answers).
const MAX_RESULTS_BYTES: usize = 1024 * 1024 * 1024;

/// Anthropic's Message Batches API.
pub struct AnthropicBatchApi {
    http: Http,
    batches: Endpoint,
    api_key: Option<String>,
}

impl AnthropicBatchApi {
    /// A client for `base_url` (without `/v1`, as the Anthropic SDK takes
    /// it; a trailing `/v1` is tolerated), with an optional key.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ProviderBuildError> {
        Ok(AnthropicBatchApi {
            http: Http::new(base_url, api_key.as_deref(), timeout)?,
            batches: Endpoint::new(sdk_base(base_url), "/v1/messages/batches")?,
            api_key,
        })
    }

    /// From a provider's config section, environment overrides applied.
    pub fn from_config(c: &ProviderConfig, timeout: Duration) -> Result<Self, ProviderBuildError> {
        AnthropicBatchApi::new(&c.resolved_base_url(), c.resolved_api_key(), timeout)
    }

    fn url(&self, tail: &str) -> reqwest::Url {
        let mut url = self.batches.url.clone();
        let path = format!("{}{tail}", url.path());
        url.set_path(&path);
        url
    }

    fn headers(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = req.header("anthropic-version", ANTHROPIC_VERSION);
        self.batches
            .authorize(req, self.api_key.as_deref(), |req, key| {
                req.header("x-api-key", key)
            })
    }

    /// Sends and reads a 2xx answer, or the error it means.
    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        cap: usize,
    ) -> Result<Answer, ProviderError> {
        self.http.send_for_2xx(self.headers(req), cap).await
    }

    fn batch(&self, answer: &Answer) -> Result<BatchJobStatus, ProviderError> {
        serde_json::from_slice::<MessageBatch>(&answer.body)
            .map(batch_status)
            .map_err(|e| ProviderError::Transient {
                status: Some(answer.status),
                message: format!("an unreadable message_batch object: {e}"),
            })
    }
}

/// Anthropic's `message_batch` object in the port's words.
fn batch_status(b: MessageBatch) -> BatchJobStatus {
    let status = match b.processing_status {
        ProcessingStatus::InProgress => "in_progress",
        ProcessingStatus::Canceling => "cancelling",
        ProcessingStatus::Ended => "ended",
    };
    BatchJobStatus {
        id: b.id,
        status: status.to_owned(),
        output_file_id: None,
        error_file_id: None,
        metadata: Value::Null,
    }
}

/// A task id as a `custom_id` Anthropic takes (1-64 of `[A-Za-z0-9_-]`):
/// itself when short enough, else its first 31 characters, `_` and 128
/// bits of a stable hash of the whole id.
pub fn custom_id(task_id: &str) -> String {
    if task_id.len() <= MAX_CUSTOM_ID_LEN {
        return task_id.to_owned();
    }
    let fnv = |basis: u64| {
        task_id.bytes().fold(basis, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let head: String = task_id.chars().take(31).collect();
    format!(
        "{head}_{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}

/// The create body for a job's OpenAI batch input lines: one
/// `{custom_id, params}` per line.
pub fn create_body(jsonl: &[u8]) -> Result<MessageBatchCreate, String> {
    let mut requests = Vec::new();
    for (n, line) in String::from_utf8_lossy(jsonl)
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("input line {}: {e}", n + 1))?;
        let id = v["custom_id"]
            .as_str()
            .ok_or_else(|| format!("input line {} has no custom_id", n + 1))?;
        let params = messages_request(&v["body"]).map_err(|e| {
            format!(
                "input line {}: not expressible as a Messages request: {e}",
                n + 1
            )
        })?;
        requests.push(MessageBatchRequest {
            custom_id: custom_id(id),
            params,
        });
    }
    Ok(MessageBatchCreate { requests })
}

/// The HTTP status an Anthropic error type stands for.
fn error_status(kind: &str) -> u16 {
    match kind {
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "overloaded_error" => 529,
        _ => 400,
    }
}

/// Reads a results JSONL body by `custom_id`; `expired` and `canceled`
/// requests, and lines without a `custom_id`, are left out. A `succeeded`
/// line without a usable message is a transient failure.
pub fn read_results(body: &[u8]) -> HashMap<String, LineResult> {
    let mut out = HashMap::new();
    for line in String::from_utf8_lossy(body).lines() {
        let read = match serde_json::from_str::<MessageBatchResultLine>(line) {
            Ok(l) => (l.custom_id, line_result(l.result)),
            Err(e) => {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                match (v["custom_id"].as_str(), v["result"]["type"].as_str()) {
                    (Some(id), Some("succeeded")) => (
                        id.to_owned(),
                        Some(LineResult::from_answer(Err(format!(
                            "an unreadable succeeded result: {e}"
                        )))),
                    ),
                    _ => continue,
                }
            }
        };
        if let (id, Some(result)) = read {
            out.insert(id, result);
        }
    }
    out
}

/// One request's result in the port's words (`None`: unanswered).
fn line_result(result: MessageBatchResult) -> Option<LineResult> {
    match result {
        MessageBatchResult::Succeeded { message } => {
            Some(LineResult::from_answer(completion_of(&message)))
        }
        MessageBatchResult::Errored { error } => Some(LineResult::Failed {
            status: Some(error_status(&error.error.kind)),
            message: parse_error_body(serde_json::to_string(&error).unwrap_or_default().as_bytes())
                .1,
        }),
        MessageBatchResult::Canceled | MessageBatchResult::Expired => None,
    }
}

#[async_trait]
impl BatchApi for AnthropicBatchApi {
    fn custom_id(&self, task_id: &str) -> String {
        custom_id(task_id)
    }

    async fn upload(&self, _filename: &str, _jsonl: Bytes) -> Result<String, ProviderError> {
        Ok(INLINE_INPUT.to_owned())
    }

    async fn create(
        &self,
        _input_file_id: &str,
        jsonl: &Bytes,
        _endpoint: &str,
        _completion_window: &str,
        _metadata: &Value,
    ) -> Result<BatchJobStatus, ProviderError> {
        let body = create_body(jsonl).map_err(|message| ProviderError::Rejected {
            status: 400,
            message,
        })?;
        let req = self.http.client.post(self.batches.url.clone()).json(&body);
        let answer = self.call(req, super::MAX_RESPONSE_BYTES).await?;
        self.batch(&answer)
    }

    async fn recent(&self) -> Result<Vec<BatchJobStatus>, ProviderError> {
        // A Message Batch carries no tag to recognise a job's by.
        Ok(Vec::new())
    }

    async fn retrieve(&self, batch_id: &str) -> Result<BatchJobStatus, ProviderError> {
        let req = self.http.client.get(self.url(&format!("/{batch_id}")));
        let answer = self.call(req, super::MAX_RESPONSE_BYTES).await?;
        self.batch(&answer)
    }

    async fn cancel(&self, batch_id: &str) -> Result<BatchJobStatus, ProviderError> {
        let req = self
            .http
            .client
            .post(self.url(&format!("/{batch_id}/cancel")));
        let answer = self.call(req, super::MAX_RESPONSE_BYTES).await?;
        self.batch(&answer)
    }

    async fn results(
        &self,
        batch: &BatchJobStatus,
    ) -> Result<HashMap<String, LineResult>, ProviderError> {
        // The results endpoint under the configured base URL, not the
        // answer's `results_url`: the key goes to no other host.
        let req = self
            .http
            .client
            .get(self.url(&format!("/{}/results", batch.id)));
        match self.call(req, MAX_RESULTS_BYTES).await {
            Ok(answer) => Ok(read_results(&answer.body)),
            // Results no longer kept (29 days after creation): every
            // request counts as unanswered.
            Err(ProviderError::Rejected { status: 404, .. }) => Ok(HashMap::new()),
            Err(e) => Err(e),
        }
    }

    async fn delete_file(&self, _file_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn long_task_ids_get_distinct_custom_ids_anthropic_takes() {
        assert_eq!(custom_id("t_1"), "t_1");
        let (a, b) = ("a".repeat(100), format!("{}b", "a".repeat(99)));
        let (ca, cb) = (custom_id(&a), custom_id(&b));
        assert_ne!(ca, cb);
        assert_eq!(ca, custom_id(&a), "stable");
        for c in [&ca, &cb] {
            assert!(c.len() <= MAX_CUSTOM_ID_LEN, "{c}");
            assert!(c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
    }

    #[test]
    fn results_map_by_custom_id_and_leave_expired_and_canceled_out() {
        let body = br#"{"custom_id":"b","result":{"type":"succeeded","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":5,"cache_read_input_tokens":2,"cache_creation_input_tokens":0,"output_tokens":1}}}}
{"custom_id":"a","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}}}
{"custom_id":"o","result":{"type":"errored","error":{"type":"error","error":{"type":"overloaded_error","message":"busy"}}}}
{"custom_id":"c","result":{"type":"expired"}}
{"custom_id":"d","result":{"type":"canceled"}}
not json
"#;
        let r = read_results(body);
        let LineResult::Answered(c) = &r["b"] else {
            panic!("{:?}", r["b"]);
        };
        assert_eq!(c.output.as_deref(), Some("hi"));
        assert_eq!(c.usage.input_tokens, 7, "usage made inclusive");
        assert!(
            matches!(&r["a"], LineResult::Failed { status: Some(400), message } if message.contains("bad"))
        );
        assert!(matches!(
            &r["o"],
            LineResult::Failed {
                status: Some(529),
                ..
            }
        ));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn the_create_body_holds_one_messages_request_per_input_line() {
        let line = |id: &str| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "claude-3-5-haiku-latest", "messages": [
                       {"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "hi"}]}})
            .to_string()
        };
        let body =
            create_body(format!("{}\n{}\n", line("t1"), line(&"x".repeat(80))).as_bytes()).unwrap();
        let body = serde_json::to_value(body).unwrap();
        let requests = body["requests"].as_array().unwrap();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0]["custom_id"], "t1");
        assert_eq!(requests[1]["custom_id"], custom_id(&"x".repeat(80)));
        let params = &requests[0]["params"];
        assert_eq!(params["model"], "claude-3-5-haiku-latest");
        assert_eq!(params["system"][0]["text"], "Be brief.");
        assert!(params["max_tokens"].as_u64().unwrap() > 0);
        assert!(create_body(b"not json\n").is_err());
    }
}
