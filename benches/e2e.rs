//! The end-to-end benchmark: `cargo bench --bench e2e`.
//!
//! Runs `batchd bench` in-process: the raw JetStream floor, then batchd with
//! an instant provider and with the simulated provider over HTTP, each on a
//! private nats-server, and prints the table. `BATCHD_BENCH_TASKS` sets the
//! tasks per phase (default 20000).
//!
//! `cargo bench` passes `--bench`; without it (`cargo test --all-targets`)
//! this is a 200-task smoke run, so tests stay fast.

use std::time::Duration;

use batchd::cmd::bench::{BenchArgs, CapacitySetting, BAR};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    // `cargo bench -- FILTER` passes FILTER to every bench target.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "e2e".contains(f.as_str())) {
        return;
    }
    let tasks = if benching {
        match std::env::var("BATCHD_BENCH_TASKS") {
            Ok(v) => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("BATCHD_BENCH_TASKS={v:?} is not a number")),
            Err(_) => 20_000,
        }
    } else {
        eprintln!("e2e: smoke run (200 tasks); `cargo bench --bench e2e` measures");
        200
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime
        .block_on(batchd::cmd::bench::run(BenchArgs {
            tasks: Some(tasks),
            nats_url: None,
            timeout: 600,
            capacity: false,
            capacity_secs: 180,
            capacity_sims: CapacitySetting::BAR.to_vec(),
            capacity_replicas: 1,
            backlog: false,
            backlog_sizes: Vec::new(),
            backlog_secs: 30,
            preemption: false,
            preemption_sim: CapacitySetting {
                rpm: 1200,
                latency_ms: 300,
            },
            preemption_bulk: 50_000,
            preemption_warmup_secs: 30,
            preemption_secs: 60,
            preemption_rate: 5.0,
            replicas: false,
            replica_counts: Vec::new(),
            cost: false,
            cost_seed: 42,
            batch_secs: 5.0,
            routing: false,
            routing_near_share: 0.33,
        }))
        .unwrap_or_else(|e| panic!("the end-to-end benchmark failed: {e:#}"));
    runtime.shutdown_timeout(Duration::from_secs(5));
    if benching && !report.meets_bar() {
        eprintln!(
            "note: (b)/(a) = {:.2}, below the bar of {BAR}",
            report.instant_ratio()
        );
    }
}
