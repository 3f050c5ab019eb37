//! `batchd status` from NATS alone: waiting tasks and their age before
//! batchd runs, then outcomes and the dead letters of the last hour, as
//! JSON and as a table; a route whose provider is down, as every replica
//! publishes it, until it serves again; a replica's routes withdrawn when it
//! stops and aged out when it dies.

use crate::common;

use std::process::Command;
use std::time::Duration;

use batchd::sim::{Fault, FaultKind, SimConfig, SimServer};
use common::nats::NatsServer;
use common::process::Batchd;
use serde_json::Value;
use tokio::time::Instant;

/// `batchd status` with `args`: its output, after checking it succeeded.
fn run_status(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .arg("status")
        .args(args)
        .output()
        .expect("run batchd status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn status(nats_url: &str, config: &std::path::Path, json: bool) -> String {
    let config = config.to_str().expect("a UTF-8 path");
    let mut args = vec!["--nats-url", nats_url, "--config", config];
    if json {
        args.push("--json");
    }
    run_status(&args)
}

/// A private nats-server and the simulated provider, healthy.
async fn nats_and_sim() -> (NatsServer, SimServer) {
    let nats = NatsServer::start().await;
    let sim = SimServer::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    (nats, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_queues_outcomes_and_dead_letters_from_nats() {
    let (nats, sim) = nats_and_sim().await;
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
        "Replicas",
        "Preempted batches (checkpoints)",
    ] {
        assert!(table.contains(text), "{text:?} not in:\n{table}");
    }
    assert!(batchd.terminate().success());
}

/// `batchd status --json` with the NATS URL and nothing else, as an
/// operator runs it from another machine.
fn status_from_nats(nats_url: &str) -> Value {
    let out = run_status(&["--json", "--nats-url", nats_url]);
    serde_json::from_str(&out).expect("status as JSON")
}

/// The routes `replica` publishes, as `batchd status --json` shows them.
fn routes_of(status: &Value, replica: &str) -> Vec<Value> {
    status["routes"]
        .as_array()
        .unwrap_or_else(|| panic!("routes unread: {status}"))
        .iter()
        .filter(|r| r["replica"] == replica)
        .cloned()
        .collect()
}

/// Runs `batchd status --json` until `done` holds for it; panics with the
/// last status after `limit`.
async fn poll_status(
    nats_url: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let status = status_from_nats(nats_url);
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not shown within {limit:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_whose_provider_is_down_shows_in_status_until_it_serves_again() {
    let (nats, sim) = nats_and_sim().await;
    // Down from the start, for longer than the test: cleared below.
    sim.add_fault(Fault::new(
        FaultKind::Outage { status: 503 },
        Duration::ZERO..Duration::from_secs(3600),
    ))
    .unwrap();
    let (_dir, path, js) =
        common::binary_setup_with(&nats, &sim, "[nats]\nreplica = \"replica-a\"\n").await;
    let mut batchd = Batchd::start(&path, &[]).await;
    let n = 20;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            (
                "batchd.tasks.p2".to_owned(),
                common::task(&format!("down{i}"), 2),
            )
        })
        .collect();
    common::publish_many(&js, &tasks).await;

    let url = nats.url();
    let down = poll_status(&url, Duration::from_secs(30), "a circuit open", |s| {
        routes_of(s, "replica-a")
            .iter()
            .any(|r| r["state"] == "circuit_open")
    })
    .await;
    let route = routes_of(&down, "replica-a")
        .into_iter()
        .find(|r| r["state"] == "circuit_open")
        .unwrap();
    assert_eq!(route["provider"], "openai", "{route}");
    assert_eq!(route["reason"], "unavailable", "{route}");
    assert_eq!(
        route["route"],
        format!("openai/{}", route["model"].as_str().unwrap()),
        "{route}"
    );
    let until = route["circuit_until"].as_str().expect("until when");
    let updated = route["updated_at"].as_str().unwrap();
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    assert!(parse(until) > parse(updated), "{route}");
    assert!(route["concurrency_limit"].as_u64().unwrap() >= 1, "{route}");
    let replica = down["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["replica"] == "replica-a")
        .unwrap_or_else(|| panic!("replica-a not among the replicas: {down}"));
    assert!(replica["routes_down"].as_u64().unwrap() >= 1, "{down}");
    // Its heartbeat (every routes_refresh_secs) says what it holds: the
    // tasks waiting at the down route.
    let held = poll_status(
        &url,
        Duration::from_secs(30),
        "a heartbeat holding tasks",
        |s| {
            s["replicas"].as_array().unwrap().iter().any(|r| {
                r["replica"] == "replica-a" && r["holds"]["messages_held"].as_u64() >= Some(1)
            })
        },
    )
    .await;
    let holds = &held["replicas"][0]["holds"];
    assert!(holds["routes"].as_u64().unwrap() >= 1, "{held}");
    assert!(holds["calls_waiting"].as_u64().is_some(), "{held}");
    assert_eq!(down["checkpoints"]["count"], 0, "{down}");
    assert_eq!(down["checkpoints"]["entries"], serde_json::json!([]));

    sim.clear_faults();
    let back = poll_status(&url, Duration::from_secs(60), "every route open", |s| {
        let routes = routes_of(s, "replica-a");
        !routes.is_empty() && routes.iter().all(|r| r["state"] == "open")
    })
    .await;
    for r in routes_of(&back, "replica-a") {
        assert_eq!(r["reason"], Value::Null, "{r}");
        assert_eq!(r["circuit_until"], Value::Null, "{r}");
    }
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", n, Duration::from_secs(60)).await;
    for o in outcomes.values().flatten() {
        assert_eq!(o["status"], "succeeded", "{o}");
    }

    assert!(batchd.terminate().success());
    let gone = status_from_nats(&url);
    assert!(
        routes_of(&gone, "replica-a").is_empty(),
        "a replica that stops withdraws its routes: {gone}"
    );
    assert_eq!(gone["replicas"], serde_json::json!([]), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_routes_age_out_of_status() {
    let (nats, sim) = nats_and_sim().await;
    let (_dir, path, js) = common::binary_setup_with(
        &nats,
        &sim,
        "[nats]\nreplica = \"replica-k\"\nroutes_refresh_secs = 2\n",
    )
    .await;
    let batchd = Batchd::start(&path, &[]).await;
    common::publish(
        &js,
        "batchd.tasks.p1",
        serde_json::to_vec(&common::task("k1", 1)).unwrap(),
        None,
        None,
    )
    .await;
    let url = nats.url();
    poll_status(&url, Duration::from_secs(30), "the replica's route", |s| {
        routes_of(s, "replica-k").len() == 1
    })
    .await;
    // SIGKILL: nothing is withdrawn; the entry was refreshed at most 2 s
    // ago and lives 6 s unless refreshed again.
    drop(batchd);
    let after_kill = status_from_nats(&url);
    assert_eq!(routes_of(&after_kill, "replica-k").len(), 1, "{after_kill}");
    assert!(
        after_kill["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["replica"] == "replica-k" && r["holds"].is_object()),
        "its heartbeat outlives it for a moment: {after_kill}"
    );
    poll_status(
        &url,
        Duration::from_secs(30),
        "the route and heartbeat aged out",
        |s| routes_of(s, "replica-k").is_empty() && s["replicas"] == serde_json::json!([]),
    )
    .await;
}
