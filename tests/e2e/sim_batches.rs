//! `batchd sim` serves OpenAI's Files and Batches APIs: upload, the status
//! progression, output and error files mapped by `custom_id`, expiry,
//! cancellation, creation counts and the batch bill, over HTTP through the
//! engine's own client.

use std::time::Duration;

use batchd::provider::OpenAiBatchApi;
use batchd::sim::{BatchFaults, SimConfig};
use batchd_actors::ports::{BatchApi, BatchJobStatus};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::common::{start_sim, until_batch_ends};

fn line(id: &str, text: &str) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": text}], "max_completion_tokens": 20}})
    .to_string()
}

fn jsonl(lines: &[String]) -> Bytes {
    Bytes::from(lines.join("\n") + "\n")
}

/// The lines of a batch's output or error file.
async fn file_lines(api: &OpenAiBatchApi, file_id: Option<&str>) -> Vec<Value> {
    let bytes = api
        .content(file_id.expect("the file exists"))
        .await
        .expect("file content");
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A simulator whose batches take `duration`, and the engine's client for it.
async fn sim_and_client(duration: Duration) -> (batchd::sim::SimServer, OpenAiBatchApi) {
    let sim = start_sim(SimConfig {
        batch_duration: duration,
        ..SimConfig::default()
    })
    .await;
    let api = OpenAiBatchApi::new(
        &sim.base_url(),
        Some("sk-test".into()),
        Duration::from_secs(5),
    )
    .expect("client");
    (sim, api)
}

/// A request to the simulator, its JSON answer.
async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON")
}

/// Uploads `lines` and creates a batch of them.
async fn submit(api: &OpenAiBatchApi, lines: &[String]) -> (String, BatchJobStatus) {
    let file = api.upload("job.jsonl", jsonl(lines)).await.expect("upload");
    let created = api
        .create(
            &file,
            &Bytes::new(),
            "/v1/chat/completions",
            "24h",
            &json!({"batchd_job": "j1"}),
        )
        .await
        .expect("create");
    (file, created)
}

#[tokio::test]
async fn a_batch_goes_validating_in_progress_finalizing_completed_with_lines_by_custom_id() {
    let (sim, api) = sim_and_client(Duration::from_millis(600)).await;
    sim.set_batch_faults(BatchFaults {
        failing_custom_ids: ["t3".to_owned()].into(),
        ..BatchFaults::default()
    });
    let (file, created) = submit(
        &api,
        &[line("t1", "one"), line("t2", "two"), line("t3", "three")],
    )
    .await;
    assert_eq!(created.status, "validating");
    assert_eq!(created.metadata["batchd_job"], "j1");
    let (done, seen) = until_batch_ends(&api, &created.id).await;
    assert_eq!(
        seen,
        ["validating", "in_progress", "finalizing", "completed"]
    );
    let output = file_lines(&api, done.output_file_id.as_deref()).await;
    let ids: Vec<&str> = output
        .iter()
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    assert_eq!(ids, ["t2", "t1"], "answered lines, not in input order");
    assert_eq!(output[0]["response"]["status_code"], 200);
    assert!(output[0]["response"]["body"]["choices"][0]["message"]["content"].is_string());
    let errors = file_lines(&api, done.error_file_id.as_deref()).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "t3");
    assert_eq!(errors[0]["response"]["status_code"], 400);

    // Counted once, billed at the batch rate apart from realtime calls.
    assert_eq!(sim.batch_creations(), 1);
    let bill = sim.batch_bill();
    assert_eq!(bill["gpt-4.1-mini"].requests, 2);
    assert!(
        sim.bill().is_empty(),
        "batch lines are not realtime requests"
    );
    let recent = api.recent().await.expect("list");
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].id, created.id);

    // Over HTTP: counts, bill and request counts as OpenAI reports them.
    let root = sim.base_url().trim_end_matches("/v1").to_owned();
    let report: Value = reqwest::get(format!("{root}/sim/batches"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["created"], 1);
    let object: Value =
        json_of(reqwest::Client::new().get(format!("{}/batches/{}", sim.base_url(), created.id)))
            .await;
    assert_eq!(
        object["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );
    assert!(object["completed_at"].is_u64() && object["in_progress_at"].is_u64());

    api.delete_file(&file).await.expect("delete");
    assert!(api.content(&file).await.is_err(), "a deleted file is gone");
    api.delete_file(&file)
        .await
        .expect("deleting twice is fine");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_expiring_batch_answers_some_lines_and_reports_the_rest_batch_expired() {
    let (sim, api) = sim_and_client(Duration::from_millis(200)).await;
    sim.set_batch_faults(BatchFaults {
        expire_after_lines: Some(1),
        ..BatchFaults::default()
    });
    let (_, b) = submit(&api, &[line("a", "x"), line("b", "y"), line("c", "z")]).await;
    let (done, _) = until_batch_ends(&api, &b.id).await;
    assert_eq!(done.status, "expired");
    let output = file_lines(&api, done.output_file_id.as_deref()).await;
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["custom_id"], "a");
    let errors = file_lines(&api, done.error_file_id.as_deref()).await;
    let expired: Vec<&str> = errors
        .iter()
        .filter(|l| l["error"]["code"] == "batch_expired")
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    assert_eq!(expired, ["b", "c"]);
    assert_eq!(sim.batch_bill()["gpt-4.1-mini"].requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_batch_answers_nothing_and_bad_requests_are_refused() {
    let (sim, api) = sim_and_client(Duration::from_secs(60)).await;
    let (file, b) = submit(&api, &[line("a", "x")]).await;
    let http = reqwest::Client::new();
    let cancel: Value =
        json_of(http.post(format!("{}/batches/{}/cancel", sim.base_url(), b.id))).await;
    assert_eq!(cancel["status"], "cancelling");
    let (done, _) = until_batch_ends(&api, &b.id).await;
    assert_eq!(done.status, "cancelled");
    assert!(done.output_file_id.is_none());
    assert!(sim.batch_bill().is_empty());

    // Another window, an unknown file, a broken input file.
    let refused = api
        .create(
            &file,
            &Bytes::new(),
            "/v1/chat/completions",
            "1h",
            &Value::Null,
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(batchd_actors::ports::ProviderError::Rejected { status: 400, .. })
        ),
        "{refused:?}"
    );
    let missing = api
        .create(
            "file-nope",
            &Bytes::new(),
            "/v1/chat/completions",
            "24h",
            &Value::Null,
        )
        .await;
    assert!(
        matches!(
            missing,
            Err(batchd_actors::ports::ProviderError::Rejected { status: 404, .. })
        ),
        "{missing:?}"
    );
    sim.set_config(|c| c.batch_duration = Duration::from_millis(50));
    let broken = api
        .upload("b.jsonl", jsonl(&[line("a", "x"), line("a", "y")]))
        .await
        .unwrap();
    let b = api
        .create(
            &broken,
            &Bytes::new(),
            "/v1/chat/completions",
            "24h",
            &Value::Null,
        )
        .await
        .unwrap();
    let (done, _) = until_batch_ends(&api, &b.id).await;
    assert_eq!(done.status, "failed");
    let object: Value = json_of(http.get(format!("{}/batches/{}", sim.base_url(), b.id))).await;
    assert_eq!(object["errors"]["data"][0]["code"], "duplicate_custom_id");
    assert_eq!(
        sim.batch_creations(),
        2,
        "refused creations are not counted"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_engines_input_lines_and_the_sims_batch_objects_follow_openais_spec() {
    use batchd_actors::provider_jobs::{input_line, CHAT_ENDPOINT};
    // What the engine renders for a task type and for a chat payload.
    let requests = [
        json!({"model": "gpt-4.1-nano", "messages": [{"role": "system", "content": "You summarize."}, {"role": "user", "content": "doc"}], "max_completion_tokens": 200}),
        json!({"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "max_tokens": 10}),
    ];
    let mut lines = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let line = input_line(&format!("t{i}"), r, CHAT_ENDPOINT);
        let v: Value = serde_json::from_str(&line).expect("a JSON line");
        crate::common::openapi::validate_batch_input_line(&v)
            .unwrap_or_else(|e| panic!("{line}: {e:?}"));
        lines.push(line);
    }
    assert!(crate::common::openapi::validate_batch_input_line(
        &json!({"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}})
    )
    .is_err());

    let (sim, api) = sim_and_client(Duration::from_millis(100)).await;
    let (_, created) = submit(&api, &lines).await;
    let create = json!({"input_file_id": "file-x", "endpoint": CHAT_ENDPOINT, "completion_window": "24h", "metadata": {"batchd_job": "j_1"}});
    crate::common::openapi::validate_schema("CreateBatchRequest", &create).expect("create body");
    until_batch_ends(&api, &created.id).await;
    let object =
        json_of(reqwest::Client::new().get(format!("{}/batches/{}", sim.base_url(), created.id)))
            .await;
    crate::common::openapi::validate_schema("Batch", &object)
        .unwrap_or_else(|e| panic!("{object}: {e:?}"));
    let list = json_of(reqwest::Client::new().get(format!("{}/batches", sim.base_url()))).await;
    crate::common::openapi::validate_schema("ListBatchesResponse", &list)
        .unwrap_or_else(|e| panic!("{list}: {e:?}"));
    sim.shutdown().await;
}
