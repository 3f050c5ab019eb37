//! When work is sent: batch size following queue depth, off-peak windows,
//! and deadlines that pass at intake or in a batch. In-memory fakes (see
//! `support`), paused tokio time, and a wall clock that follows it.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use batchd_actors::batching::{BatchPolicy, DepthStep};
use batchd_actors::clock::Clock;
use batchd_actors::offpeak::OffPeak;
use batchd_actors::task::Priority;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::{ok, rig, settings, task, until, FakeProvider, Rig};
use tokio::time::Instant;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn with_deadline(id: &str, deadline: DateTime<Utc>) -> Value {
    json!({"task_id": id, "type": "echo", "payload": {"text": id}, "deadline": deadline.to_rfc3339()})
}

/// Tasks per batch among the outcomes of `ids`, largest first.
fn batch_sizes(r: &Rig, ids: &[String]) -> Vec<usize> {
    let mut by_batch: HashMap<String, usize> = HashMap::new();
    for id in ids {
        let o = r.sink.outcome(id).unwrap();
        *by_batch
            .entry(o["batch_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let mut sizes: Vec<usize> = by_batch.into_values().collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
}

/// Sets the p3 depth the source reports, waits until the engine has sampled
/// it, publishes `n` p3 tasks and waits for their outcomes: the sizes of
/// their batches, largest first, and when they were published.
async fn batches_at_depth(r: &Rig, depth: u64, n: usize, prefix: &str) -> (Vec<usize>, Instant) {
    r.source.set_depth(Priority::P3, depth);
    let ctx = r.engine.context().clone();
    until(Duration::from_secs(1), || {
        ctx.depths.get(Priority::P3) == depth
    })
    .await;
    let start = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{depth}-{i}")).collect();
    for id in &ids {
        r.source.publish(Priority::P3, task(id, "x"));
    }
    until(Duration::from_secs(10), || {
        ids.iter().all(|id| r.sink.outcome(id).is_some())
    })
    .await;
    (batch_sizes(r, &ids), start)
}

/// Runs the engine in steps of `step` of virtual time until `done` holds.
async fn until_by(step: Duration, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "not reached within {limit:?}");
        tokio::time::sleep(step).await;
    }
}

#[tokio::test(start_paused = true)]
async fn batches_grow_with_queue_depth_and_their_wait_stays_bounded() {
    let mut s = settings();
    s.batching[Priority::P3.index()] = BatchPolicy {
        max_size: 20,
        max_wait_ms: 1000,
        seal_when_drained: true,
        depth_steps: vec![
            DepthStep {
                above: 1_000,
                size: 50,
            },
            DepthStep {
                above: 10_000,
                size: 100,
            },
        ],
    };
    s.backlog_interval = Duration::from_millis(100);
    let r = rig(s, FakeProvider::new(Duration::ZERO, |_| ok())).await;
    for (depth, size) in [(0, 20), (5_000, 50), (20_000, 100), (500, 20)] {
        let (sizes, _) = batches_at_depth(&r, depth, 200, "d").await;
        assert_eq!(sizes, vec![size; 200 / size], "batches at depth {depth}");
    }
    // A deep queue aims for 100, but 30 tasks still leave after max_wait.
    let calls_before = r.provider.calls().len();
    let (sizes, start) = batches_at_depth(&r, 20_000, 30, "few").await;
    assert_eq!(sizes, vec![30]);
    for (_, sent) in &r.provider.calls()[calls_before..] {
        let waited = *sent - start;
        assert!(
            waited >= Duration::from_millis(1000) && waited < Duration::from_millis(1100),
            "sent after {waited:?}: max_wait bounds a large batch's wait"
        );
    }
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bulk_work_waits_in_jetstream_for_its_off_peak_window_unless_its_deadline_cannot() {
    let now = at("2026-03-01T23:00:00Z");
    let mut s = settings();
    s.clock = Clock::following_tokio(now);
    s.offpeak = OffPeak {
        windows: vec!["00:00-06:00".parse().unwrap()],
        price_multiplier: 0.5,
        ..OffPeak::default()
    };
    let r = rig(s, FakeProvider::new(Duration::ZERO, |_| ok())).await;
    r.source.publish(Priority::P3, task("night", "night"));
    r.source.publish(
        Priority::P3,
        with_deadline("urgent", at("2026-03-01T23:40:00Z")),
    );
    r.source.publish(Priority::P2, task("standard", "standard"));
    until(Duration::from_secs(5), || r.sink.outcome_count() == 2).await;
    assert!(
        r.sink.outcome("urgent").is_some(),
        "its deadline can't wait"
    );
    assert!(r.sink.outcome("standard").is_some(), "p2 has no window");
    // The bulk task went back to JetStream: not held, not sent.
    assert_eq!(r.source.naks(), 1);
    until_by(
        Duration::from_secs(60),
        Duration::from_secs(50 * 60),
        || r.engine.context().keeper.held() == 0,
    )
    .await;
    assert!(r.sink.outcome("night").is_none());
    assert!(!r.provider.calls().iter().any(|(text, _)| text == "night"));
    // Midnight: the window opens and the task comes back.
    until_by(
        Duration::from_secs(60),
        Duration::from_secs(2 * 3600),
        || r.sink.outcome("night").is_some(),
    )
    .await;
    let (_, sent) = r
        .provider
        .calls()
        .into_iter()
        .find(|(text, _)| text == "night")
        .unwrap();
    let sent_at = r.engine.context().settings.clock.now() - (Instant::now() - sent);
    assert!(
        sent_at >= at("2026-03-02T00:00:00Z"),
        "sent at {sent_at}, before the window"
    );
    let night = r.sink.outcome("night").unwrap();
    assert_eq!(night["status"], "succeeded");
    // 1000 input at $1/M + 100 output at $2/M, at the off-peak multiplier.
    assert!((night["cost_usd"].as_f64().unwrap() - 0.0006).abs() < 1e-12);
    let urgent = r.sink.outcome("urgent").unwrap();
    assert!((urgent["cost_usd"].as_f64().unwrap() - 0.0012).abs() < 1e-12);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_passes_while_the_task_waits_in_a_batch_expires_it_at_seal() {
    let now = at("2026-03-01T12:00:00Z");
    let mut s = settings();
    s.clock = Clock::following_tokio(now);
    let r = rig(s, FakeProvider::new(Duration::ZERO, |_| ok())).await;
    // p3 batches wait up to 1 s for company; this deadline is in 0.5 s.
    r.source.publish(
        Priority::P3,
        with_deadline("soon", now + chrono::Duration::milliseconds(500)),
    );
    r.source.publish(Priority::P3, task("patient", "patient"));
    until(Duration::from_secs(5), || r.sink.outcome_count() == 2).await;
    let soon = r.sink.outcome("soon").unwrap();
    assert_eq!(soon["status"], "failed");
    assert_eq!(soon["error"]["kind"], "expired");
    assert!(
        soon["error"]["message"].as_str().unwrap().contains("batch"),
        "{soon}"
    );
    assert!(r.sink.dead.lock().unwrap().contains_key("soon"));
    assert_eq!(r.sink.outcome("patient").unwrap()["status"], "succeeded");
    assert_eq!(
        r.provider.calls().len(),
        1,
        "the expired task is never sent"
    );
    assert_eq!(r.source.acks().len(), 2);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_past_its_deadline_by_the_engine_clock_expires_at_intake() {
    let mut s = settings();
    s.clock = Clock::following_tokio(at("2026-03-01T12:00:00Z"));
    let r = rig(s, FakeProvider::new(Duration::ZERO, |_| ok())).await;
    r.source.publish(
        Priority::P1,
        with_deadline("gone", at("2026-03-01T11:59:00Z")),
    );
    until(Duration::from_secs(5), || r.sink.outcome_count() == 1).await;
    let o = r.sink.outcome("gone").unwrap();
    assert_eq!(o["error"]["kind"], "expired");
    assert!(r.provider.calls().is_empty());
    r.engine.shutdown().await;
}
