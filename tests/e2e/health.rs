//! The operator's view of a running `batchd`: `/metrics` complete from the
//! first scrape with bounded label values, `/healthz` and `/readyz` on the
//! metrics address, readiness following NATS, and SIGTERM exiting 0 (what
//! the compose healthcheck and `docker stop` rely on).

use crate::common;

use std::time::Duration;

use batchd::sim::{SimConfig, SimServer};
use batchd_actors::messages::ActorKind;
use batchd_actors::metrics as m;
use common::nats::NatsServer;
use common::process::Batchd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_complete_from_the_first_scrape_and_probes_follow_nats() {
    let mut nats = NatsServer::start().await;
    let sim = SimServer::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(
        dir.path(),
        &nats.url(),
        &sim.base_url(),
        "[metrics]\nmax_tenants = 2\n",
    );
    let mut batchd = Batchd::start(&config, &[]).await;

    // The first scrape, before any task: every known label set at zero.
    let text = batchd.metrics().await;
    let mut expected: Vec<String> = ActorKind::ALL
        .iter()
        .map(|a| format!("{}{{actor=\"{}\"}} 0", m::ACTOR_RESTARTS_TOTAL, a.name()))
        .collect();
    expected.extend([
        format!("{}{{reason=\"invalid_request\"}} 0", m::DEAD_LETTERS_TOTAL),
        format!("{}{{reason=\"max_retries\"}} 0", m::DEAD_LETTERS_TOTAL),
        format!("{}{{reason=\"server_error\"}} 0", m::RETRIES_TOTAL),
        format!("{}{{priority=\"1\"}} 0", m::TASKS_RECEIVED_TOTAL),
        format!("{}{{priority=\"3\"}} 0", m::QUEUE_DEPTH),
        format!(
            "{}{{provider=\"openai\",model=\"gpt-4.1-mini\"}} 0",
            m::RATE_LIMITED_TOTAL
        ),
        format!(
            "{}{{provider=\"openai\",model=\"gpt-4.1-mini\"}} 0",
            m::ROUTE_PAUSED
        ),
        format!(
            "{}{{provider=\"openai\",model=\"gpt-4.1\",reason=\"unauthorized\"}} 0",
            m::ROUTE_CIRCUIT_OPEN
        ),
        format!(
            "{}{{priority=\"2\",status=\"failed\",model=\"gpt-4.1-nano\"}} 0",
            m::TASKS_COMPLETED_TOTAL
        ),
        format!("{}_count{{priority=\"1\"}} 0", m::TASK_LATENCY_SECONDS),
        format!(
            "{}{{model=\"gpt-4.1-nano\",tenant=\"default\",priority=\"3\"}} 0",
            m::COST_USD_TOTAL
        ),
        format!("{} 0", m::TASKS_PARKED_TOTAL),
    ]);
    for line in &expected {
        assert!(text.contains(line.as_str()), "missing {line:?} in:\n{text}");
    }
    let ready = batchd.wait_for("/readyz", 200).await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
    for check in ["nats", "streams", "actors"] {
        assert_eq!(ready["checks"][check], "ok", "{ready}");
    }

    // Producer-controlled values are bounded: an unknown model and a third tenant.
    let js = async_nats::jetstream::new(nats.client().await);
    let mut tasks = Vec::new();
    for (i, tenant) in ["acme", "beta", "gamma"].iter().enumerate() {
        let mut t = common::task(&format!("h{i}"), 2);
        t["tenant"] = (*tenant).into();
        tasks.push(("batchd.tasks.p2".to_owned(), t));
    }
    let mut unknown = common::task("h-unknown-model", 2);
    unknown["model"] = "made-up-model-42".into();
    tasks.push(("batchd.tasks.p2".to_owned(), unknown));
    common::publish_many(&js, &tasks).await;
    common::wait_for_messages(&js, "BATCHD_RESULTS", 4, Duration::from_secs(30)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = batchd.metrics().await;
        // The unknown model's task is refused at intake; its outcome is
        // counted without a model label.
        if text.contains("tenant=\"other\"")
            && text.contains(
                "batchd_tasks_completed_total{priority=\"2\",status=\"failed\",model=\"\"} 1",
            )
        {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!text.contains("made-up-model-42"), "{text}");
    // The cap is 2: `default` and the first tenant whose spend is counted
    // keep their labels; the other two are `other`.
    let labelled: Vec<&str> = ["acme", "beta", "gamma"]
        .into_iter()
        .filter(|t| text.contains(&format!("tenant=\"{t}\"")))
        .collect();
    assert_eq!(labelled.len(), 1, "{text}");

    // Readiness follows NATS: unready while it is down, ready once it is back.
    nats.stop().await;
    let down = batchd.wait_for("/readyz", 503).await;
    assert!(down.contains("\"nats\""), "{down}");
    assert_eq!(
        reqwest::get(batchd.url("/healthz")).await.unwrap().status(),
        200,
        "the process is still healthy"
    );
    nats.restart().await;
    batchd.wait_for("/readyz", 200).await;

    let status = batchd.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(
        reqwest::get(batchd.url("/healthz")).await.is_err(),
        "nothing answers after the exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_batch_span_and_the_task_id() {
    let nats = NatsServer::start().await;
    let sim = SimServer::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            error_rate: 0.3,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let (_dir, path, js) = common::binary_setup(&nats, &sim).await;
    common::publish_many(&js, &common::tasks(30, "j")).await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "batchd_actors=debug,info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_messages(&js, "BATCHD_RESULTS", 30, Duration::from_secs(30)).await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let batch = lines
        .iter()
        .find(|l| l["fields"]["message"] == "batch dispatched")
        .expect("a batch line");
    assert_eq!(batch["span"]["name"], "batch", "{batch}");
    assert!(batch["span"]["batch_id"]
        .as_str()
        .unwrap()
        .starts_with("b_"));
    assert!(batch["span"]["route"]
        .as_str()
        .unwrap()
        .starts_with("openai/"));
    assert!(batch["span"]["size"].as_u64().unwrap() >= 1);
    let retry = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("transient failure"))
        })
        .expect("a line about a task's retry");
    assert!(
        retry["span"]["task_id"].as_str().unwrap().starts_with('j'),
        "{retry}"
    );
}
