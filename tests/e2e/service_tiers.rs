//! Service tiers end to end, with a real nats-server and the simulator over
//! HTTP: priority-3 realtime work goes `flex`, priority 1 `priority`; the
//! simulator refuses a share of flex calls with 429 `resource_unavailable`;
//! each refusal falls back (to the default tier, or to a batch job) without
//! spending an attempt; every task gets one outcome, and the outcomes'
//! costs, the ledger and the simulator's bill (default, flex, priority and
//! batch parts, each at its rate) agree.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use batchd::config::Config;
use batchd::sim::{SimBill, SimConfig, SimServer, TierConfig};
use batchd_actors::pricing::{usd, Picousd};
use batchd_actors::task::{RouteKind, ServiceTier};
use serde_json::Value;

use crate::batch_api::outcome_of;
use crate::common;

/// A simulator refusing `rate` of flex calls, deterministically seeded.
fn flex_sim(rate: f64) -> SimConfig {
    SimConfig {
        latency: Duration::from_millis(10),
        seed: 7,
        batch_duration: Duration::from_millis(300),
        record_requests: true,
        tiers: TierConfig {
            flex_unavailable_rate: rate,
            ..TierConfig::default()
        },
        ..SimConfig::default()
    }
}

/// The provider's models with gpt-5-mini (a flex model at the simulator)
/// added, and its price; the provider's keys follow.
const WITH_GPT5_MINI: &str = r#"
[prices.models."gpt-5-mini"]
input = 0.25
cached_input = 0.025
output = 2.0
[providers.openai]
models = ["gpt-4.1-nano", "gpt-4.1-mini", "gpt-4.1", "gpt-5-mini"]
"#;

/// A stack on [`flex_sim`] with the provider keys and tables of `extra`
/// after [`WITH_GPT5_MINI`], and its config (for prices).
async fn flex_stack(rate: f64, extra: &str) -> (common::Stack, Config) {
    let extra = &format!("{WITH_GPT5_MINI}{extra}");
    let config = Config::from_toml_str(
        &common::config_toml_as("openai", "nats://x", "http://x", extra),
        "t",
    )
    .expect("config");
    (common::stack(flex_sim(rate), extra).await, config)
}

/// A seed-shaped task on `model`, `priority`, with optional extra fields.
fn task_on(id: &str, priority: u8, model: &str, extra: &[(&str, Value)]) -> (String, Value) {
    let mut body = common::task(id, priority);
    body["model"] = model.into();
    for (k, v) in extra {
        body[*k] = v.clone();
    }
    (format!("batchd.tasks.p{priority}"), body)
}

/// One part of the simulator's bill priced at `route` and `tier`.
fn priced(
    config: &Config,
    bill: &BTreeMap<String, SimBill>,
    route: RouteKind,
    tier: ServiceTier,
) -> (Picousd, u64) {
    bill.iter().fold((0, 0), |(cost, n), (model, b)| {
        let c = config
            .prices
            .tier_cost_picousd(model, &b.usage(), route, tier)
            .expect("priced");
        (cost + c, n + b.requests)
    })
}

/// The whole bill: default, flex, priority and batch parts; and its calls.
fn whole_bill(sim: &SimServer, config: &Config) -> (Picousd, u64) {
    let parts = [
        priced(
            config,
            &sim.bill(),
            RouteKind::Realtime,
            ServiceTier::Default,
        ),
        priced(
            config,
            &sim.flex_bill(),
            RouteKind::Realtime,
            ServiceTier::Flex,
        ),
        priced(
            config,
            &sim.priority_bill(),
            RouteKind::Realtime,
            ServiceTier::Priority,
        ),
        priced(
            config,
            &sim.batch_bill(),
            RouteKind::BatchApi,
            ServiceTier::Default,
        ),
    ];
    parts
        .iter()
        .fold((0, 0), |(c, n), (pc, pn)| (c + pc, n + pn))
}

/// Finished records of the ledger's call sheets: their cost and count; and
/// the refused ones (recorded as such, not counted).
async fn ledger(js: &async_nats::jetstream::Context) -> (Picousd, usize, usize) {
    use futures::StreamExt as _;
    let calls = js.get_key_value("batchd-calls").await.expect("bucket");
    let (mut cost, mut finished, mut refused) = (0, 0, 0);
    let mut keys = calls.keys().await.expect("keys");
    while let Some(key) = keys.next().await {
        let Some(value) = calls.get(key.expect("key")).await.expect("get") else {
            continue;
        };
        let sheet: Vec<Value> = serde_json::from_slice(&value).expect("a call sheet");
        for r in sheet {
            match r["state"].as_str() {
                Some("finished") => {
                    cost += r["cost_picousd"].as_u64().expect("cost");
                    finished += 1;
                }
                Some("refused") => refused += 1,
                // Each call's start has a record of its own, before its end.
                Some("started") => {}
                other => panic!("a call left {other:?}: {r}"),
            }
        }
    }
    (cost, finished, refused)
}

/// Sum of outcome costs in pico-dollars.
fn outcome_cost(outcomes: &HashMap<String, Vec<Value>>) -> Picousd {
    outcomes
        .values()
        .map(|l| (l[0]["cost_usd"].as_f64().unwrap_or(0.0) * 1e12).round() as Picousd)
        .sum()
}

/// Waits until the ledger counts `n` finished calls (its sheets are
/// written right after the outcomes).
async fn ledger_settled(js: &async_nats::jetstream::Context, n: usize) -> (Picousd, usize, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = ledger(js).await;
        if l.1 >= n || tokio::time::Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn flex_refusals_fall_back_to_the_default_tier_without_an_attempt_and_costs_equal_the_bill() {
    let extra = "flex = true\nflex_timeout_secs = 30\npriority_tier_p1 = true\n";
    let (stack, config) = flex_stack(0.3, extra).await;
    let js = &stack.js;
    let mut all: Vec<(String, Value)> = (0..40)
        .map(|i| task_on(&format!("flex{i}"), 3, "gpt-5-mini", &[]))
        .collect();
    // A model without flex at the provider: answered at the default tier.
    all.extend((0..5).map(|i| task_on(&format!("noflex{i}"), 3, "gpt-4.1-mini", &[])));
    all.extend((0..6).map(|i| task_on(&format!("prem{i}"), 1, "gpt-4.1-mini", &[])));
    common::publish_many(js, &all).await;
    let outcomes = common::wait_for_one_outcome_each(js, 51, Duration::from_secs(60)).await;

    let stats = stack.sim.stats();
    assert!(stats.resource_unavailable > 0, "{stats:?}");
    let tier_of = |id: &str| {
        let o = outcome_of(&outcomes, id);
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["attempts"], 1, "a refusal spends no attempt: {o}");
        assert_eq!(o["route"], "realtime", "{o}");
        o["service_tier"].as_str().expect("service_tier").to_owned()
    };
    let flex: Vec<String> = (0..40).map(|i| tier_of(&format!("flex{i}"))).collect();
    let fell_back = flex.iter().filter(|t| *t == "default").count();
    assert_eq!(flex.iter().filter(|t| *t == "flex").count() + fell_back, 40);
    assert_eq!(
        fell_back as u64, stats.resource_unavailable,
        "each refusal falls back once, to the default tier"
    );
    for i in 0..5 {
        assert_eq!(tier_of(&format!("noflex{i}")), "default");
    }
    for i in 0..6 {
        assert_eq!(tier_of(&format!("prem{i}")), "priority");
    }
    // The flex ones cost half the standard price, priority ones 1.75 times.
    let o = outcomes
        .values()
        .map(|l| &l[0])
        .find(|o| o["service_tier"] == "flex")
        .expect("a flex outcome");
    let usage = serde_json::from_value(o["usage"].clone()).unwrap();
    let full = config
        .prices
        .cost("gpt-5-mini", &usage, RouteKind::Realtime)
        .unwrap();
    assert!((o["cost_usd"].as_f64().unwrap() - full / 2.0).abs() < 1e-12);
    assert_eq!(
        stack.sim.flex_bill()["gpt-5-mini"].requests,
        40 - fell_back as u64
    );
    assert_eq!(stack.sim.priority_bill()["gpt-4.1-mini"].requests, 6);
    assert_eq!(stats.rate_limited, 0);

    // The contract: every body sent, flex and priority ones included,
    // validates against OpenAI's spec; each task asked once for its tier.
    let sent = stack.sim.recorded_requests();
    assert_eq!(sent.len() as u64, stats.requests);
    let mut asked: HashMap<Option<String>, usize> = HashMap::new();
    for body in &sent {
        common::openapi::validate_chat_request(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        let tier = body.get("service_tier").and_then(Value::as_str);
        *asked.entry(tier.map(str::to_owned)).or_default() += 1;
    }
    // flex_models is empty: every priority-3 task asks for flex, and the
    // provider serves gpt-4.1-mini at the default tier.
    assert_eq!(asked[&Some("flex".to_owned())], 45);
    assert_eq!(asked[&Some("priority".to_owned())], 6);
    assert_eq!(asked.get(&None).copied().unwrap_or(0), fell_back);

    let (billed, calls) = whole_bill(&stack.sim, &config);
    assert_eq!(calls, 51, "one billed call per task");
    let paid = outcome_cost(&outcomes);
    assert!(
        paid.abs_diff(billed) <= 51,
        "outcomes {} vs bill {} USD",
        usd(paid),
        usd(billed)
    );
    let (ledger_cost, finished, refused) = ledger_settled(js, 51).await;
    assert_eq!(finished, 51);
    assert_eq!(refused as u64, stats.resource_unavailable);
    assert!(
        ledger_cost.abs_diff(paid) <= 51,
        "ledger {ledger_cost} vs outcomes {paid}"
    );
    assert!(
        ledger_cost.abs_diff(billed) <= 51,
        "ledger {ledger_cost} vs bill {billed}"
    );
}

#[tokio::test]
async fn flex_refusals_go_to_the_batch_api_when_configured_and_costs_equal_the_bill() {
    let extra = r#"batch = true
flex = true
flex_models = ["gpt-5-mini"]
flex_fallback = "batch_api"
flex_timeout_secs = 30
[batching.batch_api]
max_wait_ms = 300
poll_initial_ms = 50
poll_max_ms = 200
"#;
    let (stack, config) = flex_stack(0.5, extra).await;
    let js = &stack.js;
    // Deadlines two hours away: too close for a 24 h batch window, so
    // realtime, at the flex tier.
    let soon = (chrono::Utc::now() + chrono::Duration::hours(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let all: Vec<(String, Value)> = (0..30)
        .map(|i| {
            task_on(
                &format!("soon{i}"),
                3,
                "gpt-5-mini",
                &[("deadline", soon.clone().into())],
            )
        })
        .collect();
    common::publish_many(js, &all).await;
    let outcomes = common::wait_for_one_outcome_each(js, 30, Duration::from_secs(60)).await;

    let stats = stack.sim.stats();
    assert!(stats.resource_unavailable > 0, "{stats:?}");
    let mut by_batch = 0;
    for list in outcomes.values() {
        let o = &list[0];
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["attempts"], 1, "{o}");
        match o["route"].as_str() {
            Some("batch_api") => {
                by_batch += 1;
                assert!(o.get("service_tier").is_none(), "{o}");
            }
            _ => assert_eq!(o["service_tier"], "flex", "{o}"),
        }
    }
    assert_eq!(by_batch as u64, stats.resource_unavailable);
    assert!(stack.sim.batch_creations() >= 1);
    assert!(stack.sim.bill().is_empty(), "nothing at the default tier");
    let (billed, calls) = whole_bill(&stack.sim, &config);
    assert_eq!(calls, 30);
    let paid = outcome_cost(&outcomes);
    assert!(
        paid.abs_diff(billed) <= 30,
        "outcomes {paid} vs bill {billed}"
    );
    let (ledger_cost, finished, _) = ledger_settled(js, 30).await;
    assert_eq!(finished, 30);
    assert!(
        ledger_cost.abs_diff(billed) <= 30,
        "ledger {ledger_cost} vs bill {billed}"
    );
}
