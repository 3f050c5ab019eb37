//! `batchd status` from NATS alone: waiting tasks and their age before
//! batchd runs, then outcomes and the dead letters of the last hour, as
//! JSON and as a table.

use crate::common;

use std::process::Command;
use std::time::Duration;

use batchd::sim::{SimConfig, SimServer};
use common::nats::NatsServer;
use common::process::Batchd;
use serde_json::Value;

fn status(nats_url: &str, config: &std::path::Path, json: bool) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_batchd"));
    c.args(["status", "--nats-url", nats_url, "--config"])
        .arg(config);
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_queues_outcomes_and_dead_letters_from_nats() {
    let nats = NatsServer::start().await;
    let sim = SimServer::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let (_dir, path, js) = common::binary_setup(&nats, &sim).await;
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            (
                "batchd.tasks.p3".to_owned(),
                common::task(&format!("st{i}"), 3),
            )
        })
        .collect();
    common::publish_many(&js, &tasks).await;
    common::publish(&js, "batchd.tasks.p2", b"not json".to_vec(), None, None).await;

    let before: Value = serde_json::from_str(&status(&nats.url(), &path, true)).unwrap();
    let p3 = &before["priorities"][2];
    assert_eq!(p3["priority"], 3, "{before}");
    assert_eq!(p3["waiting"], 5, "{before}");
    assert!(p3["oldest_age_secs"].as_f64().is_some(), "{before}");
    assert_eq!(before["dead_letters_last_hour"], 0, "{before}");

    let mut batchd = Batchd::start(&path, &[]).await;
    common::wait_for_messages(&js, "BATCHD_RESULTS", 6, Duration::from_secs(30)).await;
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(10)).await;
    let after: Value = serde_json::from_str(&status(&nats.url(), &path, true)).unwrap();
    assert_eq!(after["priorities"][2]["waiting"], 0, "{after}");
    assert_eq!(after["outcomes_total"], 6, "{after}");
    assert_eq!(after["dead_letters_last_hour"], 1, "{after}");
    let table = status(&nats.url(), &path, false);
    for text in [
        "Queues",
        "p3",
        "dead letters, last hour",
        "Routes paused or down",
    ] {
        assert!(table.contains(text), "{text:?} not in:\n{table}");
    }
    assert!(batchd.terminate().success());
}
