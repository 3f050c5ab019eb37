//! OpenAI's Files and Batches APIs (`{base_url}/files`, `{base_url}/batches`):
//! the [`BatchApi`] the engine's provider jobs go through.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use batchd_actors::ports::{BatchApi, BatchJobStatus, ProviderError};
use batchd_actors::provider_jobs::{read_results, LineResult};
use bytes::Bytes;
use serde_json::{json, Value};

use super::{Answer, Endpoint, Http, ProviderBuildError};
use crate::config::ProviderConfig;

/// The largest output or error file read (a 50,000-line job's answers).
const MAX_FILE_BYTES: usize = 1024 * 1024 * 1024;

/// OpenAI's batch job API.
pub struct OpenAiBatchApi {
    http: Http,
    files: Endpoint,
    batches: Endpoint,
    api_key: Option<String>,
}

impl OpenAiBatchApi {
    /// A client for `base_url` (including `/v1`), with an optional bearer key.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ProviderBuildError> {
        Ok(OpenAiBatchApi {
            http: Http::new(base_url, api_key.as_deref(), timeout)?,
            files: Endpoint::new(base_url, "/files")?,
            batches: Endpoint::new(base_url, "/batches")?,
            api_key,
        })
    }

    /// From a provider's config section, environment overrides applied.
    pub fn from_config(c: &ProviderConfig, timeout: Duration) -> Result<Self, ProviderBuildError> {
        OpenAiBatchApi::new(&c.resolved_base_url(), c.resolved_api_key(), timeout)
    }

    fn url(endpoint: &Endpoint, tail: &str) -> reqwest::Url {
        let mut url = endpoint.url.clone();
        let path = format!("{}{tail}", url.path());
        url.set_path(&path);
        url
    }

    fn authed(&self, req: reqwest::RequestBuilder, endpoint: &Endpoint) -> reqwest::RequestBuilder {
        endpoint.authorize(req, self.api_key.as_deref(), |req, key| {
            req.bearer_auth(key)
        })
    }

    /// Sends and reads a 2xx answer, or the error it means.
    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        endpoint: &Endpoint,
        cap: usize,
    ) -> Result<Answer, ProviderError> {
        self.http
            .send_for_2xx(self.authed(req, endpoint), cap)
            .await
    }

    fn json(&self, answer: &Answer) -> Result<Value, ProviderError> {
        serde_json::from_slice(&answer.body).map_err(|e| ProviderError::Transient {
            status: Some(answer.status),
            message: format!("unreadable answer: {e}"),
        })
    }

    fn batch(&self, answer: &Answer) -> Result<BatchJobStatus, ProviderError> {
        batch_status(&self.json(answer)?).ok_or_else(|| ProviderError::Transient {
            status: Some(answer.status),
            message: "a batch object without id or status".into(),
        })
    }
}

impl OpenAiBatchApi {
    /// A file's content.
    pub async fn content(&self, file_id: &str) -> Result<Bytes, ProviderError> {
        let url = Self::url(&self.files, &format!("/{file_id}/content"));
        let answer = self
            .call(self.http.client.get(url), &self.files, MAX_FILE_BYTES)
            .await?;
        Ok(Bytes::from(answer.body))
    }
}

/// Reads OpenAI's batch object.
fn batch_status(v: &Value) -> Option<BatchJobStatus> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(BatchJobStatus {
        id: text("id")?,
        status: text("status")?,
        output_file_id: text("output_file_id"),
        error_file_id: text("error_file_id"),
        metadata: v.get("metadata").cloned().unwrap_or(Value::Null),
    })
}

#[async_trait]
impl BatchApi for OpenAiBatchApi {
    async fn upload(&self, filename: &str, jsonl: Bytes) -> Result<String, ProviderError> {
        let part = reqwest::multipart::Part::stream(jsonl)
            .file_name(filename.to_owned())
            .mime_str("application/jsonl")
            .map_err(|e| ProviderError::Rejected {
                status: 400,
                message: e.to_string(),
            })?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        let req = self
            .http
            .client
            .post(self.files.url.clone())
            .multipart(form);
        let answer = self
            .call(req, &self.files, super::MAX_RESPONSE_BYTES)
            .await?;
        self.json(&answer)?
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::Transient {
                status: Some(answer.status),
                message: "a file object without id".into(),
            })
    }

    async fn create(
        &self,
        input_file_id: &str,
        _jsonl: &Bytes,
        endpoint: &str,
        completion_window: &str,
        metadata: &Value,
    ) -> Result<BatchJobStatus, ProviderError> {
        let body = json!({
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": metadata,
        });
        let req = self.http.client.post(self.batches.url.clone()).json(&body);
        let answer = self
            .call(req, &self.batches, super::MAX_RESPONSE_BYTES)
            .await?;
        self.batch(&answer)
    }

    async fn recent(&self) -> Result<Vec<BatchJobStatus>, ProviderError> {
        let mut url = self.batches.url.clone();
        url.query_pairs_mut().append_pair("limit", "100");
        let req = self.http.client.get(url);
        let answer = self
            .call(req, &self.batches, super::MAX_RESPONSE_BYTES)
            .await?;
        let list = self.json(&answer)?;
        Ok(list
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(batch_status)
            .collect())
    }

    async fn retrieve(&self, batch_id: &str) -> Result<BatchJobStatus, ProviderError> {
        let url = Self::url(&self.batches, &format!("/{batch_id}"));
        let answer = self
            .call(
                self.http.client.get(url),
                &self.batches,
                super::MAX_RESPONSE_BYTES,
            )
            .await?;
        self.batch(&answer)
    }

    async fn cancel(&self, batch_id: &str) -> Result<BatchJobStatus, ProviderError> {
        let url = Self::url(&self.batches, &format!("/{batch_id}/cancel"));
        let answer = self
            .call(
                self.http.client.post(url),
                &self.batches,
                super::MAX_RESPONSE_BYTES,
            )
            .await?;
        self.batch(&answer)
    }

    async fn results(
        &self,
        batch: &BatchJobStatus,
    ) -> Result<HashMap<String, LineResult>, ProviderError> {
        let mut files = Vec::new();
        for id in [&batch.output_file_id, &batch.error_file_id]
            .into_iter()
            .flatten()
        {
            match self.content(id).await {
                Ok(bytes) => files.push(bytes),
                // Deleted after an earlier reading: nothing left to settle from it.
                Err(ProviderError::Rejected { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let slices: Vec<&[u8]> = files.iter().map(|b| b.as_ref()).collect();
        Ok(read_results(&slices))
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError> {
        let url = Self::url(&self.files, &format!("/{file_id}"));
        match self
            .call(
                self.http.client.delete(url),
                &self.files,
                super::MAX_RESPONSE_BYTES,
            )
            .await
        {
            Ok(_) | Err(ProviderError::Rejected { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
