//! Anthropic's Message Batches API, simulated: a batch of Messages requests
//! is created in one call, is `in_progress` on the simulator's clock, then
//! `ended` with one result per request.
//!
//! - `POST /v1/messages/batches` (`{"requests": [{"custom_id", "params"}]}`,
//!   the headers of `POST /v1/messages`), `GET /v1/messages/batches`
//!   (newest first, `limit`, `after_id`), `GET
//!   /v1/messages/batches/{id}`, `GET /v1/messages/batches/{id}/results`
//!   (JSONL), `POST /v1/messages/batches/{id}/cancel`.
//!
//! A batch is `in_progress` until the configured batch duration
//! ([`super::SimConfig::batch_duration`]) has passed, then `ended`;
//! cancelling makes it `canceling`, then `ended` at the next look with
//! every request `canceled`. Requests are checked when the batch is
//! created (`custom_id` of 1-64 `[A-Za-z0-9_-]`, unique; at most 100,000
//! of them; `params` an object); their `params` are validated when they
//! are answered, as Anthropic does: an invalid one is an `errored` result.
//! The same test hooks as OpenAI's batches apply
//! ([`super::BatchFaults`]): `expire_after_lines` answers the first N
//! requests and leaves the rest `expired`, `failing_custom_ids` makes
//! those requests `errored`. Answered requests are billed at the batch
//! rate in [`super::SimServer::batch_bill`] and counted in the same
//! creations counter. Results come in an order of their own (clients must
//! map them by `custom_id`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::api_error::ApiError;
use super::batches::BatchFaults;
use super::completion;
use super::hash::mix;
use super::messages::{self, status_error, Api};
use super::service::{api_error_response, invalid_url, json_response, lock, Shared};
use super::SimBill;
use crate::anthropic::{
    ErrorResponse, MessageBatch, MessageBatchResult, MessageBatchResultLine, ProcessingStatus,
    RequestCounts,
};

/// Anthropic's limit on the requests of one batch.
pub const MAX_MESSAGE_BATCH_REQUESTS: usize = 100_000;
/// Anthropic's limit on a `custom_id`'s length.
pub const MAX_CUSTOM_ID_LEN: usize = 64;

/// One request of a batch.
struct Request {
    custom_id: String,
    params: Value,
}

/// One Message Batch as the simulator keeps it.
pub(crate) struct SimMessageBatch {
    id: String,
    created: Instant,
    created_at: DateTime<Utc>,
    duration: Duration,
    faults: BatchFaults,
    requests: Vec<Request>,
    status: ProcessingStatus,
    cancel_initiated_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    /// The result lines, once ended.
    results: Vec<MessageBatchResultLine>,
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/v1/messages/batches",
            post(create).get(list).fallback(invalid_url),
        )
        .route(
            "/v1/messages/batches/{id}",
            get(retrieve).fallback(invalid_url),
        )
        .route(
            "/v1/messages/batches/{id}/results",
            get(results).fallback(invalid_url),
        )
        .route(
            "/v1/messages/batches/{id}/cancel",
            post(cancel).fallback(invalid_url),
        )
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn error(status: StatusCode, message: String) -> Response {
    api_error_response(&status_error(status, message), Api::Anthropic)
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("message_batch_id: no Message Batch '{id}'"),
    )
}

/// `http://` and the `Host` the client used: where `results_url` points.
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn valid_custom_id(id: &str) -> bool {
    (1..=MAX_CUSTOM_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads a create body: its requests, or why it is refused (a 400).
fn read_requests(body: &[u8]) -> Result<Vec<Request>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let Some(list) = v.get("requests").and_then(Value::as_array) else {
        return Err("requests: Field required".into());
    };
    if list.is_empty() {
        return Err("requests: at least one request is required".into());
    }
    if list.len() > MAX_MESSAGE_BATCH_REQUESTS {
        return Err(format!(
            "requests: at most {MAX_MESSAGE_BATCH_REQUESTS} requests in a batch"
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let Some(custom_id) = r.get("custom_id").and_then(Value::as_str) else {
            return Err(format!("requests.{i}.custom_id: Field required"));
        };
        if !valid_custom_id(custom_id) {
            return Err(format!(
                "requests.{i}.custom_id: must be 1-{MAX_CUSTOM_ID_LEN} characters of [a-zA-Z0-9_-]"
            ));
        }
        if !seen.insert(custom_id) {
            return Err(format!(
                "requests.{i}.custom_id: '{custom_id}' is used by more than one request"
            ));
        }
        let Some(params) = r.get("params").filter(|p| p.is_object()) else {
            return Err(format!("requests.{i}.params: Field required"));
        };
        out.push(Request {
            custom_id: custom_id.to_owned(),
            params: params.clone(),
        });
    }
    Ok(out)
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = messages::check_headers(&headers) {
        return api_error_response(&e, Api::Anthropic);
    }
    let requests = match read_requests(&body) {
        Ok(r) => r,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let duration = shared.batch_duration();
    let mut store = lock(&shared.batches);
    let id = store.id("msgbatch_", shared.id_salt());
    let faults = store.faults();
    let batch = SimMessageBatch {
        id: id.clone(),
        created: Instant::now(),
        created_at: Utc::now(),
        duration,
        faults,
        requests,
        status: ProcessingStatus::InProgress,
        cancel_initiated_at: None,
        ended_at: None,
        results: Vec::new(),
    };
    let object = batch_object(&batch, &origin(&headers));
    store.message_batches.insert(id, batch);
    shared.batch_created();
    json_response(StatusCode::OK, &object)
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after_id: Option<String>,
}

/// `GET /v1/messages/batches`: newest first, at most `limit` (default 20,
/// 1 to 1000), after `after_id` when given.
async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(e) = messages::check_headers(&headers) {
        return api_error_response(&e, Api::Anthropic);
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let mut store = lock(&shared.batches);
    let mut ids: Vec<(Instant, String)> = store
        .message_batches
        .values()
        .map(|b| (b.created, b.id.clone()))
        .collect();
    ids.sort_by(|a, b| b.cmp(a));
    let start = q
        .after_id
        .as_ref()
        .and_then(|after| ids.iter().position(|(_, id)| id == after))
        .map_or(0, |p| p + 1);
    let now = Instant::now();
    let page: Vec<String> = ids
        .iter()
        .skip(start)
        .take(limit)
        .map(|(_, id)| id.clone())
        .collect();
    let mut data = Vec::new();
    for id in &page {
        advance(&shared, &mut store, id, now);
        if let Some(b) = store.message_batches.get(id) {
            data.push(batch_object(b, &origin(&headers)));
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "data": data,
            "has_more": ids.len() > start + page.len(),
            "first_id": page.first(),
            "last_id": page.last(),
        }),
    )
}

/// Checks the headers, brings batch `id` up to date and answers with `f`
/// of it (or a 404).
fn with_batch(
    shared: &Shared,
    headers: &HeaderMap,
    id: &str,
    f: impl FnOnce(&mut SimMessageBatch) -> Response,
) -> Response {
    if let Err(e) = messages::check_headers(headers) {
        return api_error_response(&e, Api::Anthropic);
    }
    let mut store = lock(&shared.batches);
    advance(shared, &mut store, id, Instant::now());
    match store.message_batches.get_mut(id) {
        Some(b) => f(b),
        None => not_found(id),
    }
}

async fn retrieve(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let origin = origin(&headers);
    with_batch(&shared, &headers, &id, |b| {
        json_response(StatusCode::OK, &batch_object(b, &origin))
    })
}

async fn results(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_batch(&shared, &headers, &id, |b| {
        if b.status != ProcessingStatus::Ended {
            return error(
                StatusCode::BAD_REQUEST,
                format!("Message Batch '{id}' has not ended; its results are not available yet"),
            );
        }
        let mut bytes = Vec::new();
        for line in &b.results {
            if let Ok(text) = serde_json::to_vec(line) {
                bytes.extend_from_slice(&text);
                bytes.push(b'\n');
            }
        }
        let mut response = Response::new(axum::body::Body::from(bytes));
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/x-jsonl"),
        );
        response
    })
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let origin = origin(&headers);
    with_batch(&shared, &headers, &id, |b| {
        if b.status == ProcessingStatus::InProgress {
            b.status = ProcessingStatus::Canceling;
            b.cancel_initiated_at = Some(Utc::now());
        }
        json_response(StatusCode::OK, &batch_object(b, &origin))
    })
}

/// Moves a batch to the status its age gives; answers its requests once
/// when it ends.
fn advance(shared: &Shared, store: &mut super::batches::BatchStore, id: &str, now: Instant) {
    let Some(b) = store.message_batches.get_mut(id) else {
        return;
    };
    match b.status {
        ProcessingStatus::Ended => return,
        ProcessingStatus::Canceling => {
            b.results = b
                .requests
                .iter()
                .map(|r| MessageBatchResultLine {
                    custom_id: r.custom_id.clone(),
                    result: MessageBatchResult::Canceled,
                })
                .collect();
        }
        ProcessingStatus::InProgress => {
            if now.saturating_duration_since(b.created) < b.duration {
                return;
            }
            b.results = answer_requests(shared, b);
        }
    }
    b.status = ProcessingStatus::Ended;
    b.ended_at = Some(Utc::now());
}

/// One result per request, not in input order.
fn answer_requests(shared: &Shared, b: &SimMessageBatch) -> Vec<MessageBatchResultLine> {
    let answered = b.faults.expire_after_lines.unwrap_or(usize::MAX);
    let salt = shared.id_salt();
    let mut out = Vec::with_capacity(b.requests.len());
    for (n, r) in b.requests.iter().enumerate() {
        let result = if n >= answered {
            MessageBatchResult::Expired
        } else if b.faults.failing_custom_ids.contains(&r.custom_id) {
            errored(&status_error(
                StatusCode::BAD_REQUEST,
                "The request was refused by the simulator (a failing custom_id).".into(),
            ))
        } else {
            match messages::parse(&r.params) {
                Err(e) => errored(&e),
                Ok(parsed) => {
                    let request = parsed.chat;
                    let generated = completion::generate(&request);
                    let prompt = request.prompt.tokens;
                    let (cached, written) = shared.batch_line_cache(
                        Api::Anthropic,
                        &request,
                        parsed.cache_prefix.as_deref(),
                    );
                    shared.charge_batch(
                        &request.model,
                        SimBill::tokens(prompt, cached, generated.completion_tokens, written),
                    );
                    let seq = mix(salt ^ (n as u64) ^ mix(b.created_at.timestamp() as u64));
                    let message = messages::answer(
                        format!("msg_{:024x}", seq as u128 | 1 << 90),
                        &request.model,
                        generated,
                        prompt,
                        cached,
                        written,
                    );
                    MessageBatchResult::Succeeded { message }
                }
            }
        };
        out.push(MessageBatchResultLine {
            custom_id: r.custom_id.clone(),
            result,
        });
    }
    // Not in input order: a client must map results by custom_id.
    out.reverse();
    out
}

/// An `errored` result with Anthropic's error body.
fn errored(e: &ApiError) -> MessageBatchResult {
    MessageBatchResult::Errored {
        error: ErrorResponse::for_status(e.status.as_u16(), e.message.clone()),
    }
}

/// Anthropic's `message_batch` object.
fn batch_object(b: &SimMessageBatch, origin: &str) -> MessageBatch {
    let mut counts = RequestCounts::default();
    if b.status == ProcessingStatus::Ended {
        for r in &b.results {
            match r.result {
                MessageBatchResult::Succeeded { .. } => counts.succeeded += 1,
                MessageBatchResult::Errored { .. } => counts.errored += 1,
                MessageBatchResult::Canceled => counts.canceled += 1,
                MessageBatchResult::Expired => counts.expired += 1,
            }
        }
    } else {
        counts.processing = b.requests.len() as u64;
    }
    MessageBatch {
        id: b.id.clone(),
        kind: "message_batch".to_owned(),
        processing_status: b.status,
        request_counts: counts,
        ended_at: b.ended_at.map(rfc3339),
        created_at: rfc3339(b.created_at),
        expires_at: rfc3339(b.created_at + chrono::Duration::hours(24)),
        archived_at: None,
        cancel_initiated_at: b.cancel_initiated_at.map(rfc3339),
        results_url: (b.status == ProcessingStatus::Ended)
            .then(|| format!("{origin}/v1/messages/batches/{}/results", b.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_body_that_breaks_the_rules_is_refused() {
        let ok = |id: &str| json!({"custom_id": id, "params": {"model": "m"}});
        let body = |reqs: Vec<Value>| json!({ "requests": reqs }).to_string();
        assert_eq!(
            read_requests(body(vec![ok("a"), ok("b")]).as_bytes())
                .unwrap()
                .len(),
            2
        );
        for bad in [
            body(vec![]),
            body(vec![ok("a"), ok("a")]),
            body(vec![ok("has space")]),
            body(vec![ok(&"x".repeat(65))]),
            body(vec![json!({"custom_id": "a"})]),
            "{}".to_owned(),
            "not json".to_owned(),
        ] {
            assert!(read_requests(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
