//! OpenAI's Files and Batches APIs, simulated: an input file is uploaded,
//! a batch is created from it, moves through OpenAI's statuses on the
//! simulator's clock and ends with an output file and an error file.
//!
//! - `POST /v1/files` (multipart: `purpose=batch`, `file`), `GET
//!   /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
//! - `POST /v1/batches` (`input_file_id`, `endpoint`
//!   `/v1/chat/completions`, `completion_window` `24h`, optional
//!   `metadata`), `GET /v1/batches` (newest first, `limit`), `GET
//!   /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`.
//!
//! A batch is `validating` for the first tenth of the configured batch
//! duration ([`super::SimConfig::batch_duration`]), `in_progress` until
//! nine tenths, `finalizing`, then `completed` (or `expired` under
//! [`BatchFaults::expire_after_lines`]); an input file that breaks the
//! rules (a line that is not JSON, a duplicate `custom_id`, another method
//! or url, over 50,000 lines) makes it `failed` with `errors`. Cancelling
//! makes it `cancelling`, then `cancelled` at the next look, with no line
//! answered. Its lines are answered once, when it ends, by the same model
//! as chat completions (no rate limits, latency or faults) and billed at
//! the batch rate in [`super::SimServer::batch_bill`]. The output file lists
//! answered lines in an order of its own (clients must map by `custom_id`);
//! the error file has lines the simulator failed (a 400 for an invalid
//! body or a `custom_id` in [`BatchFaults::failing_custom_ids`]) and
//! those left unanswered by expiry (`batch_expired`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::api_error::ApiError;
use super::completion::{self, ChatCompletion, Usage};
use super::hash::mix;
use super::messages::Api;
use super::request;
use super::service::{
    completion_id, error_response, invalid_url, json_response, lock, unix_seconds, Shared,
};
use super::SimBill;

/// The Batch API's limits on one input file.
pub const MAX_BATCH_REQUESTS: usize = 50_000;
/// 200 MB.
pub const MAX_BATCH_FILE_BYTES: usize = 200 * 1024 * 1024;

/// What tests can make batches do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFaults {
    /// Batches created while set end `expired` with only their first N
    /// lines answered; the rest are `batch_expired` in the error file.
    #[serde(default)]
    pub expire_after_lines: Option<usize>,
    /// Lines with these `custom_id`s fail with a 400 in the error file.
    #[serde(default)]
    pub failing_custom_ids: BTreeSet<String>,
}

/// An uploaded or produced file.
struct StoredFile {
    bytes: Bytes,
    filename: String,
    purpose: &'static str,
    created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled
        )
    }
}

/// One batch as the simulator keeps it.
struct SimBatch {
    id: String,
    input_file_id: String,
    endpoint: String,
    metadata: Value,
    created: Instant,
    created_at: u64,
    duration: Duration,
    faults: BatchFaults,
    lines: Result<Vec<Line>, Vec<Value>>,
    status: Status,
    times: BTreeMap<&'static str, u64>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    counts: (usize, usize),
}

/// One request line of an input file.
struct Line {
    custom_id: String,
    body: Value,
}

/// Files and batches, behind the simulator's shared state.
#[derive(Default)]
pub(crate) struct BatchStore {
    files: HashMap<String, StoredFile>,
    batches: HashMap<String, SimBatch>,
    faults: BatchFaults,
    next: u64,
    /// Anthropic's Message Batches ([`super::message_batches`]).
    pub(super) message_batches: HashMap<String, super::message_batches::SimMessageBatch>,
}

impl BatchStore {
    pub(super) fn id(&mut self, prefix: &str, salt: u64) -> String {
        self.next += 1;
        format!("{prefix}{:024x}", mix(salt ^ self.next) as u128 | 1 << 90)
    }

    pub(crate) fn set_faults(&mut self, faults: BatchFaults) {
        self.faults = faults;
    }

    pub(crate) fn faults(&self) -> BatchFaults {
        self.faults.clone()
    }
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/files", post(upload).fallback(invalid_url))
        .route(
            "/v1/files/{id}",
            get(retrieve_file).delete(delete_file).fallback(invalid_url),
        )
        .route(
            "/v1/files/{id}/content",
            get(file_content).fallback(invalid_url),
        )
        .route("/v1/batches", post(create).get(list).fallback(invalid_url))
        .route("/v1/batches/{id}", get(retrieve).fallback(invalid_url))
        .route(
            "/v1/batches/{id}/cancel",
            post(cancel).fallback(invalid_url),
        )
}

fn file_object(id: &str, f: &StoredFile) -> Value {
    json!({
        "id": id,
        "object": "file",
        "bytes": f.bytes.len(),
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
    })
}

fn not_found(what: &str, id: &str) -> Response {
    error_response(&ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("No such {what}: '{id}'"),
        kind: "invalid_request_error",
        param: Some("id".into()),
        code: None,
    })
}

fn invalid(message: String, param: &str) -> Response {
    error_response(&ApiError::invalid_request(
        message,
        Some(param.into()),
        None,
    ))
}

async fn upload(State(shared): State<Arc<Shared>>, mut form: Multipart) -> Response {
    let (mut purpose, mut file) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return invalid(format!("Invalid multipart body: {e}"), "file"),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
        let Ok(bytes) = field.bytes().await else {
            return invalid("Could not read the multipart field".into(), &name);
        };
        match name.as_str() {
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).into_owned()),
            "file" => file = Some((filename, bytes)),
            _ => {}
        }
    }
    let Some(purpose) = purpose else {
        return invalid("Missing required parameter: 'purpose'.".into(), "purpose");
    };
    if purpose != "batch" {
        return invalid(
            format!("'{purpose}' is not one of the purposes this simulator accepts: 'batch'"),
            "purpose",
        );
    }
    let Some((filename, bytes)) = file else {
        return invalid("Missing required parameter: 'file'.".into(), "file");
    };
    if bytes.len() > MAX_BATCH_FILE_BYTES {
        return invalid(
            format!("File is too large: at most {MAX_BATCH_FILE_BYTES} bytes for purpose 'batch'"),
            "file",
        );
    }
    let mut store = lock(&shared.batches);
    let id = store.id("file-", shared.id_salt());
    let stored = StoredFile {
        bytes,
        filename,
        purpose: "batch",
        created_at: unix_seconds(),
    };
    let body = file_object(&id, &stored);
    store.files.insert(id, stored);
    json_response(StatusCode::OK, &body)
}

async fn retrieve_file(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let store = lock(&shared.batches);
    match store.files.get(&id) {
        Some(f) => json_response(StatusCode::OK, &file_object(&id, f)),
        None => not_found("file", &id),
    }
}

async fn file_content(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let bytes = match lock(&shared.batches).files.get(&id) {
        Some(f) => f.bytes.clone(),
        None => return not_found("file", &id),
    };
    let mut response = Response::new(axum::body::Body::from(bytes));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    response
}

async fn delete_file(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match lock(&shared.batches).files.remove(&id) {
        Some(_) => json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "file", "deleted": true}),
        ),
        None => not_found("file", &id),
    }
}

#[derive(Deserialize)]
struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

async fn create(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<CreateBatch>(&body) else {
        return error_response(&ApiError::unparsable_json());
    };
    let Some(input_file_id) = req.input_file_id else {
        return invalid(
            "Missing required parameter: 'input_file_id'.".into(),
            "input_file_id",
        );
    };
    let endpoint = req.endpoint.unwrap_or_default();
    if endpoint != "/v1/chat/completions" {
        return invalid(
            format!(
                "Invalid value: '{endpoint}'. This simulator batches '/v1/chat/completions' only."
            ),
            "endpoint",
        );
    }
    if req.completion_window.as_deref() != Some("24h") {
        return invalid(
            "Invalid value for 'completion_window': only '24h' is supported.".into(),
            "completion_window",
        );
    }
    let duration = shared.batch_duration();
    let mut store = lock(&shared.batches);
    let Some(file) = store.files.get(&input_file_id) else {
        return not_found("file", &input_file_id);
    };
    if file.purpose != "batch" {
        return invalid(
            format!(
                "File '{input_file_id}' has purpose '{}', not 'batch'.",
                file.purpose
            ),
            "input_file_id",
        );
    }
    let lines = read_lines(&file.bytes, &endpoint);
    let id = store.id("batch_", shared.id_salt());
    let faults = store.faults.clone();
    let created_at = unix_seconds();
    let batch = SimBatch {
        id: id.clone(),
        input_file_id,
        endpoint,
        metadata: req.metadata.unwrap_or(Value::Null),
        created: Instant::now(),
        created_at,
        duration,
        faults,
        lines,
        status: Status::Validating,
        times: BTreeMap::from([("expires_at", created_at + 24 * 3600)]),
        output_file_id: None,
        error_file_id: None,
        counts: (0, 0),
    };
    let object = batch_object(&batch);
    store.batches.insert(id, batch);
    shared.batch_created();
    json_response(StatusCode::OK, &object)
}

/// `GET /v1/batches`: newest first, at most `limit` (default 20, at most 100).
async fn list(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let mut store = lock(&shared.batches);
    let mut ids: Vec<(u64, Instant, String)> = store
        .batches
        .values()
        .map(|b| (b.created_at, b.created, b.id.clone()))
        .collect();
    ids.sort_by_key(|b| std::cmp::Reverse((b.0, b.1)));
    let now = Instant::now();
    let mut data = Vec::new();
    for (_, _, id) in ids.iter().take(limit) {
        advance(&shared, &mut store, id, now);
        if let Some(b) = store.batches.get(id) {
            data.push(batch_object(b));
        }
    }
    let body = json!({
        "object": "list",
        "data": data,
        "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()),
        "has_more": ids.len() > limit,
    });
    json_response(StatusCode::OK, &body)
}

async fn retrieve(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut store = lock(&shared.batches);
    if !store.batches.contains_key(&id) {
        return not_found("batch", &id);
    }
    advance(&shared, &mut store, &id, Instant::now());
    match store.batches.get(&id) {
        Some(b) => json_response(StatusCode::OK, &batch_object(b)),
        None => not_found("batch", &id),
    }
}

async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut store = lock(&shared.batches);
    advance(&shared, &mut store, &id, Instant::now());
    let Some(b) = store.batches.get_mut(&id) else {
        return not_found("batch", &id);
    };
    if b.status.is_terminal() {
        return error_response(&ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "Cannot cancel a batch with status '{}'.",
                status_name(b.status)
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    }
    if b.status != Status::Cancelling {
        b.status = Status::Cancelling;
        b.times.insert("cancelling_at", unix_seconds());
    }
    json_response(StatusCode::OK, &batch_object(b))
}

fn status_name(s: Status) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Reads an input file: its request lines, or the errors that fail the batch.
fn read_lines(bytes: &[u8], endpoint: &str) -> Result<Vec<Line>, Vec<Value>> {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let text = String::from_utf8_lossy(bytes);
    for (n, raw) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line_no = n + 1;
        let mut error = |code: &str, message: String| {
            errors.push(json!({"code": code, "message": message, "param": null, "line": line_no}));
        };
        let Ok(v) = serde_json::from_str::<Value>(raw) else {
            error(
                "invalid_json_line",
                format!("Line {line_no} is not valid JSON."),
            );
            continue;
        };
        let Some(custom_id) = v.get("custom_id").and_then(Value::as_str) else {
            error("missing_required_parameter", "Missing 'custom_id'.".into());
            continue;
        };
        if !seen.insert(custom_id.to_owned()) {
            error(
                "duplicate_custom_id",
                format!("The custom_id '{custom_id}' is used more than once."),
            );
            continue;
        }
        if v.get("method").and_then(Value::as_str) != Some("POST") {
            error("invalid_method", "The method must be 'POST'.".into());
            continue;
        }
        if v.get("url").and_then(Value::as_str) != Some(endpoint) {
            error(
                "mismatched_url",
                format!("The url must match the batch's endpoint '{endpoint}'."),
            );
            continue;
        }
        let Some(body) = v.get("body").filter(|b| b.is_object()) else {
            error("missing_required_parameter", "Missing 'body'.".into());
            continue;
        };
        lines.push(Line {
            custom_id: custom_id.to_owned(),
            body: body.clone(),
        });
    }
    if lines.len() > MAX_BATCH_REQUESTS {
        errors.push(json!({"code": "too_many_requests", "message": format!("A batch holds at most {MAX_BATCH_REQUESTS} requests."), "param": null, "line": null}));
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(json!({"code": "empty_file", "message": "The input file has no requests.", "param": null, "line": null}));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

/// Moves a batch to the status its age gives; answers its lines once when it ends.
fn advance(shared: &Shared, store: &mut BatchStore, id: &str, now: Instant) {
    let Some(b) = store.batches.get_mut(id) else {
        return;
    };
    if b.status.is_terminal() {
        return;
    }
    let ts = unix_seconds();
    if b.status == Status::Cancelling {
        b.status = Status::Cancelled;
        b.times.insert("cancelled_at", ts);
        return;
    }
    let age = now.saturating_duration_since(b.created);
    let d = b.duration;
    if age < d / 10 {
        return;
    }
    if b.lines.is_err() {
        b.status = Status::Failed;
        b.times.insert("failed_at", ts);
        return;
    }
    if b.status == Status::Validating {
        b.status = Status::InProgress;
        b.times.insert("in_progress_at", ts);
    }
    if age < d * 9 / 10 {
        return;
    }
    if b.status == Status::InProgress {
        b.status = Status::Finalizing;
        b.times.insert("finalizing_at", ts);
    }
    if age < d {
        return;
    }
    let salt = shared.id_salt();
    let (output, errors, counts) = answer_lines(shared, b, salt);
    b.counts = counts;
    b.status = if b.faults.expire_after_lines.is_some() {
        b.times.insert("expired_at", ts);
        Status::Expired
    } else {
        b.times.insert("completed_at", ts);
        Status::Completed
    };
    let mut files = Vec::new();
    for (lines, purpose) in [(output, "output"), (errors, "error")] {
        if lines.is_empty() {
            files.push(None);
            continue;
        }
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(l.to_string().as_bytes());
            bytes.push(b'\n');
        }
        files.push(Some((bytes, purpose)));
    }
    let batch_id = b.id.clone();
    let mut ids = Vec::new();
    for f in files {
        ids.push(f.map(|(bytes, purpose)| {
            let fid = store.id("file-", salt);
            store.files.insert(
                fid.clone(),
                StoredFile {
                    bytes: Bytes::from(bytes),
                    filename: format!("{batch_id}_{purpose}.jsonl"),
                    purpose: "batch_output",
                    created_at: ts,
                },
            );
            fid
        }));
    }
    if let Some(b) = store.batches.get_mut(id) {
        let mut ids = ids.into_iter();
        b.output_file_id = ids.next().flatten();
        b.error_file_id = ids.next().flatten();
    }
}

/// Answers a batch's lines: (output lines, error lines, (completed, failed)).
fn answer_lines(
    shared: &Shared,
    b: &SimBatch,
    salt: u64,
) -> (Vec<Value>, Vec<Value>, (usize, usize)) {
    let Ok(lines) = &b.lines else {
        return (Vec::new(), Vec::new(), (0, 0));
    };
    let answered = b.faults.expire_after_lines.unwrap_or(usize::MAX);
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    let (mut completed, mut failed) = (0, 0);
    for (n, line) in lines.iter().enumerate() {
        let seq = mix(salt ^ (n as u64) ^ mix(b.created_at));
        let req_id = format!("batch_req_{:024x}", seq as u128 | 1 << 90);
        let request_id = format!("req_{:032x}", mix(seq) as u128);
        if n >= answered {
            errors.push(json!({
                "id": req_id, "custom_id": line.custom_id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."},
            }));
            continue;
        }
        let failure = if b.faults.failing_custom_ids.contains(&line.custom_id) {
            Some(ApiError::invalid_request(
                "The request was refused by the simulator (a failing custom_id).".into(),
                None,
                None,
            ))
        } else {
            request::parse(&line.body).err()
        };
        if let Some(e) = failure {
            failed += 1;
            let body: Value = serde_json::from_slice(&e.to_body()).unwrap_or(Value::Null);
            errors.push(json!({
                "id": req_id, "custom_id": line.custom_id,
                "response": {"status_code": e.status.as_u16(), "request_id": request_id, "body": body},
                "error": null,
            }));
            continue;
        }
        let Ok(request) = request::parse(&line.body) else {
            continue;
        };
        let generated = completion::generate(&request);
        let prompt = request.prompt.tokens;
        let (cached, _) = shared.batch_line_cache(Api::OpenAi, &request, None);
        shared.charge_batch(
            &request.model,
            SimBill::tokens(prompt, cached, generated.completion_tokens, 0),
        );
        completed += 1;
        let body = ChatCompletion {
            id: completion_id(seq),
            object: "chat.completion",
            created: unix_seconds(),
            model: &request.model,
            usage: Usage::new(prompt, cached, generated.completion_tokens),
            choices: generated.into_choices(),
            service_tier: "default",
            system_fingerprint: format!("fp_{:010x}", mix(seq) & 0xff_ffff_ffff),
        };
        output.push(json!({
            "id": req_id, "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": null,
        }));
    }
    // Not in input order: a client must map lines by custom_id.
    output.reverse();
    (output, errors, (completed, failed))
}

/// OpenAI's batch object; fields not reached yet are left out, as the
/// spec has them optional (not nullable).
fn batch_object(b: &SimBatch) -> Value {
    let total = b.lines.as_ref().map_or(0, Vec::len);
    let time = |k: &str| b.times.get(k).copied();
    let mut object = json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.lines.as_ref().err().map(|data| json!({"object": "list", "data": data})),
        "input_file_id": b.input_file_id,
        "completion_window": "24h",
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": time("in_progress_at"),
        "expires_at": time("expires_at"),
        "finalizing_at": time("finalizing_at"),
        "completed_at": time("completed_at"),
        "failed_at": time("failed_at"),
        "expired_at": time("expired_at"),
        "cancelling_at": time("cancelling_at"),
        "cancelled_at": time("cancelled_at"),
        "request_counts": {"total": total, "completed": b.counts.0, "failed": b.counts.1},
        "metadata": b.metadata,
    });
    if let Value::Object(fields) = &mut object {
        fields.retain(|_, v| !v.is_null());
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_file_that_breaks_the_rules_is_refused_line_by_line() {
        let good = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;
        let file = format!(
            "{good}\nnot json\n{good}\n{{\"custom_id\":\"b\",\"method\":\"GET\",\"url\":\"/v1/chat/completions\",\"body\":{{}}}}\n"
        );
        let Err(errors) = read_lines(file.as_bytes(), "/v1/chat/completions") else {
            panic!("accepted a broken file");
        };
        let codes: Vec<&str> = errors.iter().filter_map(|e| e["code"].as_str()).collect();
        assert_eq!(
            codes,
            ["invalid_json_line", "duplicate_custom_id", "invalid_method"]
        );
        assert_eq!(errors[0]["line"], 2);
        let Ok(lines) = read_lines(format!("{good}\n\n").as_bytes(), "/v1/chat/completions") else {
            panic!("refused a good file");
        };
        assert_eq!(lines.len(), 1);
        assert!(read_lines(b"", "/v1/chat/completions").is_err());
    }
}
