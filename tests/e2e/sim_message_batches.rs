//! `batchd sim` serves Anthropic's Message Batches: creation with the
//! Messages headers, `in_progress` then `ended` on the batch clock, request
//! counts, results by `custom_id` (succeeded, errored, expired, canceled),
//! cancellation, listing, creation counts and the batch bill, over HTTP,
//! through the engine's own client where it has a call for it.

use std::time::Duration;

use batchd::provider::AnthropicBatchApi;
use batchd::sim::{BatchFaults, SimConfig, SimServer};
use batchd_actors::ports::{BatchApi, BatchJobStatus, ProviderError};
use batchd_actors::provider_jobs::{input_line, LineResult, CHAT_ENDPOINT};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::common::{start_sim, until_batch_ends};

const MODEL: &str = "claude-3-5-haiku-latest";

/// The engine's input lines for `ids`, as a job hands them to the client.
fn input(ids: &[&str]) -> Bytes {
    let mut out = String::new();
    for id in ids {
        let body = json!({"model": MODEL, "max_completion_tokens": 20, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": format!("question {id}")}]});
        out.push_str(&input_line(id, &body, CHAT_ENDPOINT));
        out.push('\n');
    }
    Bytes::from(out)
}

async fn sim_and_client(duration: Duration) -> (SimServer, AnthropicBatchApi, String) {
    let sim = start_sim(SimConfig {
        batch_duration: duration,
        ..SimConfig::default()
    })
    .await;
    let root = sim.base_url().trim_end_matches("/v1").to_owned();
    let api = AnthropicBatchApi::new(&root, Some("sk-ant-test".into()), Duration::from_secs(5))
        .expect("client");
    (sim, api, root)
}

async fn create(api: &AnthropicBatchApi, ids: &[&str]) -> BatchJobStatus {
    api.create("inline", &input(ids), CHAT_ENDPOINT, "24h", &Value::Null)
        .await
        .expect("create")
}

/// A request with Anthropic's headers.
fn anthropic(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
}

async fn json_of(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

#[tokio::test]
async fn a_message_batch_goes_in_progress_then_ended_with_results_by_custom_id() {
    let (sim, api, root) = sim_and_client(Duration::from_millis(400)).await;
    sim.set_batch_faults(BatchFaults {
        failing_custom_ids: ["t3".to_owned()].into(),
        ..BatchFaults::default()
    });
    let created = create(&api, &["t1", "t2", "t3"]).await;
    assert_eq!(created.status, "in_progress");
    assert!(created.id.starts_with("msgbatch_"), "{}", created.id);
    let http = reqwest::Client::new();
    let (_, object) = json_of(anthropic(
        http.get(format!("{root}/v1/messages/batches/{}", created.id)),
    ))
    .await;
    assert_eq!(object["type"], "message_batch");
    assert_eq!(object["request_counts"]["processing"], 3);
    assert!(object["results_url"].is_null() && object["ended_at"].is_null());
    assert!(object["expires_at"].is_string() && object["created_at"].is_string());
    // Results are not there before the batch ends.
    let early = anthropic(http.get(format!("{root}/v1/messages/batches/{}/results", created.id)))
        .send()
        .await
        .expect("request");
    assert_eq!(early.status(), 400);

    let (ended, seen) = until_batch_ends(&api, &created.id).await;
    assert_eq!(seen, ["in_progress", "ended"]);
    let (_, object) = json_of(anthropic(
        http.get(format!("{root}/v1/messages/batches/{}", created.id)),
    ))
    .await;
    assert_eq!(
        object["request_counts"],
        json!({"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0})
    );
    assert!(object["ended_at"].is_string());
    assert_eq!(
        object["results_url"],
        format!("{root}/v1/messages/batches/{}/results", created.id)
    );
    // The raw JSONL: one line per request, not in input order.
    let raw = anthropic(http.get(object["results_url"].as_str().unwrap()))
        .send()
        .await
        .expect("results")
        .text()
        .await
        .expect("text");
    let lines: Vec<Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    assert_eq!(ids, ["t3", "t2", "t1"]);
    assert_eq!(lines[0]["result"]["type"], "errored");
    assert_eq!(
        lines[0]["result"]["error"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(lines[1]["result"]["type"], "succeeded");
    assert_eq!(lines[1]["result"]["message"]["type"], "message");

    // Through the engine's client: answers and the failure by custom_id.
    let results = api.results(&ended).await.expect("results");
    assert!(matches!(&results["t1"], LineResult::Answered(c) if c.usage.output_tokens > 0));
    assert!(matches!(
        &results["t3"],
        LineResult::Failed {
            status: Some(400),
            ..
        }
    ));
    assert_eq!(sim.batch_creations(), 1);
    let bill = sim.batch_bill();
    assert_eq!(bill[MODEL].requests, 2);
    let LineResult::Answered(c) = &results["t1"] else {
        unreachable!()
    };
    let LineResult::Answered(d) = &results["t2"] else {
        panic!("t2 answered")
    };
    assert_eq!(
        bill[MODEL].prompt_tokens,
        c.usage.input_tokens + d.usage.input_tokens
    );
    assert!(
        sim.bill().is_empty(),
        "batch requests are not realtime calls"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_expiring_message_batch_answers_some_requests_and_expires_the_rest() {
    let (sim, api, _) = sim_and_client(Duration::from_millis(150)).await;
    sim.set_batch_faults(BatchFaults {
        expire_after_lines: Some(1),
        ..BatchFaults::default()
    });
    let b = create(&api, &["a", "b", "c"]).await;
    let (ended, _) = until_batch_ends(&api, &b.id).await;
    let results = api.results(&ended).await.expect("results");
    assert_eq!(results.len(), 1, "expired requests are unanswered");
    assert!(matches!(results["a"], LineResult::Answered(_)));
    assert_eq!(sim.batch_bill()[MODEL].requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_canceled_message_batch_answers_nothing_and_bad_creations_are_refused() {
    let (sim, api, root) = sim_and_client(Duration::from_secs(60)).await;
    let b = create(&api, &["a", "b"]).await;
    let http = reqwest::Client::new();
    let (status, cancel) = json_of(anthropic(
        http.post(format!("{root}/v1/messages/batches/{}/cancel", b.id)),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(cancel["processing_status"], "canceling");
    assert!(cancel["cancel_initiated_at"].is_string());
    let (ended, seen) = until_batch_ends(&api, &b.id).await;
    assert_eq!(seen, ["ended"]);
    assert!(api.results(&ended).await.expect("results").is_empty());
    let (_, object) = json_of(anthropic(
        http.get(format!("{root}/v1/messages/batches/{}", b.id)),
    ))
    .await;
    assert_eq!(object["request_counts"]["canceled"], 2);
    assert!(sim.batch_bill().is_empty());

    // The list: newest first.
    let second = create(&api, &["z"]).await;
    let (_, list) = json_of(anthropic(
        http.get(format!("{root}/v1/messages/batches?limit=1")),
    ))
    .await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["data"][0]["id"], second.id.as_str());
    assert_eq!(list["has_more"], true);
    let (_, rest) = json_of(anthropic(
        http.get(format!("{root}/v1/messages/batches?after_id={}", second.id)),
    ))
    .await;
    assert_eq!(rest["data"][0]["id"], b.id.as_str());
    assert_eq!(rest["has_more"], false);

    // Headers are required; a duplicate custom_id and an empty batch are refused.
    let (status, body) = json_of(
        http.post(format!("{root}/v1/messages/batches"))
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"requests": []})),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "authentication_error");
    for requests in [
        json!([]),
        json!([{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]),
    ] {
        let (status, body) = json_of(anthropic(
            http.post(format!("{root}/v1/messages/batches"))
                .json(&json!({ "requests": requests })),
        ))
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["type"], "error");
    }
    let missing = api.retrieve("msgbatch_nope").await;
    assert!(
        matches!(missing, Err(ProviderError::Rejected { status: 404, .. })),
        "{missing:?}"
    );
    assert_eq!(
        sim.batch_creations(),
        2,
        "refused creations are not counted"
    );
    sim.shutdown().await;
}
