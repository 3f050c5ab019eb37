//! When work is sent, against a real nats-server and the simulator:
//! backpressure from a full tasks stream, off-peak windows (the engine's
//! clock shifted with `offpeak.clock_offset_secs`), and deadlines that
//! expire at intake and in a batch.

use std::time::Duration;

use async_nats::jetstream;
use batchd::client::{Outgoing, PublishError, Publisher};
use batchd::sim::SimConfig;
use batchd_actors::task::{RouteKind, Usage};
use chrono::{Timelike, Utc};
use serde_json::{json, Value};

use crate::common::{self, nats::NatsServer};

fn outgoing(id: &str, priority: u8, body: &Value) -> Outgoing {
    Outgoing {
        subject: format!("batchd.tasks.p{priority}"),
        msg_id: id.to_owned(),
        content_type: "application/json",
        body: serde_json::to_vec(body).expect("json").into(),
    }
}

#[tokio::test]
async fn a_publish_to_a_full_tasks_stream_is_refused_and_a_retry_with_the_same_id_lands_once() {
    let nats = NatsServer::start().await;
    let config = common::config_with(
        &nats.url(),
        "http://127.0.0.1:9/v1",
        "[nats]\ntasks_max_msgs = 5\n",
    );
    let client = nats.client().await;
    batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("topology");
    let js = jetstream::new(client);
    let publisher = Publisher::new(js.clone());
    for i in 0..5 {
        let id = format!("full{i}");
        publisher
            .publish(outgoing(&id, 3, &common::task(&id, 3)))
            .await
            .expect("room for five");
    }
    // What a producer sees: the PubAck is an error naming the limit.
    let raw = js
        .publish(
            "batchd.tasks.p3",
            serde_json::to_vec(&common::task("full5", 3))
                .unwrap()
                .into(),
        )
        .await
        .expect("sent")
        .await
        .expect_err("the stream is full");
    let text = raw.to_string();
    assert!(text.contains("maximum messages exceeded"), "{text}");
    assert!(text.contains("10077"), "{text}");
    let refused = publisher
        .publish(outgoing("full5", 3, &common::task("full5", 3)))
        .await
        .expect_err("still full");
    assert!(
        matches!(refused, PublishError::StreamFull { .. }),
        "{refused:?}"
    );
    assert_eq!(common::stream_len(&js, "BATCHD_TASKS").await, 5);
    // Room again (the engine finished a task); the retry with the same
    // Nats-Msg-Id is stored once, and a second retry is a duplicate.
    let stream = js.get_stream("BATCHD_TASKS").await.expect("stream");
    stream.delete_message(1).await.expect("delete one");
    let ack = publisher
        .publish(outgoing("full5", 3, &common::task("full5", 3)))
        .await
        .expect("room now");
    assert_eq!(ack, batchd::client::Ack::Stored);
    let again = publisher
        .publish(outgoing("full5", 3, &common::task("full5", 3)))
        .await
        .expect("a duplicate is acked");
    assert_eq!(again, batchd::client::Ack::Duplicate);
    assert_eq!(common::stream_len(&js, "BATCHD_TASKS").await, 5);
}

/// Seconds to add to the system clock so the engine's clock reads
/// `target` seconds after midnight UTC now.
fn offset_to(target: u32) -> i64 {
    let now = i64::from(Utc::now().num_seconds_from_midnight());
    i64::from(target) - now
}

fn outcome_of(outcomes: &std::collections::HashMap<String, Vec<Value>>, id: &str) -> Value {
    outcomes[&format!("batchd.results.{id}")][0].clone()
}

#[tokio::test]
async fn bulk_work_waits_in_jetstream_until_the_off_peak_window_opens_and_pays_its_price() {
    // The engine's clock reads 23:59:20 UTC: the window opens in 40 s (room
    // for a slow start before it).
    let offset = offset_to(86_400 - 40);
    let extra = format!(
        "[offpeak]\nwindows = [\"00:00-06:00\"]\nprice_multiplier = 0.5\nclock_offset_secs = {offset}\n"
    );
    let common::Stack {
        nats: _nats,
        sim: _sim,
        running,
        js,
    } = common::stack(SimConfig::default(), &extra).await;
    let engine_now = Utc::now() + chrono::Duration::seconds(offset);
    let mut tasks: Vec<(String, Value)> = (0..5)
        .map(|i| {
            let id = format!("night{i}");
            ("batchd.tasks.p3".to_owned(), common::task(&id, 3))
        })
        .collect();
    let mut urgent = common::task("urgent", 3);
    urgent["deadline"] = json!((engine_now + chrono::Duration::seconds(120)).to_rfc3339());
    tasks.push(("batchd.tasks.p3".to_owned(), urgent));
    tasks.push(("batchd.tasks.p2".to_owned(), common::task("standard", 2)));
    common::publish_many(&js, &tasks).await;
    let first = common::wait_for_messages(&js, "BATCHD_RESULTS", 2, Duration::from_secs(15)).await;
    assert!(first.contains_key("batchd.results.urgent"), "{first:?}");
    assert!(first.contains_key("batchd.results.standard"), "{first:?}");
    assert!(
        (0..5).all(|i| !first.contains_key(&format!("batchd.results.night{i}"))),
        "bulk work waited for the window"
    );
    assert!(
        common::stream_len(&js, "BATCHD_TASKS").await >= 5,
        "still in JetStream"
    );
    let all = common::wait_for_messages(&js, "BATCHD_RESULTS", 7, Duration::from_secs(90)).await;
    let config = batchd::config::Config::defaults().expect("defaults");
    for i in 0..5 {
        let o = outcome_of(&all, &format!("night{i}"));
        assert_eq!(o["status"], "succeeded", "{o}");
        let done = chrono::DateTime::parse_from_rfc3339(o["completed_at"].as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc)
            + chrono::Duration::seconds(offset);
        assert!(
            done.hour() < 6,
            "finished inside the window, engine time {done}"
        );
        let usage: Usage = serde_json::from_value(o["usage"].clone()).unwrap();
        let full = config
            .prices
            .cost(o["model"].as_str().unwrap(), &usage, RouteKind::Realtime)
            .unwrap();
        let cost = o["cost_usd"].as_f64().unwrap();
        assert!((cost - full * 0.5).abs() < 1e-12, "{cost} vs {full} × 0.5");
    }
    let u = outcome_of(&all, "urgent");
    let usage: Usage = serde_json::from_value(u["usage"].clone()).unwrap();
    let full = config
        .prices
        .cost(u["model"].as_str().unwrap(), &usage, RouteKind::Realtime)
        .unwrap();
    assert!(
        (u["cost_usd"].as_f64().unwrap() - full).abs() < 1e-12,
        "released early: full price"
    );
    running.engine.shutdown().await;
}

#[tokio::test]
async fn deadlines_expire_at_intake_and_while_waiting_in_a_batch() {
    let extra = "[batching.p3]\nmax_wait_ms = 3000\nseal_when_drained = false\n";
    let common::Stack {
        nats: _nats,
        sim: _sim,
        running,
        js,
    } = common::stack(SimConfig::default(), extra).await;
    let mut past = common::task("past", 2);
    past["deadline"] = json!((Utc::now() - chrono::Duration::seconds(5)).to_rfc3339());
    let mut in_batch = common::task("in_batch", 3);
    in_batch["deadline"] = json!((Utc::now() + chrono::Duration::seconds(1)).to_rfc3339());
    let patient = common::task("patient", 3);
    common::publish_many(
        &js,
        &[
            ("batchd.tasks.p2".to_owned(), past),
            ("batchd.tasks.p3".to_owned(), in_batch),
            ("batchd.tasks.p3".to_owned(), patient),
        ],
    )
    .await;
    let all = common::wait_for_messages(&js, "BATCHD_RESULTS", 3, Duration::from_secs(30)).await;
    let o = outcome_of(&all, "past");
    assert_eq!(o["error"]["kind"], "expired", "{o}");
    assert!(o["error"]["message"]
        .as_str()
        .unwrap()
        .contains("before it could be sent"));
    let o = outcome_of(&all, "in_batch");
    assert_eq!(o["error"]["kind"], "expired", "{o}");
    assert!(
        o["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in a batch"),
        "{o}"
    );
    assert_eq!(outcome_of(&all, "patient")["status"], "succeeded");
    let dead = common::wait_for_messages(&js, "BATCHD_DLQ", 2, Duration::from_secs(10)).await;
    assert!(dead.contains_key("batchd.dlq.past") && dead.contains_key("batchd.dlq.in_batch"));
    running.engine.shutdown().await;
}
