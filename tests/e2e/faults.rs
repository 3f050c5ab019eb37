//! Guarantees 1–3 under fire, against a real nats-server and the simulated
//! provider over HTTP: the `batchd` binary killed with SIGKILL, nats-server
//! restarted, the provider failing, throttling and stalling.

use crate::common;

use std::time::Duration;

use batchd::sim::{Fault, FaultKind, SimConfig};
use common::binary::Batchd;
use common::nats::NatsServer;
use common::CIRCUIT_OFF;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing_and_duplicates_nothing() {
    let nats = NatsServer::start().await;
    let sim = common::recording_sim().await;
    let (_dir, path, js) = common::binary_setup(&nats, &sim).await;
    let n = 3000;
    common::publish_many(&js, &common::tasks(n, "k")).await;

    let mut first = Batchd::start(&path);
    common::wait_for_count(&js, "BATCHD_RESULTS", 600).await;
    first.kill();
    let done_at_kill = common::read_all(&js, "BATCHD_RESULTS").await;
    assert!(
        done_at_kill.len() < n,
        "killed mid-run ({} of {n} done)",
        done_at_kill.len()
    );

    let _second = Batchd::start(&path);
    common::wait_for_one_outcome_each(&js, n, Duration::from_secs(120)).await;
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert_eq!(common::stream_len(&js, "BATCHD_RESULTS").await, n as u64);
    // A task whose outcome was stored before the kill was not sent again;
    // only tasks in flight at the kill (at most 3 × max_ack_pending) were.
    let sent = common::assert_finished_sent_once(&sim, &done_at_kill, n);
    let repeated: usize = sent.values().map(|c| c - 1).sum();
    assert!(repeated <= 3 * 500, "{repeated} repeated requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_cleanly() {
    let nats = NatsServer::start().await;
    let sim = common::start_sim(common::sim_latency(Duration::from_millis(30))).await;
    let (_dir, path, js) = common::binary_setup(&nats, &sim).await;
    let n = 2000;
    common::publish_many(&js, &common::tasks(n, "g")).await;

    let mut first = Batchd::start(&path);
    common::wait_for_count(&js, "BATCHD_RESULTS", 300).await;
    let status = first.terminate();
    assert!(status.success(), "graceful exit, got {status}");
    // Nothing was left half-done: every message still in the queue is unacked
    // and unclaimed, so the next run picks it up at once (no ack_wait).
    let done = common::stream_len(&js, "BATCHD_RESULTS").await;
    let left = common::stream_len(&js, "BATCHD_TASKS").await;
    assert_eq!(done + left, n as u64, "{done} done + {left} waiting");
    assert!(left > 0, "stopped mid-run");

    let _second = Batchd::start(&path);
    common::wait_for_one_outcome_each(&js, n, Duration::from_secs(60)).await;
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert_eq!(sim.stats().requests, n as u64, "no task was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_run_on_the_same_store_reconnects_and_finishes() {
    let mut stack = common::stack(common::sim_latency(Duration::from_millis(10)), "").await;
    let n = 3000;
    {
        let js = async_nats::jetstream::new(stack.nats.client().await);
        common::publish_many(&js, &common::tasks(n, "r")).await;
        common::wait_for_count(&js, "BATCHD_RESULTS", 500).await;
    }
    stack.nats.stop().await;
    stack.nats.restart().await;
    let js = async_nats::jetstream::new(stack.nats.client().await);
    common::wait_for_one_outcome_each(&js, n, Duration::from_secs(120)).await;
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(60)).await;
    assert!(stack.running.engine.is_running());
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_provider_costs_retries_not_tasks() {
    let flaky = SimConfig {
        error_rate: 0.3,
        seed: 7,
        ..SimConfig::default()
    };
    let stack = common::stack(flaky, "[retry]\nmax_attempts = 6\n").await;
    let js = &stack.js;
    let outcomes = common::run_tasks(js, 500, "f", Duration::from_secs(120)).await;
    let stats = stack.sim.stats();
    assert!(
        stats.server_errors > 50,
        "the provider failed {} times",
        stats.server_errors
    );
    let attempts: Vec<u64> = outcomes
        .values()
        .map(|v| v[0]["attempts"].as_u64().unwrap())
        .collect();
    let retried = attempts.iter().filter(|&&a| a > 1).count();
    assert!(retried > 0, "no task needed more than one attempt");
    // An attempt is spent only on a failed call; failures that land while
    // the route's circuit is open (a run of them in a row) spend none, so
    // how many tasks retried depends on timing, but never exceeds this.
    let extra: u64 = attempts.iter().map(|a| a.saturating_sub(1)).sum();
    assert!(
        extra <= stats.server_errors,
        "{extra} attempts beyond the first for {} failed calls",
        stats.server_errors
    );
    // With 6 attempts at a 30% failure rate nearly all succeed; any that did not
    // are max_retries with a dead letter.
    let failed: Vec<&Value> = outcomes
        .values()
        .map(|v| &v[0])
        .filter(|o| o["status"] == "failed")
        .collect();
    for o in &failed {
        assert_eq!(o["error"]["kind"], "max_retries");
    }
    assert_eq!(
        common::stream_len(js, "BATCHD_DLQ").await,
        failed.len() as u64
    );
    assert!(failed.len() < 5, "{} tasks failed", failed.len());
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_always_fails_yields_max_retries_and_dead_letters() {
    // The max_retries path: with the circuit breaker effectively off, every
    // 500 is a task's own transient failure and spends one of its attempts.
    // (With it on, the route opens after a few failures and tasks wait for
    // the provider instead; route_control proves that.)
    let failing = SimConfig {
        error_rate: 1.0,
        ..SimConfig::default()
    };
    let stack = common::stack(failing, CIRCUIT_OFF).await;
    let js = &stack.js;
    let n = 30;
    let outcomes = common::run_tasks(js, n, "x", Duration::from_secs(60)).await;
    for list in outcomes.values() {
        let o = &list[0];
        assert_eq!(o["error"]["kind"], "max_retries", "{o}");
        assert_eq!(o["attempts"], 4);
        assert_eq!(o["error"]["status_code"], 500);
    }
    let dead = common::wait_for_messages(js, "BATCHD_DLQ", n as u64, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), n);
    assert_eq!(
        stack.sim.stats().requests,
        4 * n as u64,
        "exactly max_attempts requests per task"
    );
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_provider_is_paced_and_every_task_succeeds() {
    let rpm = 600;
    let throttling = SimConfig {
        rpm,
        ..SimConfig::default()
    };
    let stack = common::stack(throttling, "").await;
    let js = &stack.js;
    // A full bucket of `rpm` at the start, then `rpm / 60` a second: the
    // provider cannot answer `n` calls with 200s in less than this.
    let n = 720;
    let least = Duration::from_secs_f64((n - rpm as usize) as f64 * 60.0 / f64::from(rpm));
    // One model: the simulator's limit is one bucket for every model, and a
    // route's budget is its model's.
    let tasks: Vec<(String, Value)> = common::tasks(n, "t")
        .into_iter()
        .map(|(subject, mut body)| {
            body["model"] = Value::from("gpt-4.1-nano");
            (subject, body)
        })
        .collect();
    let started = tokio::time::Instant::now();
    common::publish_many(js, &tasks).await;
    let outcomes = common::wait_for_one_outcome_each(js, n, Duration::from_secs(90)).await;
    let took = started.elapsed();
    for list in outcomes.values() {
        assert_eq!(list[0]["status"], "succeeded", "{}", list[0]);
        assert_eq!(list[0]["attempts"], 1, "a 429 costs no attempt");
    }
    // The route learned the limit from the headers and paced its calls:
    // the run lasted as long as the limit implies, with almost no 429s.
    let stats = stack.sim.stats();
    assert!(
        stats.rate_limited * 100 < stats.requests,
        "{} of {} requests answered 429",
        stats.rate_limited,
        stats.requests
    );
    assert!(took >= least, "{n} tasks at {rpm} rpm took {took:?}");
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_times_out_and_the_task_fails_cleanly() {
    // The timeout path of one task: with the circuit breaker effectively
    // off, each timeout spends an attempt (with it on, five timeouts in a row
    // open the route and its tasks wait instead).
    let stack = common::stack(
        common::sim_latency(Duration::from_secs(30)),
        &format!("{CIRCUIT_OFF}[dispatch]\nrequest_timeout_secs = 1\n[retry]\nmax_attempts = 2\n"),
    )
    .await;
    let js = &stack.js;
    let outcomes = common::run_tasks(js, 3, "s", Duration::from_secs(30)).await;
    for list in outcomes.values() {
        let o = &list[0];
        assert_eq!(o["error"]["kind"], "max_retries");
        assert_eq!(o["attempts"], 2);
        assert!(
            o["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no answer within"),
            "{o}"
        );
    }
    let dead = common::wait_for_messages(js, "BATCHD_DLQ", 3, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 3);
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_window_times_calls_out_spends_attempts_then_every_task_succeeds() {
    // Circuit off, as above: each timeout is the task's own and spends an
    // attempt. Calls made in the first 2 s get 30 s of extra latency and time
    // out after 1 s; with backoff under 0.4 s, a task's third call at the
    // latest lands after the window.
    let stack = common::stack(
        SimConfig::default(),
        &format!("{CIRCUIT_OFF}[dispatch]\nrequest_timeout_secs = 1\n"),
    )
    .await;
    let js = &stack.js;
    stack.sim.reset_clock();
    stack
        .sim
        .add_fault(Fault::new(
            FaultKind::Slow {
                extra: Duration::from_secs(30),
            },
            Duration::ZERO..Duration::from_secs(2),
        ))
        .expect("a valid fault");
    let outcomes = common::run_tasks(js, 6, "w", Duration::from_secs(30)).await;
    for list in outcomes.values() {
        let o = &list[0];
        assert_eq!(o["status"], "succeeded", "{o}");
        let attempts = o["attempts"].as_u64().unwrap();
        assert!((2..=3).contains(&attempts), "{o}");
    }
    assert_eq!(common::stream_len(js, "BATCHD_DLQ").await, 0);
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_stays_in_jetstream_not_in_memory() {
    let stack = common::stack(
        common::sim_latency(Duration::from_millis(20)),
        "[intake]\nmax_ack_pending = 50\n",
    )
    .await;
    let js = &stack.js;
    let n = 3000;
    common::publish_many(js, &common::tasks(n, "b")).await;
    let keeper = stack.running.engine.context().keeper.clone();
    let (mut most_held, mut largest_backlog) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog not finished"
        );
        most_held = most_held.max(keeper.held());
        let backlog = common::stream_len(js, "BATCHD_TASKS").await;
        largest_backlog = largest_backlog.max(backlog);
        if common::stream_len(js, "BATCHD_RESULTS").await == n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(largest_backlog > 1000, "the backlog was {largest_backlog}");
    assert!(most_held > 0);
    assert!(
        most_held <= 150,
        "{most_held} tasks held in memory; max_ack_pending allows 3 × 50"
    );
    stack.running.engine.shutdown().await;
}
