//! End to end: `batchd demo` as a newcomer runs it, against a NATS server
//! that is not its own: it must finish, print the report with the right
//! counts, and leave nothing behind on that server.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::nats::NatsServer;
use futures::StreamExt;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_600_tasks_on_a_shared_server_reports_them_and_cleans_up() {
    let nats = NatsServer::start().await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["demo", "--tasks", "600", "--nats-url", &nats.url()])
        .args(["--metrics-addr", "127.0.0.1:0", "--timeout-secs", "50"])
        .env("RUST_LOG", "warn")
        .env_remove("BATCHD_NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start batchd demo");
    let output = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("batchd demo did not finish within {TIMEOUT:?}"))
        .expect("wait for batchd demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    // The header says what runs where.
    assert!(
        stdout.contains(&format!("NATS      {}", nats.url())),
        "{context}"
    );
    assert!(stdout.contains("(existing server)"), "{context}");
    assert!(stdout.contains("/metrics"), "{context}");
    assert!(stdout.contains("7 bad inputs"), "{context}");

    // Every task got its outcome: 600 unique tasks, 7 of them bad.
    assert!(
        stdout.contains("All 600 outcomes arrived; the engine has stopped."),
        "{context}"
    );
    assert!(stdout.contains("  600 outcomes in "), "{context}");
    for section in [
        "Throughput",
        "Latency by priority (ms, publish to outcome)",
        "Outcomes",
        "Tokens and cost by model (USD)",
        "Failed tasks (7)",
        "Notes",
    ] {
        assert!(
            stdout.contains(&format!("\n{section}\n")),
            "missing {section}\n{context}"
        );
    }
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` row\n{context}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // priority  tasks  ok  failed  ...
    let all = row("all ");
    assert_eq!(all[1], "600", "{context}");
    assert_eq!(all[3], "7", "{context}");
    assert_eq!(row("failed ")[1..3], ["invalid_request", "7"], "{context}");
    assert_eq!(row("succeeded ")[2], "593", "{context}");
    assert_eq!(row("dead letters")[2], "7", "{context}");
    let total = row("total ");
    assert_eq!(total[1], "593", "{context}");
    assert!(
        total[5].starts_with('$') && total[5] != "$0.000000",
        "{context}"
    );
    assert!(
        stdout.contains("3 duplicate publishes (same Nats-Msg-Id) were dropped by JetStream"),
        "{context}"
    );
    assert!(stdout.contains("were removed"), "{context}");

    // Nothing is left on the server: no streams, so no buckets either.
    let js = async_nats::jetstream::new(nats.client().await);
    let streams: Vec<String> = js
        .stream_names()
        .map(|n| n.expect("stream name"))
        .collect()
        .await;
    assert!(streams.is_empty(), "left behind: {streams:?}");
}
