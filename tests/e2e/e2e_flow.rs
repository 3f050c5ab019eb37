//! End to end: tasks over the three priorities flow through a real
//! nats-server and the simulated provider over HTTP; exactly one outcome each.

use crate::common;

use std::time::Duration;

use batchd::sim::SimConfig;
use serde_json::Value;

/// A [`common::Stack`] whose simulator records every request it is sent.
async fn recording_stack(extra: &str) -> common::Stack {
    let recording = SimConfig {
        record_requests: true,
        ..SimConfig::default()
    };
    common::stack(recording, extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_over_three_priorities_get_exactly_one_outcome_each() {
    let stack = recording_stack("").await;
    let (sim, js) = (&stack.sim, &stack.js);

    let n = 10_000;
    let tasks: Vec<(String, Value)> = (0..n)
        .map(|i| {
            let p = [1, 2, 2, 3, 3, 3][i % 6];
            (
                format!("batchd.tasks.p{p}"),
                common::task(&format!("t{i}"), p as u8),
            )
        })
        .collect();
    common::publish_many(js, &tasks).await;

    let outcomes = common::wait_for_one_outcome_each(js, n, Duration::from_secs(120)).await;
    for (subject, list) in &outcomes {
        let o = &list[0];
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(
            subject,
            &format!("batchd.results.{}", o["task_id"].as_str().unwrap())
        );
        assert!(o["output"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(o["usage"]["input_tokens"].as_u64().unwrap() > 0);
        assert!(o["cost_usd"].as_f64().unwrap() > 0.0);
        assert_eq!(o["route"], "realtime");
        assert_eq!(o["tenant"], "acme");
        assert!(o["batch_id"].as_str().unwrap().starts_with("b_"));
        assert!(o["metadata"]["n"].as_u64().is_some());
    }
    stack.running.engine.shutdown().await;
    // Every task was acked: the work queue is empty, and no extra outcomes appeared.
    assert_eq!(common::stream_len(js, "BATCHD_TASKS").await, 0);
    assert_eq!(common::stream_len(js, "BATCHD_RESULTS").await, n as u64);
    assert_eq!(common::stream_len(js, "BATCHD_DLQ").await, 0);

    // What batchd sent the provider conforms to OpenAI's published schema.
    let sent = sim.recorded_requests();
    assert!(sent.len() >= n);
    for body in sent.iter().step_by(97) {
        common::openapi::validate_chat_request(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_details_msgpack_reply_to_batch_lines_chat_bodies_and_duplicates() {
    let stack = recording_stack("").await;
    let (sim, js) = (&stack.sim, &stack.js);
    let client = stack.running.client.clone();
    let mut inbox = client.subscribe("batchd.replies.acme.42").await.unwrap();

    // MessagePack in, MessagePack out; reply_to gets the outcome too.
    let mut mp = common::task("mp_1", 1);
    mp["reply_to"] = "batchd.replies.acme.42".into();
    common::publish(
        js,
        "batchd.tasks.p1",
        rmp_serde::to_vec_named(&mp).unwrap(),
        Some("application/msgpack"),
        Some("mp_1"),
    )
    .await;
    // An OpenAI Batch input line with an explicit model.
    let line = serde_json::json!({"custom_id": "line_1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 20}});
    common::publish_json(js, "batchd.tasks.p3", &line, "line_1").await;
    // A chat body passed through, with a tier.
    let chat = serde_json::json!({"task_id": "chat_1", "tier": "complex", "payload": {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}], "temperature": 0.2}});
    common::publish_json(js, "batchd.tasks.p2", &chat, "chat_1").await;
    // A duplicate publish inside the window is dropped by JetStream...
    let dup = serde_json::to_vec(&common::task("dup_1", 2)).unwrap();
    common::publish(js, "batchd.tasks.p2", dup.clone(), None, Some("dup_1")).await;
    common::publish(js, "batchd.tasks.p2", dup.clone(), None, Some("dup_1")).await;
    // ...and the same task id under another message id still gets one outcome.
    common::publish(js, "batchd.tasks.p2", dup, None, Some("dup_1_again")).await;
    // A chat body the provider refuses (a tool message without its call id;
    // batchd leaves that check to the provider): provider_rejected.
    let refused = serde_json::json!({"task_id": "refused_1", "payload": {"messages": [{"role": "user", "content": "refused-by-the-provider"}, {"role": "tool", "content": "x"}]}});
    common::publish_json(js, "batchd.tasks.p2", &refused, "refused_1").await;

    let outcomes =
        common::wait_for_messages(js, "BATCHD_RESULTS", 5, Duration::from_secs(30)).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut inbox),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        reply
            .headers
            .as_ref()
            .unwrap()
            .get("Content-Type")
            .unwrap()
            .as_str(),
        "application/msgpack"
    );
    let reply: Value = rmp_serde::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["task_id"], "mp_1");
    assert_eq!(reply["priority"], 1);

    let mp = &outcomes["batchd.results.mp_1"][0];
    assert_eq!(mp["status"], "succeeded");
    let line = &outcomes["batchd.results.line_1"][0];
    assert_eq!(line["model"], "gpt-4o-mini");
    assert_eq!(line["priority"], 3);
    let chat = &outcomes["batchd.results.chat_1"][0];
    assert_eq!(chat["model"], "gpt-4.1", "tier complex");
    let refused = &outcomes["batchd.results.refused_1"][0];
    assert_eq!(refused["error"]["kind"], "provider_rejected");
    assert_eq!(refused["error"]["status_code"], 400);
    assert_eq!(outcomes["batchd.results.dup_1"].len(), 1);

    // The second copy of dup_1 is acked without a second outcome.
    common::wait_until_empty(js, "BATCHD_TASKS", Duration::from_secs(20)).await;
    stack.running.engine.shutdown().await;
    assert_eq!(common::stream_len(js, "BATCHD_RESULTS").await, 5);
    let sent = sim.recorded_requests();
    let dup_calls = sent
        .iter()
        .filter(|b| b.to_string().contains("document dup_1"))
        .count();
    assert_eq!(dup_calls, 1, "the provider saw dup_1 once");
    let passthrough = sent
        .iter()
        .find(|b| b.to_string().contains("Name a color."))
        .unwrap();
    assert_eq!(passthrough["temperature"], 0.2);
    for body in &sent {
        if !body.to_string().contains("refused-by-the-provider") {
            common::openapi::validate_chat_request(body)
                .unwrap_or_else(|e| panic!("{body}: {e:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_configured_for_max_tokens_gets_max_tokens() {
    let stack = recording_stack("[providers.openai]\nmax_tokens_field = \"max_tokens\"\n").await;
    let js = &stack.js;
    common::publish_json(js, "batchd.tasks.p2", &common::task("mt_1", 2), "mt_1").await;
    let outcomes =
        common::wait_for_messages(js, "BATCHD_RESULTS", 1, Duration::from_secs(30)).await;
    assert_eq!(outcomes["batchd.results.mt_1"][0]["status"], "succeeded");
    let sent = stack.sim.recorded_requests();
    assert_eq!(sent.len(), 1);
    assert!(sent[0]["max_tokens"].as_u64().is_some(), "{}", sent[0]);
    assert!(
        sent[0].get("max_completion_tokens").is_none(),
        "{}",
        sent[0]
    );
    common::openapi::validate_chat_request(&sent[0]).unwrap();
    stack.running.engine.shutdown().await;
}

/// The Dispatcher asks whether a batch's outcomes exist in one request
/// (`multi_last` Direct Get, split at the server's 1,024 subjects): each
/// answer equals the one lookup per task it replaces, first runs and
/// replays alike, and a batch with no outcome at all (the server's 404)
/// answers false for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_outcome_lookup_answers_as_one_lookup_per_task() {
    use batchd_actors::ports::{Encoded, OutcomeSink};
    use batchd_actors::task::Encoding;

    let nats = common::nats::NatsServer::start().await;
    let config = common::config(&nats.url(), "http://127.0.0.1:9");
    let client = nats.client().await;
    let topology = batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("create the topology");
    let sink = batchd::nats::JetSink::new(&client, &topology, &config);

    let n = 1_200;
    let id = |i: usize| format!("lookup-{i:05}");
    // Every third task has a first-run outcome; every seventh of those a
    // replay's (generation 2) kept after it.
    for i in (0..n).step_by(3) {
        let generations: &[u32] = if i % 7 == 0 { &[0, 2] } else { &[0] };
        for &generation in generations {
            let task_id = id(i);
            let body = serde_json::json!({"task_id": task_id, "generation": generation});
            sink.publish_outcome(&Encoded {
                task_id: &task_id,
                generation,
                body: serde_json::to_vec(&body).unwrap().into(),
                encoding: Encoding::Json,
            })
            .await
            .expect("publish an outcome");
        }
    }
    let ids: Vec<String> = (0..n).map(id).collect();
    // Asked as a first run, as a replay of generation 1 and of generation 3.
    let asked: Vec<(&str, u32)> = ids
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), [0, 1, 3][i % 3]))
        .collect();
    let batch = sink.outcomes_exist(&asked).await;
    assert_eq!(batch.len(), n, "one answer per task");
    let mut exists = 0;
    for ((task_id, generation), answer) in asked.iter().zip(batch) {
        let alone = sink
            .outcome_exists(task_id, *generation)
            .await
            .expect("one lookup");
        let answer = answer.expect("the batch lookup answers every task");
        assert_eq!(answer, alone, "{task_id} generation {generation}");
        let i: usize = task_id["lookup-".len()..].parse().unwrap();
        let kept = match (i % 3, i % 7) {
            (0, 0) => Some(2),
            (0, _) => Some(0),
            _ => None,
        };
        assert_eq!(answer, kept.is_some_and(|k| k >= *generation), "{task_id}");
        exists += usize::from(answer);
    }
    assert!(exists > 100, "the lookups found outcomes: {exists}");
    // The answers came from batch requests, not from the fallback.
    let subjects: Vec<String> = ids[..1_024]
        .iter()
        .map(|t| config.subjects().result(t))
        .collect();
    let (kept, cut_short) = sink.last_outcomes(&subjects).await.expect("multi_last");
    assert_eq!(
        kept.len(),
        (0..1_024).step_by(3).count(),
        "one kept outcome per subject that has one"
    );
    assert!(!cut_short);

    let absent = ["absent-1", "absent-2", "absent-3"].map(|t| (t, 0));
    let none = sink.outcomes_exist(&absent).await;
    assert_eq!(
        none.into_iter()
            .map(|a| a.expect("a batch with no outcome answers"))
            .collect::<Vec<_>>(),
        vec![false; 3]
    );
}
