//! Tenant lanes against a real nats-server and the simulator: a tenant's
//! large backlog does not hold back another tenant's tasks of the same
//! priority when each publishes on its lane.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;

use crate::common::{self, nats::NatsServer};

fn lane_tasks(tenant: &str, n: usize) -> Vec<(String, serde_json::Value)> {
    (0..n)
        .map(|i| {
            let mut t = common::task(&format!("{tenant}-{i}"), 3);
            t["tenant"] = tenant.into();
            (format!("batchd.tasks.p3.{tenant}"), t)
        })
        .collect()
}

#[tokio::test]
async fn a_small_tenant_behind_a_large_backlog_finishes_long_before_the_backlog_drains() {
    let nats = NatsServer::start().await;
    let sim = common::start_sim(common::sim_latency(Duration::from_millis(5))).await;
    let toml = common::config_toml(&nats.url(), &sim.base_url(), "");
    let config = batchd::config::Config::from_toml_str(&toml, "test").expect("config");
    let client = nats.client().await;
    batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("topology");
    let js = jetstream::new(client.clone());
    // Tenant "bulk" publishes 20,000 tasks first, then "small" its 100.
    common::publish_many(&js, &lane_tasks("bulk", 20_000)).await;
    common::publish_many(&js, &lane_tasks("small", 100)).await;
    let mut results = client.subscribe("batchd.results.>").await.expect("sub");
    let providers = batchd::app::http_providers(&config).expect("providers");
    let running = batchd::app::start(&config, providers)
        .await
        .expect("start batchd");
    let (mut bulk, mut small) = (0usize, 0usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while small < 100 {
        let msg = tokio::time::timeout_at(deadline, results.next())
            .await
            .unwrap_or_else(|_| panic!("small tenant: {small} of 100 after 120 s ({bulk} bulk)"))
            .expect("subscription open");
        let outcome = common::decode(&msg);
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
        match outcome["tenant"].as_str() {
            Some("bulk") => bulk += 1,
            Some("small") => small += 1,
            other => panic!("unexpected tenant {other:?}"),
        }
    }
    // Served in turn: the small tenant's 100 come out while the bulk
    // tenant's backlog is mostly still queued (in stream order they would
    // come after all 20,000).
    assert!(
        bulk < 2_000,
        "the small tenant finished after {bulk} of the bulk tenant's 20,000"
    );
    // Both lanes got their own consumer; the plain subject's is still there.
    let tasks = js.get_stream("BATCHD_TASKS").await.expect("stream");
    for name in [
        "batchd-p3",
        "batchd-p3-t-62756c6b",
        "batchd-p3-t-736d616c6c",
    ] {
        tasks
            .get_consumer::<jetstream::consumer::pull::Config>(name)
            .await
            .unwrap_or_else(|e| panic!("consumer {name}: {e}"));
    }
    running.engine.shutdown().await;
}
