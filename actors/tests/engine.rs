//! The engine against in-memory fakes (see `support`) under paused tokio
//! time. Deterministic: no sleeps, no real clocks.

mod support;

use std::time::Duration;

use batchd_actors::batching::BatchPolicy;
use batchd_actors::messages::ActorKind;
use batchd_actors::settings::RestartPolicy;
use batchd_actors::task::Priority;
use batchd_actors::EngineError;
use serde_json::{json, Value};
use support::{
    failing, failing_once, healthy, ok, rate_limited, rejected, rig, settings, task, transient,
    until, FakeProvider,
};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn every_task_gets_one_outcome_and_one_ack() {
    let r = rig(settings(), healthy(Duration::from_millis(5))).await;
    for i in 0..100 {
        let p = Priority::ALL[i % 3];
        r.source.publish(p, task(&format!("t{i}"), "x"));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 100).await;
    assert_eq!(r.sink.outcome_count(), 100);
    assert_eq!(r.sink.max_copies(), 1);
    let o = r.sink.outcome("t7").unwrap();
    assert_eq!(o["status"], "succeeded");
    // 1000 input at $1/M + 100 output at $2/M
    assert!((o["cost_usd"].as_f64().unwrap() - 0.0012).abs() < 1e-12);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_seals_when_its_max_wait_elapses() {
    let r = rig(settings(), healthy(Duration::ZERO)).await;
    let start = Instant::now();
    for i in 0..3 {
        r.source.publish(Priority::P3, task(&format!("w{i}"), "x"));
    }
    until(Duration::from_secs(5), || r.sink.outcome_count() == 3).await;
    let calls = r.provider.calls();
    assert_eq!(calls.len(), 3);
    for (_, at) in &calls {
        let waited = *at - start;
        assert!(
            waited >= Duration::from_millis(1000),
            "sent after {waited:?}, before max_wait"
        );
        assert!(
            waited < Duration::from_millis(1100),
            "sent after {waited:?}"
        );
    }
    let ids: Vec<Value> = (0..3)
        .map(|i| r.sink.outcome(&format!("w{i}")).unwrap()["batch_id"].clone())
        .collect();
    assert!(ids.iter().all(|b| *b == ids[0]), "one batch: {ids:?}");
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_seals_at_once() {
    let mut s = settings();
    s.batching[2] = BatchPolicy {
        max_size: 4,
        max_wait_ms: 60_000,
        seal_when_drained: true,
        depth_steps: Vec::new(),
    };
    let r = rig(s, healthy(Duration::ZERO)).await;
    let start = Instant::now();
    for i in 0..4 {
        r.source.publish(Priority::P3, task(&format!("f{i}"), "x"));
    }
    until(Duration::from_secs(5), || r.sink.outcome_count() == 4).await;
    assert!(Instant::now() - start < Duration::from_secs(1));
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_rejected_task_does_not_fail_its_batch() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::ZERO, |req| {
            if req["messages"][1]["content"] == "bad" {
                Err(rejected(400, "nope"))
            } else {
                ok()
            }
        }),
    )
    .await;
    for (i, text) in ["a", "bad", "c", "d"].iter().enumerate() {
        r.source.publish(Priority::P1, task(&format!("r{i}"), text));
    }
    until(Duration::from_secs(5), || r.source.acks().len() == 4).await;
    let bad = r.sink.outcome("r1").unwrap();
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["error"]["kind"], "provider_rejected");
    assert_eq!(bad["error"]["status_code"], 400);
    assert!(r.sink.dead.lock().unwrap().contains_key("r1"));
    for id in ["r0", "r2", "r3"] {
        assert_eq!(r.sink.outcome(id).unwrap()["status"], "succeeded");
    }
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_until_attempts_run_out() {
    let r = rig(settings(), failing(Duration::ZERO, transient(503, "down"))).await;
    r.source.publish(Priority::P2, task("flaky", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 1).await;
    let o = r.sink.outcome("flaky").unwrap();
    assert_eq!(o["error"]["kind"], "max_retries");
    assert_eq!(o["attempts"], 3);
    assert_eq!(r.provider.calls().len(), 3, "max_attempts = 3");
    assert_eq!(
        r.source.naks(),
        0,
        "retries wait in the RetryScheduler, not in JetStream"
    );
    assert_eq!(
        r.sink.dead.lock().unwrap()["flaky"][0]["error"]["kind"],
        "max_retries"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_then_success_succeeds_on_the_second_attempt() {
    let r = rig(settings(), failing_once(transient(500, "oops"))).await;
    r.source.publish(Priority::P1, task("once", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 1).await;
    let o = r.sink.outcome("once").unwrap();
    assert_eq!(o["status"], "succeeded");
    assert_eq!(o["attempts"], 2);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_route_waits_out_retry_after_in_place() {
    let r = rig(
        settings(),
        failing_once(rate_limited(Duration::from_secs(7))),
    )
    .await;
    let start = Instant::now();
    r.source.publish(Priority::P1, task("rl", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 1).await;
    assert!(
        Instant::now() - start >= Duration::from_secs(7),
        "Retry-After honoured"
    );
    let o = r.sink.outcome("rl").unwrap();
    assert_eq!(o["status"], "succeeded");
    assert_eq!(o["attempts"], 1, "a 429 does not spend an attempt");
    assert_eq!(r.source.naks(), 0);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_whose_outcome_exists_is_acked_without_calling_the_provider() {
    let r = rig(settings(), healthy(Duration::ZERO)).await;
    r.sink
        .outcomes
        .lock()
        .unwrap()
        .insert("done".into(), vec![json!({"status": "succeeded"})]);
    r.source.publish(Priority::P1, task("done", "x"));
    until(Duration::from_secs(5), || {
        r.source.acks() == vec!["done".to_owned()]
    })
    .await;
    assert!(r.provider.calls().is_empty());
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_copies_of_one_task_call_the_provider_once() {
    let r = rig(settings(), healthy(Duration::from_millis(500))).await;
    r.source.publish(Priority::P1, task("twin", "x"));
    r.source.publish(Priority::P1, task("twin", "x"));
    until(Duration::from_secs(10), || r.source.acks().len() == 2).await;
    assert_eq!(r.provider.calls().len(), 1);
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_tasks_get_an_outcome_and_a_dead_letter_while_good_ones_flow() {
    let r = rig(settings(), healthy(Duration::ZERO)).await;
    r.source.publish(
        Priority::P2,
        json!({"task_id": "u1", "type": "poem", "payload": {"text": "x"}}),
    );
    r.source.publish(
        Priority::P2,
        json!({"task_id": "u2", "type": "echo", "payload": {"text": "x"}, "priority": 3}),
    );
    r.source
        .publish(Priority::P2, json!({"payload": {"text": "x"}}));
    r.source.publish(Priority::P2, task("good", "x"));
    until(Duration::from_secs(5), || r.source.acks().len() == 4).await;
    assert!(r.sink.outcome("u1").unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown task type"));
    assert!(r.sink.outcome("u2").unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("p2 subject"));
    let id = {
        let dead = r.sink.dead.lock().unwrap();
        let id = dead
            .keys()
            .find(|k| k.starts_with("invalid~p2~3~"))
            .expect("synthetic id for a task without one")
            .clone();
        assert_eq!(dead[&id][0]["subject"], "batchd.tasks.p2");
        id
    };
    let unreadable = r.sink.outcome(&id).expect("its outcome");
    assert_eq!(unreadable["error"]["kind"], "invalid_request");
    assert_eq!(r.sink.outcome("good").unwrap()["status"], "succeeded");
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_actor_is_restarted_and_no_task_is_lost() {
    // One fault per actor, all within the restart window.
    let mut s = settings();
    s.restart.max_restarts = ActorKind::COUNT as u32;
    let r = rig(s, healthy(Duration::from_millis(20))).await;
    for i in 0..60 {
        r.source
            .publish(Priority::ALL[i % 3], task(&format!("p{i}"), "x"));
    }
    for kind in ActorKind::ALL {
        tokio::time::sleep(Duration::from_millis(15)).await;
        r.engine.inject_fault(kind);
    }
    for i in 60..120 {
        r.source
            .publish(Priority::ALL[i % 3], task(&format!("p{i}"), "x"));
    }
    until(Duration::from_secs(60), || r.sink.outcome_count() == 120).await;
    until(Duration::from_secs(60), || r.source.acks().len() >= 120).await;
    assert_eq!(r.sink.max_copies(), 1);
    assert!(
        r.source.naks() > 0,
        "the crashed assembler's open batches were handed back"
    );
    assert!(r.engine.is_running());
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn restarts_beyond_the_intensity_limit_stop_the_engine() {
    let mut s = settings();
    s.restart = RestartPolicy {
        max_restarts: 2,
        within_secs: 60,
    };
    let mut r = rig(s, healthy(Duration::ZERO)).await;
    for _ in 0..3 {
        r.engine.inject_fault(ActorKind::Assembler);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), r.engine.wait()).await;
    assert!(
        matches!(stopped, Ok(Err(EngineError::Escalated))),
        "{stopped:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn priority_one_does_not_queue_behind_a_route_full_of_bulk_work() {
    // Four requests in flight at most; each takes 1 s. Priority 1 is strict
    // at the route: it takes the first slot that frees, ahead of every bulk
    // task already waiting.
    let r = rig(settings(), healthy(Duration::from_secs(1))).await;
    for i in 0..40 {
        r.source
            .publish(Priority::P3, task(&format!("bulk{i}"), "x"));
    }
    // Let the bulk batch seal and fill the route.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = Instant::now();
    r.source.publish(Priority::P1, task("vip", "x"));
    until(Duration::from_secs(30), || r.sink.outcome("vip").is_some()).await;
    let waited = Instant::now() - start;
    assert!(
        waited < Duration::from_millis(2100),
        "p1 waited {waited:?}: more than one call in flight before it"
    );
    assert!(
        r.sink.outcome_count() < 20,
        "bulk work was still queued when p1 finished"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_seals_at_once_when_its_queue_is_drained() {
    let r = rig(settings(), healthy(Duration::ZERO)).await;
    let start = Instant::now();
    // p3 waits up to 1 s for a full batch of 100; the last of these three
    // reports an empty queue behind it.
    for (i, pending) in [Some(2), Some(1), Some(0)].into_iter().enumerate() {
        r.source
            .publish_with_pending(Priority::P3, task(&format!("d{i}"), "x"), pending);
    }
    until(Duration::from_secs(5), || r.sink.outcome_count() == 3).await;
    let waited = Instant::now() - start;
    assert!(
        waited < Duration::from_millis(100),
        "sealed after {waited:?}"
    );
    let batches: std::collections::HashSet<String> = (0..3)
        .map(|i| {
            r.sink.outcome(&format!("d{i}")).unwrap()["batch_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(batches.len(), 1, "the three travelled together");
    r.engine.shutdown().await;
}
