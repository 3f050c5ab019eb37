//! Route control inside the engine, against in-memory fakes under paused
//! tokio time: outages and refused keys cost no attempts and no tasks,
//! attempts survive a redelivery, a route that is down requeues its tasks,
//! deadlines expire while a route waits; the route board shows a route
//! down while it is down.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use batchd_actors::ports::{AttemptStore, ProviderError};
use batchd_actors::route::{CircuitReason, RouteCondition};
use batchd_actors::task::Priority;
use serde_json::json;
use support::{
    down_until, failing, failing_once, healthy, ok, rate_limited, rejected, rig, settings, task,
    transient, until, FakeProvider, Rig,
};
use tokio::time::Instant;

/// The 401 of a key the provider refuses.
fn bad_key() -> ProviderError {
    rejected(401, "Incorrect API key provided")
}

/// An engine whose provider refuses its key (401) until `at`.
async fn key_refused_until(at: Instant) -> Rig {
    rig(settings(), down_until(at, bad_key())).await
}

#[tokio::test(start_paused = true)]
async fn a_refused_key_opens_the_circuit_and_no_task_is_dead_lettered() {
    let until_at = Instant::now() + Duration::from_secs(30);
    let r = key_refused_until(until_at).await;
    for i in 0..20 {
        r.source.publish(Priority::P2, task(&format!("k{i}"), "x"));
    }
    until(Duration::from_secs(120), || r.sink.outcome_count() == 20).await;
    assert!(
        Instant::now() >= until_at,
        "nothing finished while the key was refused"
    );
    for i in 0..20 {
        let o = r.sink.outcome(&format!("k{i}")).unwrap();
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["attempts"], 1, "a refused key spends no attempt: {o}");
    }
    assert!(r.sink.dead.lock().unwrap().is_empty(), "no dead letter");
    let refused = r
        .provider
        .calls()
        .iter()
        .filter(|(_, at)| *at < until_at)
        .count();
    // The first wave (at most the route's concurrency) and then one probe at
    // a time with a growing wait, not a call per task.
    assert!(
        refused <= 4 + 12,
        "{refused} calls while the key was refused"
    );
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_route_that_is_down_is_published_as_such_until_it_serves_again_then_withdrawn() {
    let until_at = Instant::now() + Duration::from_secs(20);
    let r = key_refused_until(until_at).await;
    for i in 0..5 {
        r.source.publish(Priority::P2, task(&format!("b{i}"), "x"));
    }
    let shown = |condition: RouteCondition| {
        let entries = r.board.entries();
        !entries.is_empty() && entries.values().all(|s| s.state == condition)
    };
    until(Duration::from_secs(10), || {
        shown(RouteCondition::CircuitOpen)
    })
    .await;
    let published_at = Instant::now();
    let entries = r.board.entries();
    let (key, state) = entries.iter().next().unwrap();
    assert_eq!(key, "test-replica.fake.m", "{entries:?}");
    assert_eq!(state.replica, "test-replica");
    assert_eq!(state.route, "fake/m");
    assert_eq!(state.reason, Some(CircuitReason::Unauthorized));
    assert!(
        state.until().is_some_and(|t| t > state.updated_at),
        "an open circuit says until when: {state:?}"
    );

    until(Duration::from_secs(60), || shown(RouteCondition::Open)).await;
    assert!(
        Instant::now() >= until_at,
        "shown open while the key was refused"
    );
    assert!(
        Instant::now() < until_at + Duration::from_secs(20),
        "shown down long after it served again"
    );
    assert!(published_at < until_at);
    until(Duration::from_secs(60), || r.sink.outcome_count() == 5).await;
    let updated_at = || r.board.entries().values().next().unwrap().updated_at;
    let mut writes = vec![updated_at()];
    for _ in 0..2 {
        let last = writes[writes.len() - 1];
        until(Duration::from_secs(10), || updated_at() > last).await;
        writes.push(updated_at());
    }
    let between = (writes[2] - writes[1]).num_milliseconds();
    assert!(
        (5000..=5500).contains(&between),
        "an unchanged route is refreshed every route_refresh (5 s), not at every look: {between} ms"
    );
    r.engine.shutdown().await;
    assert!(
        r.board.entries().is_empty(),
        "a clean shutdown withdraws the replica's routes"
    );
}

#[tokio::test(start_paused = true)]
async fn an_outage_opens_the_circuit_and_gives_up_nothing() {
    // max_attempts is 3: without the circuit, a 20 s outage would give
    // every task max_retries.
    let until_at = Instant::now() + Duration::from_secs(20);
    let overloaded = transient(503, "The server is overloaded or not ready yet.");
    let r = rig(settings(), down_until(until_at, overloaded)).await;
    for i in 0..30 {
        r.source.publish(Priority::P3, task(&format!("o{i}"), "x"));
    }
    until(Duration::from_secs(120), || r.sink.outcome_count() == 30).await;
    for i in 0..30 {
        let o = r.sink.outcome(&format!("o{i}")).unwrap();
        assert_eq!(o["status"], "succeeded", "{o}");
        assert!(o["attempts"].as_u64().unwrap() <= 3, "{o}");
    }
    assert!(r.sink.dead.lock().unwrap().is_empty());
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_task_keeps_the_attempts_it_spent() {
    let r = rig(settings(), failing(Duration::ZERO, transient(500, "boom"))).await;
    // Two attempts spent before a crash; max_attempts is 3: one call left.
    r.attempts.set("again", 2).await.unwrap();
    r.source
        .publish_redelivered(Priority::P2, task("again", "again"), 2);
    // A first delivery never reads the store: its count starts at zero.
    r.attempts.set("fresh", 2).await.unwrap();
    r.source.publish(Priority::P2, task("fresh", "fresh"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 2).await;
    let calls_for = |text: &str| {
        r.provider
            .calls()
            .iter()
            .filter(|(c, _)| c.as_str() == text)
            .count()
    };
    let o = r.sink.outcome("again").unwrap();
    assert_eq!(o["error"]["kind"], "max_retries", "{o}");
    assert_eq!(o["attempts"], 3);
    assert_eq!(calls_for("again"), 1, "one attempt was left");
    let o = r.sink.outcome("fresh").unwrap();
    assert_eq!(o["attempts"], 3, "{o}");
    assert_eq!(calls_for("fresh"), 3, "a first delivery starts at zero");
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_redelivery_fails_without_a_call_unless_an_outcome_exists() {
    let r = rig(settings(), healthy(Duration::ZERO)).await;
    r.attempts.set("spent", 3).await.unwrap();
    r.source
        .publish_redelivered(Priority::P2, task("spent", "x"), 4);
    until(Duration::from_secs(10), || {
        r.sink.outcome("spent").is_some()
    })
    .await;
    assert_eq!(
        r.sink.outcome("spent").unwrap()["error"]["kind"],
        "max_retries"
    );
    assert!(r.provider.calls().is_empty());
    // A copy of it arriving later finds the outcome: acked, no second verdict.
    r.source
        .publish_redelivered(Priority::P2, task("spent", "x"), 5);
    until(Duration::from_secs(10), || {
        r.source.acks().iter().filter(|a| *a == "spent").count() == 2
    })
    .await;
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn tasks_of_a_route_that_is_down_are_requeued_and_other_routes_flow() {
    let mut s = settings();
    s.catalog
        .model_providers
        .insert("m2".to_owned(), "fake".to_owned());
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let r = rig(
        s,
        FakeProvider::new(Duration::from_millis(100), move |req| {
            if req["model"] == "m2" && !h.load(Ordering::SeqCst) {
                Err(transient(503, "down"))
            } else {
                ok()
            }
        }),
    )
    .await;
    for i in 0..20 {
        r.source.publish(
            Priority::P3,
            json!({"task_id": format!("d{i}"), "type": "echo", "model": "m2", "payload": {"text": "x"}}),
        );
    }
    // Let the circuit open and the tasks wait past park_after (5 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        !r.source.requeues().is_empty(),
        "a route that is down hands its tasks back to the queue"
    );
    for i in 0..10 {
        r.source.publish(Priority::P3, task(&format!("h{i}"), "x"));
    }
    until(Duration::from_secs(10), || {
        (0..10).all(|i| r.sink.outcome(&format!("h{i}")).is_some())
    })
    .await;
    assert!((0..20).all(|i| r.sink.outcome(&format!("d{i}")).is_none()));
    healed.store(true, Ordering::SeqCst);
    until(Duration::from_secs(120), || r.sink.outcome_count() == 30).await;
    for i in 0..20 {
        let o = r.sink.outcome(&format!("d{i}")).unwrap();
        assert_eq!(o["status"], "succeeded", "{o}");
    }
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_passes_while_the_route_is_down_expires_the_task() {
    let r = rig(
        settings(),
        failing(Duration::from_millis(10), rejected(403, "forbidden")),
    )
    .await;
    let deadline = chrono::Utc::now() + chrono::Duration::seconds(3);
    r.source.publish(
        Priority::P1,
        json!({"task_id": "late", "type": "echo", "payload": {"text": "x"}, "deadline": deadline.to_rfc3339()}),
    );
    until(Duration::from_secs(30), || r.sink.outcome("late").is_some()).await;
    let o = r.sink.outcome("late").unwrap();
    assert_eq!(o["error"]["kind"], "expired", "{o}");
    assert_eq!(r.sink.dead.lock().unwrap()["late"].len(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_dispatcher_keeps_its_routes_pause() {
    use batchd_actors::messages::ActorKind;
    let r = rig(
        settings(),
        failing_once(rate_limited(Duration::from_secs(10))),
    )
    .await;
    let start = Instant::now();
    r.source.publish(Priority::P2, task("a", "a"));
    until(Duration::from_secs(5), || r.provider.calls().len() == 1).await;
    r.engine.inject_fault(ActorKind::Dispatcher);
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.source.publish(Priority::P2, task("b", "b"));
    until(Duration::from_secs(60), || r.sink.outcome_count() == 2).await;
    for (text, at) in r.provider.calls().iter().skip(1) {
        assert!(
            *at - start >= Duration::from_secs(10),
            "{text} was sent {:?} after the 429: the pause was forgotten",
            *at - start
        );
    }
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_requeued_task_keeps_the_attempts_it_spent() {
    let mut s = settings();
    s.park_keep = 0;
    let until_at = Instant::now() + Duration::from_secs(20);
    let r = rig(s, down_until(until_at, bad_key())).await;
    // Two attempts spent on an earlier run; a first delivery does not read
    // them, the requeued copy does.
    r.attempts.set("spent", 2).await.unwrap();
    r.source.publish(Priority::P2, task("spent", "x"));
    until(Duration::from_secs(60), || {
        r.sink.outcome("spent").is_some()
    })
    .await;
    assert!(r.source.requeues().contains(&"spent".to_owned()));
    let o = r.sink.outcome("spent").unwrap();
    assert_eq!(o["status"], "succeeded", "{o}");
    assert_eq!(
        o["attempts"], 3,
        "2 spent before the requeue, then 1 call: {o}"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_lone_task_on_a_second_route_of_a_provider_that_is_down_gives_up_nothing() {
    // One task on model `m2` cannot open its route's circuit by itself
    // (max_attempts 3 < failure_threshold 5); the outage shows on `m`.
    let mut s = settings();
    s.catalog
        .model_providers
        .insert("m2".to_owned(), "fake".to_owned());
    let price = s.prices.models["m"];
    s.prices.models.insert("m2".to_owned(), price);
    let until_at = Instant::now() + Duration::from_secs(20);
    let overloaded = transient(503, "The server is overloaded or not ready yet.");
    let r = rig(s, down_until(until_at, overloaded)).await;
    for i in 0..30 {
        r.source.publish(Priority::P3, task(&format!("o{i}"), "x"));
    }
    let mut lone = task("lone", "x");
    lone["model"] = json!("m2");
    r.source.publish(Priority::P3, lone);
    until(Duration::from_secs(120), || r.sink.outcome_count() == 31).await;
    let o = r.sink.outcome("lone").unwrap();
    assert_eq!(o["status"], "succeeded", "{o}");
    assert_eq!(o["model"], "m2", "{o}");
    assert!(r.sink.dead.lock().unwrap().is_empty());
    r.engine.shutdown().await;
}
