//! Route control against a real nats-server and the simulated provider over
//! HTTP: outages (503s and refused connections), a refused key, an exhausted
//! quota and an unknown model open a route's circuit, its tasks wait without
//! spending attempts or dead-lettering, and every one succeeds once the
//! provider is back; one route down does not slow another; deadlines still
//! expire; a second copy of a task is never sent.
//!
//! Faults are scripted on the simulator's clock. A fault that starts mid-run
//! is added at the simulator's current time once some tasks are done, so it
//! lands while the rest are queued or in flight however fast the machine is.

use crate::common;

use std::time::Duration;

use batchd::sim::{Fault, FaultKind, SimConfig, SimServer};
use serde_json::Value;
use tokio::time::Instant;

/// Adds `kind` for every model from the simulator's current time for `len`;
/// returns the window's end on its clock.
fn fault_from_now(sim: &SimServer, kind: FaultKind, len: Duration) -> Duration {
    let from = sim.clock();
    sim.add_fault(Fault::new(kind, from..from + len))
        .expect("a valid fault");
    from + len
}

/// Values of the gauge `name` on every line that carries all `labels`.
fn gauge_values(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// Whether `batchd_route_circuit_open` shows a route of `provider` open for
/// `reason`.
fn circuit_shown_open(
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    provider: &str,
    reason: &str,
) -> bool {
    let text = batchd::telemetry::render(metrics);
    gauge_values(
        &text,
        "batchd_route_circuit_open",
        &[("provider", provider), ("reason", reason)],
    )
    .contains(&1.0)
}

/// Whether `batchd_route_circuit_open` shows every route of `provider` closed.
fn circuits_shown_closed(
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    provider: &str,
) -> bool {
    let text = batchd::telemetry::render(metrics);
    let values = gauge_values(
        &text,
        "batchd_route_circuit_open",
        &[("provider", provider)],
    );
    !values.is_empty() && values.iter().all(|v| *v == 0.0)
}

/// One route-level fault in the middle of a run.
struct RouteDown {
    /// A provider name of the test's own, so the circuit gauges it reads are
    /// written by its engine only.
    provider: &'static str,
    kind: FaultKind,
    len: Duration,
    /// The `reason` the circuit shows.
    reason: &'static str,
    tasks: usize,
}

/// Runs `n` tasks, puts the provider down for the window once a tenth are
/// done, and checks that every task still succeeds exactly once, with no
/// dead letter, after the circuit was shown open; returns the outcomes.
async fn route_down_mid_run(down: RouteDown) -> Vec<Value> {
    let metrics = batchd::telemetry::recorder().expect("the metrics recorder");
    let stack = common::stack_as(
        down.provider,
        common::sim_latency(Duration::from_millis(200)),
        "",
    )
    .await;
    let (sim, js) = (&stack.sim, &stack.js);
    let n = down.tasks;
    common::publish_many(js, &common::tasks(n, "d")).await;
    common::wait_for_count(js, "BATCHD_RESULTS", n as u64 / 10).await;
    let until = fault_from_now(sim, down.kind, down.len);
    let waiting = n as u64 - common::stream_len(js, "BATCHD_RESULTS").await;
    assert!(waiting > 0, "the fault started before the run ended");

    let shown_by = Instant::now() + down.len;
    while !circuit_shown_open(&metrics, down.provider, down.reason) {
        assert!(
            Instant::now() < shown_by,
            "batchd_route_circuit_open{{reason=\"{}\"}} never showed 1",
            down.reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let outcomes =
        common::wait_for_one_outcome_each(js, n, down.len + Duration::from_secs(60)).await;
    assert!(
        sim.clock() >= until,
        "{waiting} tasks waiting when the fault started, all done before it ended"
    );
    let outcomes: Vec<Value> = outcomes.into_values().map(|mut v| v.remove(0)).collect();
    for o in &outcomes {
        assert_eq!(o["status"], "succeeded", "{o}");
    }
    common::wait_until_empty(js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert_eq!(
        common::stream_len(js, "BATCHD_DLQ").await,
        0,
        "no dead letter"
    );

    let cleared_by = Instant::now() + Duration::from_secs(5);
    while !circuits_shown_closed(&metrics, down.provider) {
        assert!(
            Instant::now() < cleared_by,
            "batchd_route_circuit_open still shows an open circuit after the run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.running.engine.shutdown().await;
    outcomes
}

/// Most tasks waited out the outage without spending an attempt: only
/// failures while the circuit was still closed (fewer than the threshold
/// in a row, between successes of calls sent before the outage) spent one.
fn assert_outage_spent_few_attempts(outcomes: &[Value]) {
    let retried = outcomes
        .iter()
        .filter(|o| o["attempts"].as_u64().unwrap_or(0) > 1)
        .count();
    assert!(
        retried < outcomes.len() / 4,
        "{retried} of {} tasks spent attempts in the outage",
        outcomes.len()
    );
}

/// A route-level failure (key, model, quota) spends no attempt at all.
fn assert_no_attempt_spent(outcomes: &[Value]) {
    for o in outcomes {
        assert_eq!(o["attempts"], 1, "{o}");
    }
}

const OUTAGE_503: FaultKind = FaultKind::Outage { status: 503 };

/// An outage of `secs` seconds in the middle of a run of `tasks`, shown as
/// `unavailable`: every task succeeds and few spend an attempt.
async fn outage_mid_run(provider: &'static str, kind: FaultKind, secs: u64, tasks: usize) {
    let outcomes = route_down_mid_run(RouteDown {
        provider,
        kind,
        len: Duration::from_secs(secs),
        reason: "unavailable",
        tasks,
    })
    .await;
    assert_outage_spent_few_attempts(&outcomes);
}

/// A route-level refusal of `secs` seconds, shown as `reason`, in the
/// middle of a run of 300 tasks: every task succeeds and none spends an
/// attempt.
async fn refusal_mid_run(provider: &'static str, kind: FaultKind, secs: u64, reason: &'static str) {
    let outcomes = route_down_mid_run(RouteDown {
        provider,
        kind,
        len: Duration::from_secs(secs),
        reason,
        tasks: 300,
    })
    .await;
    assert_no_attempt_spent(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_outage_of_503s_costs_no_task() {
    outage_mid_run("outage503short", OUTAGE_503, 10, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_outage_of_refused_connections_costs_no_task() {
    outage_mid_run("refusedshort", FaultKind::Refuse, 10, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60s_outage_of_503s_costs_no_task() {
    outage_mid_run("outage503long", OUTAGE_503, 60, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60s_outage_of_refused_connections_costs_no_task() {
    outage_mid_run("refusedlong", FaultKind::Refuse, 60, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_refused_for_30s_costs_no_attempt_and_no_dead_letter() {
    refusal_mid_run("keyrefused", FaultKind::Unauthorized, 30, "unauthorized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_quota_costs_no_attempt_and_no_dead_letter() {
    refusal_mid_run("quota", FaultKind::Quota, 10, "quota_exhausted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_not_found_for_a_while_costs_no_attempt_and_no_dead_letter() {
    refusal_mid_run(
        "modelmissing",
        FaultKind::ModelNotFound,
        10,
        "model_not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_random_5xx_gives_every_task_success() {
    // The default max_attempts: a task fails only if five calls in a row do
    // (5% ^ 5 per task).
    let flaky = SimConfig {
        error_rate: 0.05,
        seed: 11,
        latency: Duration::from_millis(10),
        ..SimConfig::default()
    };
    let stack = common::stack(flaky, "[retry]\nmax_attempts = 5\n").await;
    let js = &stack.js;
    let outcomes = common::run_tasks(js, 2000, "e", Duration::from_secs(80)).await;
    for list in outcomes.values() {
        assert_eq!(list[0]["status"], "succeeded", "{}", list[0]);
    }
    assert!(stack.sim.stats().server_errors > 0, "the provider failed");
    assert_eq!(common::stream_len(js, "BATCHD_DLQ").await, 0);
    stack.running.engine.shutdown().await;
}

/// A seed-shaped task sent to `model`.
fn task_for(id: &str, model: &str) -> (String, Value) {
    let mut body = common::task(id, 2);
    body["model"] = Value::from(model);
    ("batchd.tasks.p2".to_owned(), body)
}

/// Puts `gpt-4.1-nano` down for 60 s with `n_down` of its tasks queued at
/// priority 2 ahead of 200 for `gpt-4.1-mini`, under `max_ack_pending`:
/// the healthy model's tasks finish within seconds, during the outage, and
/// the others once it is over.
async fn one_model_down_for_60s(n_down: usize, max_ack_pending: usize) {
    let (down_model, up_model) = ("gpt-4.1-nano", "gpt-4.1-mini");
    let outage = Duration::from_secs(60);
    let stack = common::stack(
        common::sim_latency(Duration::from_millis(50)),
        &format!("[intake]\nmax_ack_pending = {max_ack_pending}\n"),
    )
    .await;
    let (sim, js) = (&stack.sim, &stack.js);
    sim.reset_clock();
    sim.add_fault(Fault::new(OUTAGE_503, Duration::ZERO..outage).for_model(down_model))
        .expect("a valid fault");
    let n_up = 200;
    let down: Vec<_> = (0..n_down)
        .map(|i| task_for(&format!("down{i}"), down_model))
        .collect();
    let up: Vec<_> = (0..n_up)
        .map(|i| task_for(&format!("up{i}"), up_model))
        .collect();
    common::publish_many(js, &down).await;
    let started = Instant::now();
    common::publish_many(js, &up).await;

    let healthy =
        common::wait_for_messages(js, "BATCHD_RESULTS", n_up as u64, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(sim.clock() < outage, "the outage still lasts");
    assert_eq!(healthy.len(), n_up);
    for (subject, list) in &healthy {
        assert!(subject.starts_with("batchd.results.up"), "{subject}");
        assert_eq!(list[0]["status"], "succeeded", "{}", list[0]);
        assert_eq!(list[0]["model"], up_model);
    }
    assert!(
        took < Duration::from_secs(10),
        "{n_up} healthy tasks took {took:?}"
    );

    let all =
        common::wait_for_one_outcome_each(js, n_down + n_up, outage + Duration::from_secs(30))
            .await;
    assert!(sim.clock() >= outage);
    for list in all.values() {
        assert_eq!(list[0]["status"], "succeeded", "{}", list[0]);
    }
    assert_eq!(common::stream_len(js, "BATCHD_DLQ").await, 0);
    let stats = sim.model_stats();
    assert_eq!(stats[up_model].unavailable, 0);
    assert!(stats[down_model].unavailable > 0);
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_model_down_for_60s_does_not_slow_another() {
    one_model_down_for_60s(80, 100).await;
}

/// More tasks of the down model than `max_ack_pending`, queued ahead of the
/// healthy ones: the down route's tasks are requeued at the back, so the
/// window of messages in flight keeps moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_model_down_for_60s_does_not_slow_another_behind_a_backlog() {
    one_model_down_for_60s(150, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_while_the_circuit_is_open_expires_the_task() {
    let stack = common::stack(SimConfig::default(), "").await;
    let (sim, js) = (&stack.sim, &stack.js);
    let model = "gpt-4.1-nano";
    sim.reset_clock();
    sim.add_fault(Fault::new(
        FaultKind::Unauthorized,
        Duration::ZERO..Duration::from_secs(8),
    ))
    .expect("a valid fault");
    let (_, mut late) = task_for("late", model);
    late["deadline"] = Value::from(
        (chrono::Utc::now() + chrono::TimeDelta::seconds(3))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    let (subject, patient) = task_for("patient", model);
    common::publish_many(js, &[(subject.clone(), late), (subject, patient)]).await;

    // The task without a deadline succeeds once the key works again; by then
    // the other has had its one outcome.
    let outcomes = common::wait_for_one_outcome_each(js, 2, Duration::from_secs(30)).await;
    let late = &outcomes["batchd.results.late"][0];
    assert_eq!(late["status"], "failed", "{late}");
    assert_eq!(late["error"]["kind"], "expired", "{late}");
    let patient = &outcomes["batchd.results.patient"][0];
    assert_eq!(patient["status"], "succeeded", "{patient}");
    assert_eq!(patient["attempts"], 1);
    assert!(sim.clock() >= Duration::from_secs(8));
    common::wait_until_empty(js, "BATCHD_TASKS", Duration::from_secs(10)).await;
    let dead = common::read_all(js, "BATCHD_DLQ").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead["batchd.dlq.late"].len(), 1);
    assert_eq!(common::stream_len(js, "BATCHD_RESULTS").await, 2);
    stack.running.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_of_a_slow_task_is_never_sent_and_never_answered() {
    // Slower than ack_wait (4 s), so the held copy's heartbeat matters too.
    let stack = common::stack(common::sim_latency(Duration::from_secs(5)), "").await;
    let js = &stack.js;
    let (subject, body) = task_for("twice", "gpt-4.1-nano");
    let bytes = serde_json::to_vec(&body).expect("json");
    for msg_id in ["twice-a", "twice-b"] {
        common::publish(
            js,
            &subject,
            bytes.clone(),
            Some("application/json"),
            Some(msg_id),
        )
        .await;
    }
    assert_eq!(common::stream_len(js, "BATCHD_TASKS").await, 2);
    let outcomes =
        common::wait_for_messages(js, "BATCHD_RESULTS", 1, Duration::from_secs(30)).await;
    // Both copies settled: the second found the first's outcome.
    common::wait_until_empty(js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert_eq!(common::stream_len(js, "BATCHD_RESULTS").await, 1);
    let o = &outcomes["batchd.results.twice"][0];
    assert_eq!(o["status"], "succeeded", "{o}");
    assert_eq!(o["attempts"], 1);
    assert_eq!(
        stack.sim.stats().requests,
        1,
        "the provider was called once"
    );
    stack.running.engine.shutdown().await;
}
