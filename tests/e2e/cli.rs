//! The `batchd` binary as an operator meets it: failing fast on an
//! unreachable NATS or a bad config, and serving every protocol metric.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use batchd::sim::{SimConfig, SimServer};
use common::nats::NatsServer;

fn batchd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_batchd"));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs `batchd run` against NATS on `port`, asserts it fails, returns stderr.
fn run_refused(port: u16) -> String {
    let out = batchd()
        .args(["run", "--nats-url", &format!("nats://127.0.0.1:{port}")])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "batchd run should refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_fails_fast_with_a_clear_message_when_nats_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let err = run_refused(port);
    assert!(err.contains("cannot reach NATS"), "{err}");
    assert!(
        err.contains("nats-server -js"),
        "says how to start one: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn run_refuses_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[batching.p2]\nmax_size = 0\n").unwrap();
    let out = batchd()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("batching.p2.max_size"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_every_protocol_metric_with_histogram_buckets() {
    let nats = NatsServer::start().await;
    let sim = SimServer::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let (_dir, path, js) = common::binary_setup(&nats, &sim).await;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let p = [1, 2, 3][i % 3];
            (
                format!("batchd.tasks.p{p}"),
                common::task(&format!("m{i}"), p as u8),
            )
        })
        .collect();
    common::publish_many(&js, &tasks).await;
    common::publish(&js, "batchd.tasks.p2", b"not json".to_vec(), None, None).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["run", "--config"])
        .arg(&path)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_messages(&js, "BATCHD_RESULTS", 31, Duration::from_secs(60)).await;

    let url = format!("http://127.0.0.1:{port}/metrics");
    let names = [
        "batchd_queue_depth{priority=\"1\"}",
        "batchd_oldest_task_age_seconds{priority=\"3\"}",
        "batchd_tasks_received_total{priority=\"2\"}",
        "batchd_tasks_completed_total{",
        "batchd_task_queue_seconds_bucket{",
        "batchd_task_latency_seconds_bucket{",
        "batchd_batch_size_bucket{",
        "batchd_batch_fill_ratio_bucket{",
        "batchd_provider_requests_total{",
        "batchd_provider_request_seconds_bucket{",
        "batchd_dead_letters_total{reason=\"invalid_request\"} 1",
        "batchd_cost_usd_total{",
        "batchd_tokens_total{",
        "# TYPE batchd_cost_usd_total counter",
        "# TYPE batchd_task_latency_seconds histogram",
        "batchd_preemptions_total{priority=\"3\"} 0",
        "batchd_checkpoints_total 0",
        "batchd_preempted_batches 0",
    ];
    // The exporter may lag the last outcome by a moment: poll until complete.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if names.iter().all(|n| text.contains(n)) || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    for name in names {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
    assert!(
        text.contains("batchd_tasks_completed_total{priority=\"1\",status=\"succeeded\",model="),
        "{text}"
    );
}

/// A server that speaks just enough of the NATS protocol to introduce itself
/// as `version` (the INFO line, then PONG to every PING).
fn fake_nats_server(version: &'static str) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut out = stream.try_clone().unwrap();
                let info = format!(
                    "INFO {{\"server_id\":\"FAKE\",\"server_name\":\"fake\",\"version\":\"{version}\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\"max_payload\":1048576,\"jetstream\":true}}\r\n"
                );
                if out.write_all(info.as_bytes()).is_err() {
                    return;
                }
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if line.starts_with("PING") && out.write_all(b"PONG\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn run_refuses_a_nats_server_too_old_naming_its_version() {
    let port = fake_nats_server("2.9.10");
    let err = run_refused(port);
    assert!(err.contains("nats-server 2.9.10"), "{err}");
    assert!(err.contains("too old"), "{err}");
    assert!(err.contains("2.10 or newer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_bound_the_server_cannot_reserve_is_refused_naming_the_key() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // 1 PiB: more JetStream store than any test machine has.
    let path = common::config_file(
        dir.path(),
        &nats.url(),
        "http://127.0.0.1:9/v1",
        "[nats]\ntasks_max_bytes = 1_125_899_906_842_624\n",
    );
    let out = batchd()
        .args(["run", "--metrics-addr", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "batchd run should refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10047"), "{err}");
    assert!(
        err.contains("nats.tasks_max_bytes = 1125899906842624"),
        "{err}"
    );
    assert!(err.contains("max_file_store"), "{err}");
}
