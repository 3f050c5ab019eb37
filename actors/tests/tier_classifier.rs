//! The tier classifier in the engine, against in-memory fakes under paused
//! tokio time: a verdict routes an `auto` task and its call is billed to the
//! task and the ledger once; a cached verdict costs nothing; an answer with
//! no label, or none in time, leaves the task to prompt size.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use batchd_actors::ledger::CallState;
use batchd_actors::ports::Completion;
use batchd_actors::pricing::{usd, Picousd};
use batchd_actors::settings::EngineSettings;
use batchd_actors::task::{Priority, Usage};
use serde_json::{json, Value};
use support::{ok, rig, settings, until, FakeProvider, Rig};

/// A task call: 1000 input tokens at $1/M and 100 output at $2/M.
const CALL: Picousd = 1_200_000_000;
/// A classifier call: 100 input tokens and 5 output at the same prices.
const JUDGE_CALL: Picousd = 110_000_000;

/// Settings with a model per tier and a classifier model, all served by
/// the fake provider at the same prices.
fn classifier_settings(timeout_secs: u64) -> EngineSettings {
    let mut s = settings();
    let price = s.prices.models["m"];
    for model in ["small", "medium", "large", "judge"] {
        s.prices.models.insert(model.into(), price);
        s.catalog
            .model_providers
            .insert(model.into(), "fake".into());
    }
    let tiers = &mut s.catalog.tiers;
    tiers.simple = "small".into();
    tiers.standard = "medium".into();
    tiers.complex = "large".into();
    tiers.classifier.enabled = true;
    tiers.classifier.model = "judge".into();
    tiers.classifier.timeout_secs = timeout_secs;
    s
}

fn auto_task(id: &str, text: &str) -> Value {
    json!({"task_id": id, "type": "echo", "tier": "auto", "payload": {"text": text}})
}

/// A provider whose classifier model answers `label(prompt)` and whose
/// other models answer [`ok`]; counts the classifier's calls.
fn provider(
    delay: Duration,
    judge_calls: Arc<AtomicU64>,
    label: fn(&str) -> &'static str,
) -> Arc<FakeProvider> {
    FakeProvider::new(delay, move |request| {
        if request["model"] != "judge" {
            return ok();
        }
        judge_calls.fetch_add(1, Ordering::SeqCst);
        let prompt = request["messages"][1]["content"].as_str().unwrap_or("");
        Ok(Completion {
            output: Some(label(prompt).to_owned()),
            finish_reason: Some("stop".into()),
            usage: Usage {
                input_tokens: 100,
                output_tokens: 5,
                ..Usage::default()
            },
            limits: Default::default(),
            service_tier: None,
        })
    })
}

fn ledger_cost(r: &Rig) -> Picousd {
    r.ledger.calls().iter().map(|c| c.cost_picousd).sum()
}

#[tokio::test(start_paused = true)]
async fn a_verdict_routes_the_task_and_its_call_is_billed_to_it_once_per_prompt() {
    let judge_calls = Arc::new(AtomicU64::new(0));
    let label = |prompt: &str| match prompt {
        p if p.contains("proof") => r#"{"tier":"complex"}"#,
        p if p.contains("list") => "Standard.",
        _ => "no idea",
    };
    let r = rig(
        classifier_settings(10),
        provider(Duration::from_millis(5), judge_calls.clone(), label),
    )
    .await;
    r.source.publish(Priority::P2, auto_task("a", "a proof"));
    r.source.publish(Priority::P2, auto_task("b", "a list"));
    r.source.publish(Priority::P2, auto_task("c", "a poem"));
    until(Duration::from_secs(30), || r.source.acks().len() == 3).await;
    // The same prompt again: the cached verdict, no call.
    r.source.publish(Priority::P2, auto_task("a2", "a proof"));
    until(Duration::from_secs(30), || r.source.acks().len() == 4).await;
    assert_eq!(judge_calls.load(Ordering::SeqCst), 3);

    let o = |id: &str| r.sink.outcome(id).expect("an outcome");
    let (a, b, c, a2) = (o("a"), o("b"), o("c"), o("a2"));
    assert_eq!(
        (&a["model"], &a["tier"], &a["tier_reason"]),
        (&json!("large"), &json!("complex"), &json!("classifier"))
    );
    assert_eq!(
        (&b["model"], &b["tier"], &b["tier_reason"]),
        (&json!("medium"), &json!("standard"), &json!("classifier"))
    );
    // No label: prompt size decides, and the call it paid for is its own.
    assert_eq!(
        (&c["model"], &c["tier"], &c["tier_reason"]),
        (&json!("small"), &json!("simple"), &json!("prompt_size"))
    );
    for x in [&a, &b, &c] {
        assert_eq!(x["classifier_cost_usd"], json!(usd(JUDGE_CALL)), "{x}");
        assert_eq!(x["cost_usd"], json!(usd(CALL + JUDGE_CALL)), "{x}");
    }
    assert_eq!(a2["tier_reason"], "classifier");
    assert_eq!(a2["model"], "large");
    assert!(a2.get("classifier_cost_usd").is_none(), "{a2}");
    assert_eq!(a2["cost_usd"], json!(usd(CALL)));

    // The ledger: four task calls and three classifier calls, each once,
    // finished, under the task that made it.
    until(Duration::from_secs(10), || r.ledger.calls().len() == 7).await;
    let calls = r.ledger.calls();
    assert!(calls.iter().all(|c| c.state == CallState::Finished));
    let judged: Vec<&str> = calls
        .iter()
        .filter(|c| c.model == "judge")
        .map(|c| c.task_id.as_str())
        .collect();
    assert_eq!(judged.len(), 3);
    assert!(calls
        .iter()
        .filter(|c| c.model == "judge")
        .all(|c| c.call_id.contains(".classify.")));
    assert_eq!(ledger_cost(&r), 4 * CALL + 3 * JUDGE_CALL);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_classifier_with_no_answer_in_time_leaves_the_task_to_prompt_size() {
    let judge_calls = Arc::new(AtomicU64::new(0));
    // Every call takes 3 s; the classifier may take 1 s.
    let r = rig(
        classifier_settings(1),
        provider(Duration::from_secs(3), judge_calls.clone(), |_| "complex"),
    )
    .await;
    r.source.publish(Priority::P2, auto_task("t", "a proof"));
    until(Duration::from_secs(30), || r.source.acks().len() == 1).await;
    let o = r.sink.outcome("t").expect("an outcome");
    assert_eq!(o["status"], "succeeded", "{o}");
    assert_eq!(
        (&o["model"], &o["tier_reason"]),
        (&json!("small"), &json!("prompt_size"))
    );
    assert!(
        o.get("classifier_cost_usd").is_none(),
        "no answer, no exact cost"
    );
    // The fake answers after its delay: the classifier's call went out but
    // never came back.
    assert_eq!(judge_calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        r.provider.calls().len(),
        2,
        "the classifier's call and the task's"
    );
    // The provider may have billed the call: the ledger counts it at its
    // estimate, as any call that timed out.
    until(Duration::from_secs(10), || r.ledger.calls().len() == 2).await;
    let calls = r.ledger.calls();
    let judge = calls.iter().find(|c| c.model == "judge").expect("recorded");
    assert_eq!(judge.state, CallState::Estimated);
    assert!(judge.cost_picousd > 0);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_that_goes_no_further_makes_no_classifier_call() {
    let judge_calls = Arc::new(AtomicU64::new(0));
    let r = rig(
        classifier_settings(10),
        provider(Duration::from_millis(5), judge_calls.clone(), |_| "simple"),
    )
    .await;
    let mut spent = auto_task("spent", "a proof");
    spent["retry_count"] = json!(3);
    r.source.publish(Priority::P2, spent);
    until(Duration::from_secs(30), || r.source.acks().len() == 1).await;
    let o = r.sink.outcome("spent").expect("an outcome");
    assert_eq!(o["error"]["kind"], "max_retries", "{o}");
    assert!(o.get("classifier_cost_usd").is_none(), "{o}");
    assert!(r.provider.calls().is_empty(), "no call at all");
    r.engine.shutdown().await;
}
