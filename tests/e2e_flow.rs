//! End to end: tasks over the three priorities flow through a real
//! nats-server and the simulated provider over HTTP; exactly one outcome each.

mod common;

use std::time::Duration;

use batchd::sim::{SimConfig, SimServer};
use common::nats::NatsServer;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_over_three_priorities_get_exactly_one_outcome_each() {
    let nats = NatsServer::start().await;
    let sim = SimServer::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            record_requests: true,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let config = common::config(&nats.url(), &sim.base_url());
    let providers = batchd::app::http_providers(&config).unwrap();
    let running = batchd::app::start(&config, providers).await.unwrap();
    let js = async_nats::jetstream::new(running.client.clone());

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
    common::publish_many(&js, &tasks).await;

    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", n as u64, Duration::from_secs(120)).await;
    assert_eq!(outcomes.len(), n, "one subject per task");
    for (subject, list) in &outcomes {
        assert_eq!(list.len(), 1, "{subject} has {} outcomes", list.len());
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
        assert_eq!(o["metadata"]["n"].as_u64().is_some(), true);
    }
    running.engine.shutdown().await;
    // Every task was acked: the work queue is empty, and no extra outcomes appeared.
    assert_eq!(common::stream_len(&js, "BATCHD_TASKS").await, 0);
    assert_eq!(common::stream_len(&js, "BATCHD_RESULTS").await, n as u64);
    assert_eq!(common::stream_len(&js, "BATCHD_DLQ").await, 0);

    // What batchd sent the provider conforms to OpenAI's published schema.
    let sent = sim.recorded_requests();
    assert!(sent.len() >= n);
    for body in sent.iter().step_by(97) {
        common::openapi::validate_chat_request(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
    }
}
