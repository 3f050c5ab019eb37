//! The CostAccountant and budgets against in-memory fakes under paused
//! tokio time: every billed call in the ledger once, requests in flight at a
//! crash counted at their estimate, budgets that fail or hold tasks.

mod support;

use std::sync::Arc;
use std::time::Duration;

use batchd_actors::budgets::{Budget, Budgets, OnExceeded};
use batchd_actors::ledger::{day_key, CallRecord, CallState, DayTotals, Spend};
use batchd_actors::memory_ledger::MemoryLedger;
use batchd_actors::messages::ActorKind;
use batchd_actors::ports::{LedgerStore, ProviderError};
use batchd_actors::pricing::Picousd;
use batchd_actors::task::{Priority, RouteKind, Usage};
use chrono::{TimeZone, Utc};
use support::{ok, rig, rig_with_ledger, settings, task, until, FakeProvider};

/// 1000 input tokens at $1/M and 100 output at $2/M, in pico-dollars.
const CALL: Picousd = 1_200_000_000;

fn ledger_total(ledger: &MemoryLedger) -> (Picousd, Picousd, u64) {
    let mut exact = 0;
    let mut estimated = 0;
    let mut calls = 0;
    for d in ledger.all_days() {
        for r in d.rows {
            calls += r.totals.calls;
            if r.estimated {
                estimated += r.totals.cost_picousd;
            } else {
                exact += r.totals.cost_picousd;
            }
        }
    }
    (exact, estimated, calls)
}

#[tokio::test(start_paused = true)]
async fn every_answered_call_is_in_the_ledger_once_even_across_accountant_restarts() {
    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_millis(5), |_| ok()),
    )
    .await;
    for i in 0..60 {
        r.source
            .publish(Priority::ALL[i % 3], task(&format!("t{i}"), "x"));
        if i == 30 {
            r.engine.inject_fault(ActorKind::CostAccountant);
        }
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 60).await;
    until(Duration::from_secs(30), || ledger_total(&r.ledger).2 == 60).await;
    r.engine.inject_fault(ActorKind::CostAccountant);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(ledger_total(&r.ledger), (60 * CALL, 0, 60));
    let rows: Vec<_> = r
        .ledger
        .all_days()
        .into_iter()
        .flat_map(|d| d.rows)
        .collect();
    assert_eq!(rows.len(), 3, "one row per priority: {rows:?}");
    for row in rows {
        assert_eq!(row.totals.input_tokens, 20 * 1000);
        assert_eq!(row.totals.output_tokens, 20 * 100);
    }
    let finished = r.ledger.calls();
    assert_eq!(finished.len(), 60);
    assert!(finished.iter().all(|c| c.state == CallState::Finished));
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refused_and_rate_limited_requests_are_not_billed() {
    let n = std::sync::atomic::AtomicU64::new(0);
    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_millis(5), move |_| {
            match n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                0 => Err(ProviderError::Rejected {
                    status: 400,
                    message: "bad".into(),
                }),
                1 => Err(ProviderError::RateLimited {
                    limits: Default::default(),
                    message: "slow down".into(),
                }),
                _ => ok(),
            }
        }),
    )
    .await;
    for i in 0..4 {
        r.source.publish(Priority::P2, task(&format!("t{i}"), "x"));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 4).await;
    until(Duration::from_secs(10), || ledger_total(&r.ledger).2 == 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ledger_total(&r.ledger), (3 * CALL, 0, 3));
    assert_eq!(
        r.ledger.calls().len(),
        3,
        "the refused calls' records are gone"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_at_a_crash_is_counted_at_its_estimate_after_the_timeout() {
    let ledger = Arc::new(MemoryLedger::default());
    let clock = batchd_actors::clock::Clock::following_tokio(chrono::Utc::now());
    let started_at = clock.now();
    // What a killed process leaves: a started record and no answer.
    let orphan = CallRecord::started(
        "lost",
        "lost.g0.a1.01J".into(),
        "acme",
        "m",
        3,
        started_at,
        5_000,
    );
    ledger.write_sheet(&[orphan]).await.unwrap();
    let r = healthy_rig(&ledger).await;
    // Not before the request timeout (30 s): its writer might still answer.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(ledger_total(&ledger), (0, 0, 0));
    until(Duration::from_secs(30), || ledger_total(&ledger).1 == 5_000).await;
    let days = ledger.all_days();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].tenant, "acme");
    assert!(days[0].rows[0].estimated);
    // A second start over the same ledger counts nothing again.
    counts_again_after_a_restart(r, &ledger, Duration::from_secs(60), (0, 5_000, 1)).await;
}

/// An engine over `ledger` whose provider answers at once.
async fn healthy_rig(ledger: &Arc<MemoryLedger>) -> support::Rig {
    rig_with_ledger(
        settings(),
        FakeProvider::new(Duration::ZERO, |_| ok()),
        ledger.clone(),
    )
    .await
}

/// Stops `r`, starts a new engine over the same ledger and checks that
/// after `wait` its totals are still `expected`.
async fn counts_again_after_a_restart(
    r: support::Rig,
    ledger: &Arc<MemoryLedger>,
    wait: Duration,
    expected: (Picousd, Picousd, u64),
) {
    r.engine.shutdown().await;
    let again = healthy_rig(ledger).await;
    tokio::time::sleep(wait).await;
    assert_eq!(ledger_total(ledger), expected);
    again.engine.shutdown().await;
}

fn started_call(id: &str, at: chrono::DateTime<Utc>) -> CallRecord {
    CallRecord::started(id, id.into(), "acme", "m", 3, at, 5_000)
}

#[tokio::test(start_paused = true)]
async fn whichever_of_a_lapse_and_a_late_answer_is_written_first_counts_and_only_it() {
    let ledger = Arc::new(MemoryLedger::default());
    let clock = batchd_actors::clock::Clock::following_tokio(chrono::Utc::now());
    let at = clock.now();
    // "slow" is answered after its accountant counted it at its estimate;
    // "quick" was answered, then a second accountant, late, lapsed it too.
    let slow = started_call("slow", at);
    let quick = started_call("quick", at);
    ledger
        .write_sheet(&[slow.clone(), quick.clone()])
        .await
        .unwrap();
    let mut answered = quick.clone();
    answered.finish(Usage::default(), 700, at);
    ledger.write_sheet(&[answered]).await.unwrap();
    let r = healthy_rig(&ledger).await;
    until(Duration::from_secs(60), || ledger_total(&ledger).1 == 5_000).await;
    let mut late = slow.clone();
    late.finish(Usage::default(), 900, at);
    let mut lapsed_again = quick.clone();
    lapsed_again.lapse();
    ledger.write_sheet(&[late, lapsed_again]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        ledger_total(&ledger),
        (700, 5_000, 2),
        "quick counted exactly, slow at its estimate, each once"
    );
    // A new accountant reading every sheet from the start agrees.
    counts_again_after_a_restart(r, &ledger, Duration::from_secs(60), (700, 5_000, 2)).await;
}

#[tokio::test(start_paused = true)]
async fn a_finished_call_counted_before_a_crash_is_not_counted_again_at_the_next_start() {
    let ledger = Arc::new(MemoryLedger::default());
    let r = healthy_rig(&ledger).await;
    for i in 0..10 {
        r.source.publish(Priority::P1, task(&format!("t{i}"), "x"));
    }
    until(Duration::from_secs(30), || ledger_total(&ledger).2 == 10).await;
    // The records stay; the totals say they are counted.
    assert_eq!(ledger.calls().len(), 10);
    counts_again_after_a_restart(r, &ledger, Duration::from_secs(10), (10 * CALL, 0, 10)).await;
}

fn budgets(action: OnExceeded, daily_usd: f64) -> Budgets {
    Budgets {
        default: Budget::default(),
        tenants: [(
            "acme".to_owned(),
            Budget {
                daily_usd: Some(daily_usd),
                monthly_usd: None,
            },
        )]
        .into(),
        on_exceeded: [action; 3],
        hold_recheck: Duration::from_secs(2),
    }
}

fn tenant_task(id: &str, tenant: &str) -> serde_json::Value {
    let mut t = task(id, "x");
    t["tenant"] = tenant.into();
    t
}

#[tokio::test(start_paused = true)]
async fn a_tenant_over_its_budget_gets_budget_exceeded_and_a_dead_letter_others_flow() {
    let mut s = settings();
    // Two calls' worth: the third task finds the budget spent.
    s.budgets = budgets(OnExceeded::Reject, 2.0 * CALL as f64 / 1e12);
    let r = rig(s, FakeProvider::new(Duration::from_millis(5), |_| ok())).await;
    for i in 0..2 {
        r.source
            .publish(Priority::P2, tenant_task(&format!("a{i}"), "acme"));
    }
    until(Duration::from_secs(30), || ledger_total(&r.ledger).2 == 2).await;
    r.source.publish(Priority::P2, tenant_task("a2", "acme"));
    r.source.publish(Priority::P2, tenant_task("b0", "bob"));
    until(Duration::from_secs(30), || r.source.acks().len() == 4).await;
    let o = r.sink.outcome("a2").unwrap();
    assert_eq!(o["status"], "failed");
    assert_eq!(o["error"]["kind"], "budget_exceeded", "{o}");
    assert!(r.sink.dead.lock().unwrap().contains_key("a2"));
    assert_eq!(r.sink.outcome("b0").unwrap()["status"], "succeeded");
    assert_eq!(
        r.provider.calls().len(),
        3,
        "no call for the task over budget"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_held_task_waits_without_spending_an_attempt_and_runs_after_midnight() {
    let ledger = Arc::new(MemoryLedger::default());
    let start = Utc.with_ymd_and_hms(2026, 12, 1, 23, 59, 50).unwrap();
    // The day's budget is spent already.
    let mut spent = DayTotals::new("2026-12-01", "acme");
    spent.rows.push(batchd_actors::ledger::Row {
        model: "m".into(),
        priority: 2,
        route: RouteKind::Realtime,
        estimated: false,
        totals: batchd_actors::ledger::Totals {
            calls: 1,
            cost_picousd: CALL,
            ..Default::default()
        },
    });
    ledger
        .write_day(&day_key("2026-12-01", "acme"), &spent, None)
        .await
        .unwrap();
    let mut s = settings();
    s.budgets = budgets(OnExceeded::Hold, CALL as f64 / 1e12);
    s.ledger.clock_start = Some(start);
    let r = rig_with_ledger(
        s,
        FakeProvider::new(Duration::from_millis(5), |_| ok()),
        ledger.clone(),
    )
    .await;
    r.source.publish(Priority::P2, tenant_task("h0", "acme"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        r.provider.calls().is_empty(),
        "held while the day's budget is spent"
    );
    assert!(r.sink.outcome("h0").is_none());
    until(Duration::from_secs(30), || r.sink.outcome("h0").is_some()).await;
    let o = r.sink.outcome("h0").unwrap();
    assert_eq!(o["status"], "succeeded");
    assert_eq!(o["attempts"], 1, "holding spent no attempt");
    assert!(!r.source.requeues().is_empty(), "requeued while it waited");
    until(Duration::from_secs(10), || {
        ledger
            .all_days()
            .iter()
            .any(|d| d.day == "2026-12-02" && d.spend() == CALL)
    })
    .await;
    r.engine.shutdown().await;
}

#[test]
fn spend_is_read_per_tenant_and_day() {
    let s = Spend::default();
    s.add("acme", "2026-12-01", 3);
    assert_eq!(s.of("acme", "2026-12-01"), (3, 3));
}

fn with_dedupe(window: Duration) -> batchd_actors::settings::EngineSettings {
    let mut s = settings();
    s.dedupe_window = Some(window);
    s
}

fn shared_calls(r: &support::Rig, ids: &[&str]) -> Vec<Option<String>> {
    ids.iter()
        .map(|id| {
            let o = r.sink.outcome(id).expect("an outcome");
            assert_eq!(o["status"], "succeeded", "{o}");
            (o["shared_call"] == true).then(|| o["call_id"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn identical_requests_share_one_call_each_with_its_own_outcome_and_the_cost_once() {
    let r = rig(
        with_dedupe(Duration::from_secs(1)),
        FakeProvider::new(Duration::from_millis(50), |_| ok()),
    )
    .await;
    let ids = ["d0", "d1", "d2", "d3", "d4"];
    for id in ids {
        r.source.publish(Priority::P2, task(id, "same text"));
    }
    r.source.publish(Priority::P2, task("other", "other text"));
    until(Duration::from_secs(30), || r.source.acks().len() == 6).await;
    assert_eq!(r.provider.calls().len(), 2, "one call per distinct request");
    let shared = shared_calls(&r, &ids);
    let followers: Vec<_> = shared.iter().flatten().collect();
    assert_eq!(followers.len(), 4, "{shared:?}");
    assert!(followers
        .iter()
        .all(|c| *c == followers[0] && !c.is_empty()));
    let mut cost = 0.0;
    for id in ids {
        let o = r.sink.outcome(id).unwrap();
        assert_eq!(o["output"], "answer");
        cost += o["cost_usd"].as_f64().unwrap();
    }
    assert!(
        (cost - batchd_actors::pricing::usd(CALL)).abs() < 1e-12,
        "{cost}"
    );
    until(Duration::from_secs(30), || ledger_total(&r.ledger).2 == 2).await;
    assert_eq!(ledger_total(&r.ledger), (2 * CALL, 0, 2));
    // The call's own task holds its id in the ledger.
    let leader = ids
        .iter()
        .zip(&shared)
        .find(|(_, s)| s.is_none())
        .map(|(id, _)| *id)
        .unwrap();
    assert!(r
        .ledger
        .calls()
        .iter()
        .any(|c| c.task_id == leader && Some(&c.call_id) == followers.first().copied()));

    // Within the window a late duplicate is still served; after it, called again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.source.publish(Priority::P2, task("late", "same text"));
    until(Duration::from_secs(30), || r.source.acks().len() == 7).await;
    assert_eq!(r.provider.calls().len(), 2);
    assert!(shared_calls(&r, &["late"])[0].is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.source.publish(Priority::P2, task("later", "same text"));
    until(Duration::from_secs(30), || r.source.acks().len() == 8).await;
    assert_eq!(r.provider.calls().len(), 3);
    assert_eq!(shared_calls(&r, &["later"]), vec![None]);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_shared_call_lets_its_duplicates_call_and_off_means_one_call_each() {
    let first = std::sync::atomic::AtomicBool::new(true);
    let r = rig(
        with_dedupe(Duration::from_secs(60)),
        FakeProvider::new(Duration::from_millis(50), move |_| {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                Err(support::transient(503, "busy"))
            } else {
                ok()
            }
        }),
    )
    .await;
    let ids = ["f0", "f1", "f2"];
    for id in ids {
        r.source.publish(Priority::P2, task(id, "same text"));
    }
    until(Duration::from_secs(60), || r.source.acks().len() == 3).await;
    assert_eq!(
        r.provider.calls().len(),
        2,
        "the failed call, then one shared"
    );
    assert_eq!(shared_calls(&r, &ids).iter().flatten().count(), 2);
    until(Duration::from_secs(30), || ledger_total(&r.ledger).2 == 1).await;
    assert_eq!(ledger_total(&r.ledger), (CALL, 0, 1));
    r.engine.shutdown().await;

    let r = rig(
        settings(),
        FakeProvider::new(Duration::from_millis(50), |_| ok()),
    )
    .await;
    for id in ids {
        r.source.publish(Priority::P2, task(id, "same text"));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 3).await;
    assert_eq!(r.provider.calls().len(), 3);
    assert_eq!(shared_calls(&r, &ids), vec![None, None, None]);
    r.engine.shutdown().await;
}

/// Settings whose `echo` type has a system prompt of about 1500 tokens,
/// and room for every task of a batch at once at the route.
fn with_long_prefix(caching: bool) -> batchd_actors::settings::EngineSettings {
    let mut s = settings();
    if let Some(echo) = s.catalog.task_types.get_mut("echo") {
        echo.system_prompt = "Follow the house style guide for every answer. ".repeat(125);
    }
    s.route.max_concurrency = 16;
    s.route.initial_concurrency = 16;
    s.caching.enabled = caching;
    s
}

/// When each call of the provider went out, relative to the first one.
fn call_offsets(r: &support::Rig) -> Vec<Duration> {
    let calls = r.provider.calls();
    let first = calls.iter().map(|c| c.1).min().expect("a call");
    let mut offsets: Vec<_> = calls.iter().map(|c| c.1 - first).collect();
    offsets.sort();
    offsets
}

#[tokio::test(start_paused = true)]
async fn a_group_with_a_long_shared_prefix_sends_one_request_first_then_the_rest() {
    let answer = Duration::from_millis(200);
    let r = rig(with_long_prefix(true), FakeProvider::new(answer, |_| ok())).await;
    for i in 0..6 {
        r.source
            .publish(Priority::P2, task(&format!("w{i}"), &format!("ticket {i}")));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 6).await;
    let offsets = call_offsets(&r);
    assert_eq!(offsets.len(), 6);
    assert_eq!(offsets[0], Duration::ZERO);
    assert!(
        offsets[1..].iter().all(|o| *o >= answer),
        "the rest go once the first is answered: {offsets:?}"
    );
    assert!(
        offsets[1..].iter().all(|o| *o == offsets[1]),
        "then all together: {offsets:?}"
    );

    // Within the TTL the prefix is warm: the next batch goes all at once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = r.provider.calls().len();
    for i in 6..12 {
        r.source
            .publish(Priority::P2, task(&format!("w{i}"), &format!("ticket {i}")));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 12).await;
    let calls = r.provider.calls();
    let second: Vec<_> = calls[before..].iter().map(|c| c.1).collect();
    assert_eq!(second.len(), 6);
    assert!(
        second.iter().all(|t| *t == second[0]),
        "a warm prefix needs no warm-up"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn without_caching_or_with_a_short_prefix_a_batch_goes_all_at_once() {
    for (settings, what) in [
        (with_long_prefix(false), "caching off"),
        (
            {
                let mut s = with_long_prefix(true);
                s.caching.min_prefix_tokens = 2000;
                s
            },
            "prefix under min_prefix_tokens",
        ),
    ] {
        let r = rig(settings, support::healthy(Duration::from_millis(200))).await;
        for i in 0..6 {
            r.source
                .publish(Priority::P2, task(&format!("n{i}"), &format!("ticket {i}")));
        }
        until(Duration::from_secs(30), || r.source.acks().len() == 6).await;
        assert!(
            call_offsets(&r).iter().all(|o| o.is_zero()),
            "{what}: {:?}",
            call_offsets(&r)
        );
        r.engine.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_request_releases_the_rest_of_its_group() {
    let first = std::sync::atomic::AtomicBool::new(true);
    let r = rig(
        with_long_prefix(true),
        FakeProvider::new(Duration::from_millis(200), move |_| {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                Err(support::rejected(400, "no"))
            } else {
                ok()
            }
        }),
    )
    .await;
    for i in 0..4 {
        r.source
            .publish(Priority::P2, task(&format!("f{i}"), &format!("ticket {i}")));
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 4).await;
    let offsets = call_offsets(&r);
    assert_eq!(offsets.len(), 4);
    assert!(
        offsets[1..]
            .iter()
            .all(|o| *o == Duration::from_millis(200)),
        "released at the failed answer, not at warm_wait: {offsets:?}"
    );
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn priority_one_does_not_wait_on_a_bulk_warm_up_of_its_prefix() {
    let answer = Duration::from_secs(2);
    let r = rig(with_long_prefix(true), support::healthy(answer)).await;
    for i in 0..4 {
        r.source.publish(
            Priority::P3,
            task(&format!("bulk{i}"), &format!("bulk {i}")),
        );
    }
    until(Duration::from_secs(5), || !r.provider.calls().is_empty()).await;
    let lead_at = r.provider.calls()[0].1;
    for i in 0..3 {
        r.source.publish(
            Priority::P1,
            task(&format!("p1-{i}"), &format!("urgent {i}")),
        );
    }
    until(Duration::from_secs(30), || r.source.acks().len() == 7).await;
    let urgent: Vec<_> = r
        .provider
        .calls()
        .into_iter()
        .filter(|(text, _)| text.starts_with("urgent"))
        .map(|(_, at)| at - lead_at)
        .collect();
    assert_eq!(urgent.len(), 3);
    assert!(
        urgent.iter().all(|d| *d < answer),
        "p1 went before the bulk lead was answered: {urgent:?}"
    );
    r.engine.shutdown().await;
}
