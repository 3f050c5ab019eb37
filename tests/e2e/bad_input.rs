//! Guarantee 6 against a real nats-server: every kind of bad input gets a
//! failed `invalid_request` outcome that says what is wrong, plus a dead
//! letter, while good tasks keep flowing; the engine never crashes.

use crate::common;

use std::time::Duration;

use batchd::sim::SimConfig;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_an_outcome_and_a_dead_letter_while_good_tasks_flow() {
    let common::Stack {
        running,
        js,
        nats: _nats,
        sim: _sim,
    } = common::stack(SimConfig::default(), "").await;
    let p2 = "batchd.tasks.p2";

    // (id the outcome is published under, body, content type, expected message fragment)
    let big = "x".repeat(5000);
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("", br#"{"task_id":"bad_json","type":"#.to_vec(), None, "malformed JSON"),
        ("", b"\xff\xfe not json at all".to_vec(), None, "malformed JSON"),
        ("", vec![0xc1, 0x00, 0xff], Some("application/msgpack"), "malformed MessagePack"),
        ("no_payload", br#"{"task_id":"no_payload","type":"summarization"}"#.to_vec(), None, "missing required field `payload`"),
        ("", br#"{"type":"summarization","payload":{"text":"x"}}"#.to_vec(), None, "missing required field `task_id`"),
        ("mistyped", br#"{"task_id":"mistyped","type":"summarization","payload":{"text":42}}"#.to_vec(), None, "`payload.text` must be a string"),
        ("mistyped_retry", br#"{"task_id":"mistyped_retry","type":"summarization","payload":{"text":"x"},"retry_count":"two"}"#.to_vec(), None, "`retry_count` must be a non-negative integer"),
        ("", br#"{"task_id":"not a token!","type":"summarization","payload":{"text":"x"}}"#.to_vec(), None, "subject token"),
        ("unknown_type", br#"{"task_id":"unknown_type","type":"haiku","payload":{"text":"x"}}"#.to_vec(), None, "unknown task type \"haiku\""),
        ("unknown_model", br#"{"task_id":"unknown_model","type":"summarization","model":"gpt-0","payload":{"text":"x"}}"#.to_vec(), None, "model \"gpt-0\" is not served"),
        ("wrong_priority", br#"{"task_id":"wrong_priority","type":"summarization","priority":1,"payload":{"text":"x"}}"#.to_vec(), None, "arrived on the p2 subject"),
        ("oversized", serde_json::to_vec(&json!({"task_id": "oversized", "type": "summarization", "payload": {"text": big}})).unwrap(), None, "exceeds the limit of 4096 bytes"),
        ("", br#"{"task_id":"bad_ct"}"#.to_vec(), Some("text/csv"), "unsupported Content-Type"),
        ("wrong_type_field", br#"{"task_id":"wrong_type_field","type":["x"],"payload":{"text":"x"}}"#.to_vec(), None, "field `type` must be a string"),
    ];
    let mut good = Vec::new();
    for (i, (_, body, ct, _)) in cases.iter().enumerate() {
        common::publish(&js, p2, body.clone(), *ct, None).await;
        let id = format!("good_{i}");
        common::publish(
            &js,
            p2,
            serde_json::to_vec(&common::task(&id, 2)).unwrap(),
            None,
            Some(&id),
        )
        .await;
        good.push(id);
    }
    let total = (cases.len() + good.len()) as u64;
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", total, Duration::from_secs(60)).await;
    let dead = common::wait_for_messages(
        &js,
        "BATCHD_DLQ",
        cases.len() as u64,
        Duration::from_secs(30),
    )
    .await;

    let mut keys: Vec<&String> = outcomes.keys().collect();
    keys.sort();
    for id in &good {
        let o = &outcomes
            .get(&format!("batchd.results.{id}"))
            .unwrap_or_else(|| panic!("no outcome for {id}; have {keys:?}"))[0];
        assert_eq!(o["status"], "succeeded", "{o}");
    }
    let failed: Vec<&Value> = outcomes
        .values()
        .map(|v| &v[0])
        .filter(|o| o["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), cases.len());
    for (id, _, _, expected) in &cases {
        let o = if id.is_empty() {
            *failed
                .iter()
                .find(|o| o["error"]["message"].as_str().unwrap().contains(expected))
                .unwrap_or_else(|| panic!("no outcome says {expected:?}"))
        } else {
            &outcomes
                .get(&format!("batchd.results.{id}"))
                .unwrap_or_else(|| panic!("no outcome for {id}; have {keys:?}"))[0]
        };
        assert_eq!(o["error"]["kind"], "invalid_request", "{o}");
        let msg = o["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expected), "{id}: {msg:?} lacks {expected:?}");
        assert!(o["output"].is_null());
        let task_id = o["task_id"].as_str().unwrap();
        let dl = &dead[&format!("batchd.dlq.{task_id}")][0];
        assert_eq!(dl["error"]["kind"], "invalid_request");
        assert_eq!(dl["subject"], p2);
        if id.is_empty() {
            assert!(task_id.starts_with("invalid~p2~"), "{task_id}");
        }
    }
    // Where no body could be decoded, the dead letter keeps the raw bytes.
    let raw: Vec<&Value> = dead
        .values()
        .map(|v| &v[0])
        .filter(|d| d["raw_base64"].is_string())
        .collect();
    assert!(
        raw.len() >= 3,
        "malformed JSON and MessagePack keep their bytes: {raw:?}"
    );
    assert!(running.engine.is_running());
    running.engine.shutdown().await;
    assert_eq!(
        common::stream_len(&js, "BATCHD_TASKS").await,
        0,
        "everything acked"
    );
}
