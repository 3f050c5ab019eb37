//! Everything at once, in one run of the `batchd` binary against a real
//! nats-server and the simulated provider over HTTP: 5% random 5xx, 429
//! storms, a 10 s outage, batchd killed with SIGKILL and restarted, and
//! nats-server restarted on the same store. Every task still gets exactly
//! one outcome, none is given up, and the provider answers at most one
//! billed call per task plus those in flight at the kill.
//!
//! The faults and the restarts are triggered by progress (a number of
//! outcomes stored), so each lands mid-run however fast the machine is.

use crate::common;

use std::time::Duration;

use async_nats::jetstream;
use batchd::sim::{Fault, FaultKind, SimConfig, SimServer};
use common::binary::Batchd;
use common::nats::NatsServer;

/// A route's concurrency ceiling in this run, which bounds the calls in
/// flight at the kill.
const MAX_CONCURRENCY: u64 = 16;
/// Routes the seed-shaped tasks use (the three tiers' models).
const ROUTES: u64 = 3;

/// Adds `kind` for every model from the simulator's current time for `len`.
fn fault_from_now(sim: &SimServer, kind: FaultKind, len: Duration) {
    let from = sim.clock();
    sim.add_fault(Fault::new(kind, from..from + len))
        .expect("a valid fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_5xx_429_storms_an_outage_sigkill_and_a_nats_restart_cost_no_task() {
    let mut nats = NatsServer::start().await;
    let sim = SimServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimConfig {
            latency: Duration::from_millis(200),
            jitter: Duration::from_millis(50),
            error_rate: 0.05,
            seed: 7,
            ..SimConfig::default()
        },
    )
    .await
    .expect("start the simulator");
    // Six attempts: a task fails only if six calls in a row do (5% ^ 6).
    let extra =
        format!("[retry]\nmax_attempts = 6\n[dispatch]\nmax_concurrency = {MAX_CONCURRENCY}\n");
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, &extra).await;
    let n = 3000;
    common::publish_many(&js, &common::tasks(n, "c")).await;

    let storm = FaultKind::RateLimitStorm {
        retry_after: Duration::from_secs(1),
    };
    fault_from_now(&sim, storm, Duration::from_secs(2));
    let mut first = Batchd::start(&path);
    common::wait_for_count(&js, "BATCHD_RESULTS", 400).await;
    first.kill();
    let done_at_kill = common::stream_len(&js, "BATCHD_RESULTS").await;
    assert!(done_at_kill < n as u64, "killed mid-run");
    let _second = Batchd::start(&path);

    common::wait_for_count(&js, "BATCHD_RESULTS", 800).await;
    fault_from_now(
        &sim,
        FaultKind::Outage { status: 503 },
        Duration::from_secs(10),
    );
    common::wait_for_count(&js, "BATCHD_RESULTS", 1600).await;
    nats.restart().await;
    let js = jetstream::new(nats.client().await);
    common::wait_for_count(&js, "BATCHD_RESULTS", 2200).await;
    fault_from_now(&sim, storm, Duration::from_secs(3));

    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", n as u64, Duration::from_secs(90)).await;
    common::assert_exactly_one_each(&outcomes, n);
    for list in outcomes.values() {
        assert_eq!(list[0]["status"], "succeeded", "{}", list[0]);
    }
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert_eq!(common::stream_len(&js, "BATCHD_RESULTS").await, n as u64);
    assert_eq!(common::stream_len(&js, "BATCHD_DLQ").await, 0);

    let stats = sim.stats();
    assert!(stats.server_errors > 0, "random 5xx: {stats:?}");
    assert!(stats.rate_limited > 0, "429 storms: {stats:?}");
    assert!(stats.unavailable > 0, "the outage: {stats:?}");
    // A billed call is one answered 200. Beyond one per task, only calls in
    // flight at the kill (at most the routes' ceilings, plus a probe each)
    // were answered twice.
    let in_flight_at_kill = ROUTES * (MAX_CONCURRENCY + 1);
    assert!(
        stats.succeeded <= n as u64 + in_flight_at_kill,
        "{} calls answered 200 for {n} tasks",
        stats.succeeded
    );
}
