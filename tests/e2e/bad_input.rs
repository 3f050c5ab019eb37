//! Guarantee 6 against a real nats-server: every kind of bad input gets a
//! failed `invalid_request` outcome that says what is wrong (in at most
//! 512 characters), plus a dead letter, while good tasks keep flowing; the
//! engine never crashes. A provider's 200 without a usable answer is a
//! transient failure, never an empty success.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use batchd::sim::SimConfig;
use serde::Serialize;
use serde_json::{json, Value};

/// (id the outcome is published under, or "" for a synthetic one; body;
/// headers; the fragment its message must contain)
type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, &'a str);

/// The longest `error.message` batchd writes.
const MAX_MESSAGE_CHARS: usize = 512;

/// Publishes one body with exactly these headers and waits for its PubAck.
async fn publish_with(
    js: &async_nats::jetstream::Context,
    subject: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) {
    let mut h = async_nats::HeaderMap::new();
    for (name, value) in headers {
        h.insert(*name, *value);
    }
    js.publish_with_headers(subject.to_owned(), h, body.into())
        .await
        .expect("publish")
        .await
        .expect("puback");
}

/// A MessagePack task whose `payload.options.temperature` is `x`.
fn msgpack_with_number(id: &'static str, x: f64) -> Vec<u8> {
    #[derive(Serialize)]
    struct T {
        task_id: &'static str,
        payload: P,
    }
    #[derive(Serialize)]
    struct P {
        text: &'static str,
        options: O,
    }
    #[derive(Serialize)]
    struct O {
        temperature: f64,
    }
    rmp_serde::to_vec_named(&T {
        task_id: id,
        payload: P {
            text: "x",
            options: O { temperature: x },
        },
    })
    .unwrap()
}

fn nested(depth: usize) -> Value {
    let mut v = json!("deep");
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

fn chat(id: &str, payload_extra: Value, message: Value) -> Vec<u8> {
    let mut payload = json!({"messages": [message]});
    for (k, v) in payload_extra.as_object().unwrap() {
        payload[k] = v.clone();
    }
    serde_json::to_vec(&json!({"task_id": id, "payload": payload})).unwrap()
}

fn with_reply_to(id: &str, reply_to: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"task_id": id, "type": "summarization", "reply_to": reply_to, "payload": {"text": "x"}}))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_an_outcome_and_a_dead_letter_while_good_tasks_flow() {
    let recording = SimConfig {
        record_requests: true,
        ..SimConfig::default()
    };
    let stack = common::stack(recording, "").await;
    let (js, sim) = (&stack.js, &stack.sim);
    let p2 = "batchd.tasks.p2";

    // (id the outcome is published under, body, headers, expected message fragment)
    let big = "x".repeat(5000);
    let json_ct: &[(&str, &str)] = &[];
    let msgpack: &[(&str, &str)] = &[("Content-Type", "application/msgpack")];
    let user = json!({"role": "user", "content": "hi"});
    let long_ct = "a".repeat(1000);
    let deep = nested(100);
    let deep_mp = rmp_serde::to_vec_named(
        &json!({"task_id": "deep_mp", "payload": {"text": "x"}, "metadata": deep}),
    )
    .unwrap();
    let cases: Vec<Case> = vec![
        ("", br#"{"task_id":"bad_json","type":"#.to_vec(), json_ct.to_vec(), "malformed JSON"),
        ("", b"\xff\xfe not json at all".to_vec(), json_ct.to_vec(), "malformed JSON"),
        ("", vec![0xc1, 0x00, 0xff], msgpack.to_vec(), "malformed MessagePack"),
        ("no_payload", br#"{"task_id":"no_payload","type":"summarization"}"#.to_vec(), json_ct.to_vec(), "missing required field `payload`"),
        ("", br#"{"type":"summarization","payload":{"text":"x"}}"#.to_vec(), json_ct.to_vec(), "missing required field `task_id`"),
        ("mistyped", br#"{"task_id":"mistyped","type":"summarization","payload":{"text":42}}"#.to_vec(), json_ct.to_vec(), "`payload.text` must be a string"),
        ("mistyped_retry", br#"{"task_id":"mistyped_retry","type":"summarization","payload":{"text":"x"},"retry_count":"two"}"#.to_vec(), json_ct.to_vec(), "`retry_count` must be a non-negative integer"),
        ("", br#"{"task_id":"not a token!","type":"summarization","payload":{"text":"x"}}"#.to_vec(), json_ct.to_vec(), "subject token"),
        ("unknown_type", br#"{"task_id":"unknown_type","type":"haiku","payload":{"text":"x"}}"#.to_vec(), json_ct.to_vec(), "unknown task type \"haiku\""),
        ("unknown_model", br#"{"task_id":"unknown_model","type":"summarization","model":"gpt-0","payload":{"text":"x"}}"#.to_vec(), json_ct.to_vec(), "model \"gpt-0\" is not served"),
        ("wrong_priority", br#"{"task_id":"wrong_priority","type":"summarization","priority":1,"payload":{"text":"x"}}"#.to_vec(), json_ct.to_vec(), "arrived on the p2 subject"),
        ("oversized", serde_json::to_vec(&json!({"task_id": "oversized", "type": "summarization", "payload": {"text": big}})).unwrap(), json_ct.to_vec(), "exceeds the limit of 4096 bytes"),
        ("", br#"{"task_id":"bad_ct"}"#.to_vec(), vec![("Content-Type", "text/csv")], "unsupported Content-Type"),
        ("wrong_type_field", br#"{"task_id":"wrong_type_field","type":["x"],"payload":{"text":"x"}}"#.to_vec(), json_ct.to_vec(), "field `type` must be a string"),
        // The header's name and value in any case: a MessagePack body is read as MessagePack.
        ("ct_lower", rmp_serde::to_vec_named(&json!({"task_id": "ct_lower", "type": "summarization"})).unwrap(), vec![("content-type", "Application/MsgPack; charset=binary")], "missing required field `payload`"),
        ("", br#"{"task_id":"ct_long"}"#.to_vec(), vec![("Content-Type", long_ct.as_str())], "the Content-Type header is 1000 bytes long"),
        // Chat payloads.
        ("mt_neg", chat("mt_neg", json!({"max_tokens": -5}), user.clone()), json_ct.to_vec(), "`payload.max_tokens` must be a positive integer, got -5"),
        ("mt_zero", chat("mt_zero", json!({"max_tokens": 0}), user.clone()), json_ct.to_vec(), "`payload.max_tokens` must be a positive integer, got 0"),
        ("mt_frac", chat("mt_frac", json!({"max_tokens": 2.5}), user.clone()), json_ct.to_vec(), "`payload.max_tokens` must be a positive integer, got 2.5"),
        ("mt_str", chat("mt_str", json!({"max_completion_tokens": "100"}), user.clone()), json_ct.to_vec(), "`payload.max_completion_tokens` must be a positive integer, got \"100\""),
        ("no_content", chat("no_content", json!({}), json!({"role": "user"})), json_ct.to_vec(), "`payload.messages[0]` needs `content`"),
        ("n_many", chat("n_many", json!({"n": 50}), user.clone()), json_ct.to_vec(), "`payload.n` must be 1"),
        // MessagePack numbers that JSON cannot hold.
        ("", msgpack_with_number("mp_nan", f64::NAN), msgpack.to_vec(), "the number NaN is not finite"),
        ("", msgpack_with_number("mp_inf", f64::INFINITY), msgpack.to_vec(), "the number inf is not finite"),
        ("", msgpack_with_number("mp_ninf", f64::NEG_INFINITY), msgpack.to_vec(), "the number -inf is not finite"),
        // Nesting.
        ("", serde_json::to_vec(&json!({"task_id": "deep_json", "payload": {"text": "x"}, "metadata": nested(100)})).unwrap(), json_ct.to_vec(), "malformed JSON: nested deeper than 64 levels"),
        ("", deep_mp, msgpack.to_vec(), "malformed MessagePack: nested deeper than 64 levels"),
        // Echoes are bounded.
        ("long_type", serde_json::to_vec(&json!({"task_id": "long_type", "type": "t".repeat(3000), "payload": {"text": "x"}})).unwrap(), json_ct.to_vec(), "unknown task type \"tttt"),
        ("long_model", serde_json::to_vec(&json!({"task_id": "long_model", "model": "m".repeat(300), "payload": {"text": "x"}})).unwrap(), json_ct.to_vec(), "field `model` must be 1 to 256 characters"),
        // reply_to may only name an allowed reply subject.
        ("rt_js", with_reply_to("rt_js", "$JS.API.STREAM.DELETE.BATCHD_TASKS"), json_ct.to_vec(), "must not be a system subject"),
        ("rt_sys", with_reply_to("rt_sys", "$SYS.REQ.SERVER.PING"), json_ct.to_vec(), "must not be a system subject"),
        ("rt_kv", with_reply_to("rt_kv", "$KV.batchd-attempts.victim"), json_ct.to_vec(), "must not be a system subject"),
        ("rt_results", with_reply_to("rt_results", "batchd.results.victim"), json_ct.to_vec(), "must not be one of batchd's own subjects"),
        ("rt_dlq", with_reply_to("rt_dlq", "batchd.dlq.victim"), json_ct.to_vec(), "must not be one of batchd's own subjects"),
        ("rt_tasks", with_reply_to("rt_tasks", "batchd.tasks.p1"), json_ct.to_vec(), "must not be one of batchd's own subjects"),
        ("rt_inbox", with_reply_to("rt_inbox", "_BATCHD_INBOX.x.1"), json_ct.to_vec(), "must not be batchd's own inbox"),
        ("rt_other", with_reply_to("rt_other", "acme.inbox.42"), json_ct.to_vec(), "is not an allowed reply subject: it must match _INBOX.> or batchd.replies.>"),
    ];
    assert!(cases.len() >= 25);
    let mut good = Vec::new();
    for (i, (_, body, headers, _)) in cases.iter().enumerate() {
        publish_with(js, p2, body.clone(), headers).await;
        let id = format!("good_{i}");
        common::publish_json(js, p2, &common::task(&id, 2), &id).await;
        good.push(id);
    }
    // Ids in the shape of the old synthetic ones are a producer's own.
    for id in ["invalid-p2-1", "invalid-p2-2"] {
        common::publish_json(js, p2, &common::task(id, 2), id).await;
        good.push(id.to_owned());
    }
    // MessagePack with the header in lower case and the value in mixed case.
    publish_with(
        js,
        p2,
        rmp_serde::to_vec_named(&common::task("good_msgpack", 2)).unwrap(),
        &[("content-type", "APPLICATION/MSGPACK")],
    )
    .await;
    good.push("good_msgpack".into());
    // A chat payload without a type gets the default type's output limit.
    publish_with(
        js,
        p2,
        chat(
            "chat_default_limit",
            json!({}),
            json!({"role": "user", "content": "limit-check"}),
        ),
        &[],
    )
    .await;
    good.push("chat_default_limit".into());
    let total = (cases.len() + good.len()) as u64;
    let outcomes =
        common::wait_for_messages(js, "BATCHD_RESULTS", total, Duration::from_secs(60)).await;
    let dead = common::wait_for_messages(
        js,
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
        assert!(
            msg.chars().count() <= MAX_MESSAGE_CHARS,
            "{id}: {} chars",
            msg.len()
        );
        assert!(o["output"].is_null());
        let task_id = o["task_id"].as_str().unwrap();
        let dl = &dead[&format!("batchd.dlq.{task_id}")][0];
        assert_eq!(dl["error"]["kind"], "invalid_request");
        assert_eq!(dl["subject"], p2);
        if id.is_empty() {
            assert!(task_id.starts_with("invalid~p2~"), "{task_id}");
        }
    }
    let long = &outcomes["batchd.results.long_type"][0]["error"]["message"];
    assert!(long.as_str().unwrap().contains('…'), "{long}");
    // A forged reply_to reached nothing: no outcome or dead letter for "victim".
    assert!(!outcomes.contains_key("batchd.results.victim"));
    assert!(!dead.contains_key("batchd.dlq.victim"));
    let requests = sim.recorded_requests();
    let limited = requests
        .iter()
        .find(|r| r.to_string().contains("limit-check"))
        .expect("the chat task reached the provider");
    assert_eq!(limited["max_completion_tokens"], 1024, "{limited}");
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
    assert!(stack.running.engine.is_running());
    stack.running.engine.shutdown().await;
    assert_eq!(
        common::stream_len(js, "BATCHD_TASKS").await,
        0,
        "everything acked"
    );
}

/// A provider that answers 200 without a usable answer, per model: an error
/// body, a `null` content, a body beyond the size cap.
async fn lying_provider() -> (String, tokio::task::JoinHandle<()>) {
    use axum::{routing::post, Json, Router};
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|Json(req): Json<Value>| async move {
            let body = match req["model"].as_str() {
                Some("liar-error") => json!({"error": {"type": "server_error", "message": "upstream overloaded"}}),
                Some("liar-null") => json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null}, "finish_reason": "stop"}]}),
                _ => json!({"choices": [{"message": {"content": "z".repeat(5 * 1024 * 1024)}}]}),
            };
            Json(body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_without_a_usable_answer_is_retried_then_dead_lettered_never_an_empty_success() {
    let (liar, _liar) = lying_provider().await;
    let extra = format!(
        r#"
[providers.liar]
base_url = "{liar}"
api_key = "sk-liar"
models = ["liar-error", "liar-null", "liar-huge"]
[prices.models."liar-error"]
input = 1.0
cached_input = 0.5
output = 1.0
[prices.models."liar-null"]
input = 1.0
cached_input = 0.5
output = 1.0
[prices.models."liar-huge"]
input = 1.0
cached_input = 0.5
output = 1.0
"#
    );
    let common::Stack {
        running,
        js,
        nats: _nats,
        sim: _sim,
    } = common::stack(SimConfig::default(), &extra).await;
    let cases = [
        (
            "liar-error",
            "answered 200 with an error: server_error: upstream overloaded",
        ),
        ("liar-null", "no usable content"),
        ("liar-huge", "the response body exceeds 4194304 bytes"),
    ];
    for (model, _) in cases {
        let body = json!({"task_id": model, "model": model, "type": "summarization", "payload": {"text": "x"}});
        common::publish(
            &js,
            "batchd.tasks.p1",
            serde_json::to_vec(&body).unwrap(),
            None,
            Some(model),
        )
        .await;
    }
    common::publish(
        &js,
        "batchd.tasks.p1",
        serde_json::to_vec(&common::task("honest", 1)).unwrap(),
        None,
        None,
    )
    .await;
    let outcomes: HashMap<String, Vec<Value>> =
        common::wait_for_messages(&js, "BATCHD_RESULTS", 4, Duration::from_secs(60)).await;
    let dead = common::wait_for_messages(&js, "BATCHD_DLQ", 3, Duration::from_secs(30)).await;
    assert_eq!(outcomes["batchd.results.honest"][0]["status"], "succeeded");
    for (model, expected) in cases {
        let o = &outcomes[&format!("batchd.results.{model}")][0];
        assert_eq!(o["status"], "failed", "{o}");
        assert_eq!(o["error"]["kind"], "max_retries", "{o}");
        assert_eq!(o["attempts"], 4, "{o}");
        let msg = o["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(expected),
            "{model}: {msg:?} lacks {expected:?}"
        );
        let dl = &dead[&format!("batchd.dlq.{model}")][0];
        assert_eq!(dl["error"]["kind"], "max_retries");
    }
    running.engine.shutdown().await;
}
