//! Service tiers in the engine, under paused time with in-memory fakes: a
//! flex refusal spends no attempt, does not pause the route and is not
//! billed; the task calls again at once at the default tier. A flex answer
//! is priced at the batch rate, a priority one at the premium.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use batchd_actors::ledger::CallState;
use batchd_actors::ports::ProviderError;
use batchd_actors::route_policy::TierOptions;
use batchd_actors::settings::EngineSettings;
use batchd_actors::task::{Priority, ServiceTier};
use serde_json::Value;
use support::{ok, rig, settings, task, until, FakeProvider};
use tokio::time::Instant;

/// The test settings with `options` for the fake provider.
fn with_tiers(options: TierOptions) -> EngineSettings {
    let mut s = settings();
    s.catalog.service_tiers.insert("fake".into(), options);
    s
}

fn tier_of(request: &Value) -> Option<&str> {
    request.get("service_tier").and_then(Value::as_str)
}

#[tokio::test(start_paused = true)]
async fn a_refused_flex_call_spends_no_attempt_and_calls_again_at_once_at_the_default_tier() {
    let flex_calls = Arc::new(AtomicUsize::new(0));
    let counted = flex_calls.clone();
    let provider = FakeProvider::new(Duration::from_millis(20), move |request| {
        if tier_of(request) == Some("flex") {
            counted.fetch_add(1, Ordering::SeqCst);
            return Err(ProviderError::FlexUnavailable {
                message: "Resource unavailable".into(),
            });
        }
        ok()
    });
    let r = rig(
        with_tiers(TierOptions {
            flex: true,
            ..TierOptions::default()
        }),
        provider,
    )
    .await;
    let start = Instant::now();
    for i in 0..20 {
        r.source.publish(Priority::P3, task(&format!("f{i}"), "x"));
    }
    until(Duration::from_secs(30), || r.sink.outcome_count() == 20).await;
    // Two calls a task, each 20 ms, and no pause: a rate limit would have
    // held the route for its Retry-After.
    assert!(Instant::now() - start < Duration::from_secs(2));
    assert_eq!(flex_calls.load(Ordering::SeqCst), 20);
    assert_eq!(r.provider.calls().len(), 40);
    for i in 0..20 {
        let o = r.sink.outcome(&format!("f{i}")).unwrap();
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["attempts"], 1, "a flex refusal spends no attempt: {o}");
        assert_eq!(o["service_tier"], "default", "{o}");
    }
    assert!(r.sink.dead.lock().unwrap().is_empty());
    // Only the answered calls are counted, at the standard price.
    let calls = r.ledger.calls();
    assert_eq!(calls.len(), 20);
    assert!(calls
        .iter()
        .all(|c| c.state == CallState::Finished && c.service_tier == ServiceTier::Default));
}

#[tokio::test(start_paused = true)]
async fn flex_answers_cost_the_batch_rate_and_priority_answers_the_premium() {
    let provider = FakeProvider::new(Duration::from_millis(20), |request| {
        let mut answer = ok()?;
        answer.service_tier = tier_of(request).and_then(ServiceTier::from_answer);
        Ok(answer)
    });
    let r = rig(
        with_tiers(TierOptions {
            flex: true,
            priority_p1: true,
            ..TierOptions::default()
        }),
        provider,
    )
    .await;
    r.source.publish(Priority::P3, task("bulk", "x"));
    r.source.publish(Priority::P1, task("rush", "x"));
    r.source.publish(Priority::P2, task("usual", "x"));
    until(Duration::from_secs(30), || r.sink.outcome_count() == 3).await;
    // 1000 input tokens at 1 USD/M and 100 output at 2 USD/M: 0.0012 USD.
    for (id, tier, cost) in [
        ("bulk", "flex", 0.0006),
        ("rush", "priority", 0.0012 * 1.75),
        ("usual", "default", 0.0012),
    ] {
        let o = r.sink.outcome(id).unwrap();
        assert_eq!(o["service_tier"], tier, "{o}");
        let paid = o["cost_usd"].as_f64().unwrap();
        assert!((paid - cost).abs() < 1e-12, "{id}: {paid} vs {cost}");
    }
    let ledger: f64 = r
        .ledger
        .calls()
        .iter()
        .map(|c| c.cost_picousd as f64 / 1e12)
        .sum();
    assert!(
        (ledger - (0.0006 + 0.0021 + 0.0012)).abs() < 1e-12,
        "{ledger}"
    );
}
