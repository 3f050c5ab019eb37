//! `batchd submit` end to end: the real binary publishes a JSONL file to a
//! real nats-server, the engine (in this process) answers through the
//! simulated provider over HTTP, and `--wait` writes an OpenAI Batch output
//! file.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use batchd::sim::SimConfig;
use common::nats::NatsServer;
use serde_json::{json, Value};

async fn engine() -> common::Stack {
    common::stack(SimConfig::default(), "").await
}

async fn submit(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .arg("submit")
        .args(args)
        .env_remove("BATCHD_NATS_URL")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("submit finished within 120s")
        .expect("run batchd submit")
}

/// `batchd submit INPUT --wait --out OUT` plus `extra`, which must succeed; its stdout.
async fn submit_waiting(input: &Path, out: &Path, nats_url: &str, extra: &[&str]) -> String {
    let (input, out) = (input.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec![input, "--wait", "--nats-url", nats_url, "--out", out];
    args.extend_from_slice(extra);
    let run = submit(&args).await;
    let stdout = text(&run.stdout);
    assert!(
        run.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&run.stderr)
    );
    stdout
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn batch_line(id: &str, model: &str) -> Value {
    json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": format!("Say hello to {id}.")}
            ],
            "max_tokens": 20
        }
    })
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The mixed input: OpenAI Batch lines, task lines over two priorities and
/// one line naming a model nobody serves. Returns (lines, expected ids).
fn mixed_input() -> (Vec<String>, Vec<String>) {
    let mut values = Vec::new();
    for i in 0..40 {
        values.push(match i % 4 {
            0 | 1 => batch_line(&format!("req-{i}"), "gpt-4.1-nano"),
            2 => common::task(&format!("task-{i}"), 2),
            _ => common::task(&format!("task-{i}"), 3),
        });
    }
    values.insert(17, batch_line("bad-model", "gpt-99"));
    let ids = values
        .iter()
        .map(|v| {
            v.get("task_id")
                .or_else(|| v.get("custom_id"))
                .and_then(Value::as_str)
                .unwrap()
                .to_owned()
        })
        .collect();
    (values.iter().map(Value::to_string).collect(), ids)
}

fn assert_success(line: &Value) {
    let body = &line["response"]["body"];
    assert_eq!(line["response"]["status_code"], 200, "{line}");
    assert!(line["error"].is_null(), "{line}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_i64().unwrap() > 1_700_000_000);
    assert!(body["model"]
        .as_str()
        .is_some_and(|m| m.starts_with("gpt-")));
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["finish_reason"].is_string());
    let usage = &body["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    let b = &line["batchd"];
    assert_eq!(b["status"], "succeeded");
    assert!(b["cost_usd"].as_f64().unwrap() > 0.0, "{b}");
    assert_eq!(b["attempts"], 1);
    assert_eq!(b["route"], "realtime");
    assert!(b["batch_id"].as_str().unwrap().starts_with("b_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_file_gets_an_openai_output_file_in_input_order_and_a_rerun_resumes() {
    let e = engine().await;
    let dir = tempfile::tempdir().unwrap();
    let (lines, ids) = mixed_input();
    let input = write_lines(dir.path(), "batch.jsonl", &lines);
    let out = dir.path().join("out.jsonl");
    let url = e.nats.url();
    let stdout = submit_waiting(&input, &out, &url, &[]).await;
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stdout.contains("invalid_request: 1"), "{stdout}");
    assert!(stdout.contains("cost"), "{stdout}");

    let output = read_jsonl(&out);
    assert_eq!(output.len(), ids.len(), "one line per input line");
    let mut request_ids = std::collections::HashSet::new();
    for (line, id) in output.iter().zip(&ids) {
        assert_eq!(line["custom_id"], id.as_str(), "input order is kept");
        assert!(request_ids.insert(line["id"].as_str().unwrap().to_owned()));
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        if id == "bad-model" {
            assert!(line["response"].is_null(), "{line}");
            assert_eq!(line["error"]["code"], "invalid_request", "{line}");
            assert!(
                line["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("gpt-99"),
                "{line}"
            );
            assert_eq!(line["batchd"]["status"], "failed");
            assert_eq!(line["batchd"]["priority"], 2);
            assert!(line["batchd"]["attempts"].is_u64());
            continue;
        }
        assert_success(line);
        // --priority defaults to 2; a task line's own priority picks its subject.
        let i: usize = id.rsplit('-').next().unwrap().parse().unwrap();
        let expected = if i % 4 == 3 { 3 } else { 2 };
        assert_eq!(line["batchd"]["priority"], expected, "{line}");
    }

    // The same command again: every id is deduplicated or skipped, and the
    // existing outcomes are found without anything being answered twice.
    let again = dir.path().join("again.jsonl");
    let rerun = submit(&[
        input.to_str().unwrap(),
        "--wait",
        "--nats-url",
        &url,
        "--out",
        again.to_str().unwrap(),
        "--timeout",
        "30",
    ])
    .await;
    assert!(rerun.status.success(), "{}", text(&rerun.stderr));
    let second = read_jsonl(&again);
    assert_eq!(second.len(), output.len());
    for (a, b) in output.iter().zip(&second) {
        assert_eq!(a["custom_id"], b["custom_id"]);
        assert_eq!(a["batchd"]["batch_id"], b["batchd"]["batch_id"]);
        assert_eq!(
            a["response"]["body"]["choices"],
            b["response"]["body"]["choices"]
        );
    }
    assert_eq!(
        common::stream_len(&e.js, "BATCHD_RESULTS").await,
        ids.len() as u64,
        "no task was answered twice"
    );
    e.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_are_refused_with_their_line_numbers_and_the_rest_still_runs() {
    let e = engine().await;
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        batch_line("ok-1", "gpt-4.1-nano").to_string(),
        "{\"custom_id\": \"half".to_owned(),
        String::new(),
        "[1, 2]".to_owned(),
        json!({"method": "POST", "body": {}}).to_string(),
        common::task("ok-2", 1).to_string(),
        batch_line("ok-1", "gpt-4.1-nano").to_string(),
        batch_line("has space", "gpt-4.1-nano").to_string(),
    ];
    let input = write_lines(dir.path(), "mixed.jsonl", &lines);
    let run = submit(&[
        input.to_str().unwrap(),
        "--wait",
        "--nats-url",
        &e.nats.url(),
    ])
    .await;
    let stderr = text(&run.stderr);
    assert!(!run.status.success(), "refused lines fail the command");
    for (n, why) in [
        (2, "not valid JSON"),
        (4, "a line must be a JSON object"),
        (5, "no `task_id` or `custom_id`"),
        (7, "duplicate id \"ok-1\" (first used on line 1)"),
        (8, "`custom_id` \"has space\" can't be a task id"),
    ] {
        assert!(
            stderr.contains(&format!("mixed.jsonl:{n}: refused: {why}")),
            "line {n} ({why}) not reported:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("5 lines refused and not submitted (lines 2, 4, 5, 7, 8)"),
        "{stderr}"
    );

    // The default output path; one line per non-empty input line.
    let output = read_jsonl(&dir.path().join("mixed_output.jsonl"));
    assert_eq!(output.len(), 7);
    assert_success(&output[0]);
    assert_eq!(output[0]["custom_id"], "ok-1");
    assert_success(&output[4]);
    assert_eq!(output[4]["custom_id"], "ok-2");
    assert_eq!(output[4]["batchd"]["priority"], 1);
    for i in [1, 2, 3, 5, 6] {
        assert!(output[i]["response"].is_null());
        assert_eq!(output[i]["error"]["code"], "invalid_line", "{}", output[i]);
        assert_eq!(output[i]["batchd"]["status"], "not_submitted");
    }
    assert_eq!(output[5]["custom_id"], "ok-1");
    assert_eq!(output[6]["custom_id"], "has space");
    assert!(output[1]["custom_id"].is_null());

    // Only the two good lines reached the engine.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(common::stream_len(&e.js, "BATCHD_RESULTS").await, 2);
    assert_eq!(common::stream_len(&e.js, "BATCHD_DLQ").await, 0);
    e.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tasks_stream_stops_submit_with_a_backpressure_message() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    js.create_stream(stream::Config {
        name: "BATCHD_TASKS".into(),
        subjects: vec!["batchd.tasks.*".into()],
        discard: stream::DiscardPolicy::New,
        max_messages: 3,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..8)
        .map(|i| common::task(&format!("t{i}"), 3).to_string())
        .collect();
    let input = write_lines(dir.path(), "many.jsonl", &lines);
    let run = submit(&[input.to_str().unwrap(), "--nats-url", &nats.url()]).await;
    let stderr = text(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("backpressure"), "{stderr}");
    assert!(stderr.contains("BATCHD_TASKS is full"), "{stderr}");
    assert!(stderr.contains("3 of 8 tasks were accepted"), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");

    // The accepted ones went to the p3 subject, named by the lines' own priority.
    let tasks = common::read_all(&js, "BATCHD_TASKS").await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks["batchd.tasks.p3"].len(), 3);

    // A rerun deduplicates what was accepted and is refused again only for the rest.
    let rerun = submit(&[input.to_str().unwrap(), "--nats-url", &nats.url()]).await;
    assert!(text(&rerun.stderr).contains("3 of 8 tasks were accepted"));
    assert_eq!(common::stream_len(&js, "BATCHD_TASKS").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_without_streams_says_to_start_the_engine() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "one.jsonl",
        &[common::task("t1", 2).to_string()],
    );
    let run = submit(&[input.to_str().unwrap(), "--nats-url", &nats.url()]).await;
    let stderr = text(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("BATCHD_TASKS is not on"), "{stderr}");
    assert!(stderr.contains("batchd run"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_file_at_priority_three_goes_through_the_batch_api_and_gets_an_openai_output_file()
{
    let e = common::stack(
        SimConfig {
            batch_duration: Duration::from_millis(300),
            ..SimConfig::default()
        },
        crate::batch_api::BATCH_ON,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..20).map(|i| format!("bulk-{i}")).collect();
    let lines: Vec<String> = ids
        .iter()
        .map(|id| batch_line(id, "gpt-4.1-mini").to_string())
        .collect();
    let input = write_lines(dir.path(), "requests.jsonl", &lines);
    let out = dir.path().join("out.jsonl");
    let url = e.nats.url();
    submit_waiting(&input, &out, &url, &["--priority", "3"]).await;
    let output = read_jsonl(&out);
    assert_eq!(output.len(), ids.len());
    for (line, id) in output.iter().zip(&ids) {
        assert_eq!(line["custom_id"], id.as_str(), "input order is kept");
        assert_eq!(line["response"]["status_code"], 200, "{line}");
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
        assert_eq!(line["batchd"]["route"], "batch_api", "{line}");
        assert_eq!(line["batchd"]["priority"], 3);
        assert!(line["batchd"]["cost_usd"].as_f64().unwrap() > 0.0);
    }
    assert!(e.sim.batch_creations() >= 1, "a provider batch was created");
    assert_eq!(e.sim.stats().requests, 0, "no line went realtime");
    let billed: u64 = e.sim.batch_bill().values().map(|b| b.requests).sum();
    assert_eq!(billed, 20);
}
