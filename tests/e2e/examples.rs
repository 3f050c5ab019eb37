//! The programs in `examples/`, run against a real batchd so the README's
//! examples cannot rot: the Python producer/consumer (nats-py), the Rust one
//! (async-nats), and an OpenAI Batch file round trip with `batchd submit`.

use crate::common;

use std::process::Command;

use batchd::sim::SimConfig;
use common::prometheus::{repo, tool};

fn assert_success(what: &str, out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_runs_against_a_real_batchd() {
    let common::Stack {
        running,
        nats,
        sim: _sim,
        js: _js,
    } = common::stack(SimConfig::default(), "").await;
    let url = nats.url();

    // Rust, built by `cargo test` with the other targets (built here if not).
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/rust_client");
    if !example.exists() {
        let out = Command::new(env!("CARGO"))
            .args(["build", "--example", "rust_client"])
            .current_dir(repo())
            .output()
            .unwrap();
        assert_success("cargo build --example rust_client", out);
    }
    let out = Command::new(&example)
        .args([url.as_str(), "6"])
        .output()
        .unwrap();
    let text = assert_success("examples/rust_client.rs", out);
    assert!(text.contains("6 succeeded, 0 failed"), "{text}");

    // OpenAI Batch file in, OpenAI Batch output file out.
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("output.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .arg("submit")
        .arg(repo().join("examples/openai_batch/input.jsonl"))
        .args(["--nats-url", &url, "--wait", "--out"])
        .arg(&output)
        .output()
        .unwrap();
    assert_success("batchd submit", out);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["req-1", "req-2", "req-3"]);
    for l in &lines {
        assert_eq!(l["response"]["status_code"], 200, "{l}");
    }

    // Python, when python3 and nats-py are there (`.ci/run` installs nats-py).
    if let Some(python) = tool("python3") {
        let has_nats = Command::new(&python)
            .args(["-c", "import nats"])
            .status()
            .is_ok_and(|s| s.success());
        if has_nats {
            let out = Command::new(&python)
                .arg(repo().join("examples/python/producer_consumer.py"))
                .args(["--nats-url", &url, "--tasks", "6"])
                .output()
                .unwrap();
            let text = assert_success("examples/python/producer_consumer.py", out);
            assert!(text.contains("6 succeeded, 0 failed"), "{text}");
        } else {
            assert!(
                std::env::var_os("BATCHD_REQUIRE_TOOLS").is_none(),
                "nats-py is required (BATCHD_REQUIRE_TOOLS is set)"
            );
            eprintln!("SKIPPED: the Python example needs nats-py (pip install nats-py)");
        }
    }
    running.engine.shutdown().await;
}
