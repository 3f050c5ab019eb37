//! The tier classifier against a real nats-server and the simulated
//! provider over HTTP: `auto` tasks no rule decides go to the tier the
//! classifier names (the sim answers its `json_schema` request with a label
//! fixed by the prompt), its call is billed to the task and the ledger, an
//! identical prompt is not classified twice, a classifier that fails leaves
//! the tasks to prompt size, and the binary's `/metrics` counts verdicts.

use crate::common;
use crate::cost::{stack_with, wait_for_ledger_calls};

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use batchd::sim::SimConfig;
use batchd_actors::pricing::usd;
use serde_json::{json, Value};

/// The classifier's model: served, priced, and no tier's model, so its
/// requests are counted apart.
const CLASSIFIER_MODEL: &str = "gpt-4o-mini";

fn extra(timeout_secs: u64) -> String {
    format!(
        "[tiers.classifier]\nenabled = true\nmodel = \"{CLASSIFIER_MODEL}\"\ntimeout_secs = {timeout_secs}\n\
         [[tiers.rules]]\nname = \"urgent\"\npattern = \"URGENT\"\ntier = \"complex\"\n"
    )
}

/// An `auto` task of the summarization type with `text` as its document.
fn auto_task(id: &str, text: &str) -> (String, Value) {
    (
        "batchd.tasks.p2".to_owned(),
        json!({
            "task_id": id,
            "type": "summarization",
            "tier": "auto",
            "payload": {"text": text, "options": {"language": "en"}},
            "priority": 2,
            "tenant": "acme",
        }),
    )
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|k| format!("Quarterly note {k}: revenue moved, costs held, outlook steady."))
        .collect()
}

/// The outcome of each task id.
fn by_task(outcomes: &HashMap<String, Vec<Value>>) -> HashMap<String, Value> {
    outcomes
        .values()
        .map(|list| {
            let o = list[0].clone();
            (o["task_id"].as_str().unwrap_or_default().to_owned(), o)
        })
        .collect()
}

/// The model configured for `tier`.
fn tier_model(config: &batchd::config::Config, tier: &str) -> String {
    match tier {
        "simple" => config.tiers.simple.clone(),
        "standard" => config.tiers.standard.clone(),
        "complex" => config.tiers.complex.clone(),
        other => panic!("no such tier {other}"),
    }
}

/// Sum of the outcomes' `cost_usd` against the sim's bill (both in USD).
fn assert_outcomes_equal_the_bill(outcomes: &HashMap<String, Value>, billed: u64) {
    let paid: f64 = outcomes
        .values()
        .map(|o| o["cost_usd"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        (paid - usd(billed)).abs() < 1e-9,
        "the outcomes' cost {paid} equals the bill {}",
        usd(billed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tasks_go_to_the_classifiers_tier_and_pay_for_its_call_once_per_prompt() {
    let (stack, config) =
        stack_with(common::sim_latency(Duration::from_millis(5)), &extra(10)).await;
    let (sim, js) = (&stack.sim, &stack.js);
    let n = 12;
    let texts = texts(n);
    let mut first: Vec<(String, Value)> = texts
        .iter()
        .enumerate()
        .map(|(k, t)| auto_task(&format!("cls-a{k}"), t))
        .collect();
    // A rule decides these: no classifier call.
    first.push(auto_task("cls-u0", "URGENT: the board meets at noon."));
    first.push(auto_task("cls-u1", "URGENT: the audit starts today."));
    common::publish_many(js, &first).await;
    common::wait_for_messages(
        js,
        "BATCHD_RESULTS",
        first.len() as u64,
        Duration::from_secs(60),
    )
    .await;
    // The same prompts again, as new tasks: the verdicts are cached.
    let again: Vec<(String, Value)> = texts
        .iter()
        .enumerate()
        .map(|(k, t)| auto_task(&format!("cls-b{k}"), t))
        .collect();
    common::publish_many(js, &again).await;
    let total = first.len() + again.len();
    let outcomes = common::wait_for_one_outcome_each(js, total, Duration::from_secs(60)).await;
    let outcomes = by_task(&outcomes);

    let classifier_calls = sim
        .model_stats()
        .get(CLASSIFIER_MODEL)
        .map_or(0, |s| s.requests);
    assert_eq!(
        classifier_calls, n as u64,
        "one classifier call per distinct prompt; none for rules or repeats"
    );
    let mut tiers = BTreeSet::new();
    for k in 0..n {
        let a = &outcomes[&format!("cls-a{k}")];
        let b = &outcomes[&format!("cls-b{k}")];
        for o in [a, b] {
            assert_eq!(o["status"], "succeeded", "{o}");
            assert_eq!(o["tier_reason"], "classifier", "{o}");
            let tier = o["tier"].as_str().expect("a tier");
            assert_eq!(o["model"], tier_model(&config, tier), "{o}");
        }
        assert_eq!(a["tier"], b["tier"], "the same prompt, the same verdict");
        let paid = a["classifier_cost_usd"].as_f64().expect("the first pays");
        assert!(paid > 0.0, "{a}");
        assert!(a["cost_usd"].as_f64().unwrap() > paid, "{a}");
        assert!(
            b.get("classifier_cost_usd").is_none(),
            "a cached verdict costs nothing: {b}"
        );
        tiers.insert(a["tier"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        tiers.len() > 1,
        "the classifier chose among tiers: {tiers:?}"
    );
    for id in ["cls-u0", "cls-u1"] {
        let o = &outcomes[id];
        assert_eq!(o["tier_reason"], "rule:urgent", "{o}");
        assert_eq!(o["model"], config.tiers.complex, "{o}");
        assert!(o.get("classifier_cost_usd").is_none(), "{o}");
    }

    // The bill: every call, the classifier's included, is on some task and
    // in the ledger exactly once.
    let (billed, billed_calls) = common::bill(sim, &config);
    assert_eq!(billed_calls, (total + n) as u64);
    assert_outcomes_equal_the_bill(&outcomes, billed);
    let (exact, estimated, calls) = wait_for_ledger_calls(js, &config, billed_calls).await;
    assert_eq!((exact, estimated, calls), (billed, 0, billed_calls));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_classifier_leaves_the_tasks_to_prompt_size() {
    let (stack, config) = stack_with(SimConfig::default(), &extra(2)).await;
    let (sim, js) = (&stack.sim, &stack.js);
    sim.add_fault(
        format!("outage@0s..600s:{CLASSIFIER_MODEL}")
            .parse()
            .expect("fault"),
    )
    .expect("add the fault");
    let n = 6;
    let tasks: Vec<(String, Value)> = texts(n)
        .iter()
        .enumerate()
        .map(|(k, t)| auto_task(&format!("clf-{k}"), t))
        .collect();
    common::publish_many(js, &tasks).await;
    let outcomes = common::wait_for_one_outcome_each(js, n, Duration::from_secs(60)).await;
    let outcomes = by_task(&outcomes);
    for o in outcomes.values() {
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["tier_reason"], "prompt_size", "{o}");
        assert_eq!(o["tier"], "simple", "a short prompt: {o}");
        assert_eq!(o["model"], config.tiers.simple, "{o}");
        assert!(o.get("classifier_cost_usd").is_none(), "{o}");
    }
    let stats = sim.model_stats();
    let classifier = stats
        .get(CLASSIFIER_MODEL)
        .expect("the classifier was asked");
    assert_eq!(
        classifier.unavailable, n as u64,
        "each prompt asked once, refused"
    );
    let (billed, billed_calls) = common::bill(sim, &config);
    assert_eq!(
        billed_calls, n as u64,
        "only the tasks' own calls are billed"
    );
    assert_outcomes_equal_the_bill(&outcomes, billed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_prompts_in_flight_share_one_classifier_call() {
    let (stack, config) =
        stack_with(common::sim_latency(Duration::from_millis(500)), &extra(10)).await;
    let (sim, js) = (&stack.sim, &stack.js);
    let n = 4;
    let text = "Meeting notes: the team agreed on the plan and the dates.";
    let tasks: Vec<(String, Value)> = (0..n)
        .map(|k| auto_task(&format!("cls-s{k}"), text))
        .collect();
    common::publish_many(js, &tasks).await;
    let outcomes = common::wait_for_one_outcome_each(js, n, Duration::from_secs(60)).await;
    let outcomes = by_task(&outcomes);
    let classifier_calls = sim
        .model_stats()
        .get(CLASSIFIER_MODEL)
        .map_or(0, |s| s.requests);
    assert_eq!(classifier_calls, 1, "one call for the identical prompts");
    let tiers: BTreeSet<&str> = outcomes
        .values()
        .filter_map(|o| o["tier"].as_str())
        .collect();
    assert_eq!(tiers.len(), 1, "one verdict: {tiers:?}");
    for o in outcomes.values() {
        assert_eq!(o["tier_reason"], "classifier", "{o}");
    }
    let payers = outcomes
        .values()
        .filter(|o| o.get("classifier_cost_usd").is_some())
        .count();
    assert_eq!(payers, 1, "the call is paid by one task");
    let (billed, _) = common::bill(sim, &config);
    assert_outcomes_equal_the_bill(&outcomes, billed);
}

/// Polls `/metrics` until it shows every line of `expected` (10 s at most).
async fn wait_for_metrics(batchd: &common::process::Batchd, expected: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = batchd.metrics().await;
        if expected.iter().all(|line| text.contains(line.as_str())) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing some of {expected:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_counts_classifier_verdicts_by_result() {
    let nats = common::nats::NatsServer::start().await;
    let sim = common::start_sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::config_file(dir.path(), &nats.url(), &sim.base_url(), &extra(10));
    let mut batchd = common::process::Batchd::start(&config, &[]).await;
    let line =
        |result: &str, n: u64| format!("batchd_tier_classifier_total{{result=\"{result}\"}} {n}");
    wait_for_metrics(
        &batchd,
        &[line("ok", 0), line("cached", 0), line("failed", 0)],
    )
    .await;
    let js = async_nats::jetstream::new(nats.client().await);
    let text = "Shipping update: the parcel left the depot this morning.";
    common::publish_many(&js, &[auto_task("m0", text)]).await;
    common::wait_for_messages(&js, "BATCHD_RESULTS", 1, Duration::from_secs(30)).await;
    common::publish_many(&js, &[auto_task("m1", text)]).await;
    common::wait_for_messages(&js, "BATCHD_RESULTS", 2, Duration::from_secs(30)).await;
    wait_for_metrics(
        &batchd,
        &[line("ok", 1), line("cached", 1), line("failed", 0)],
    )
    .await;
    assert!(batchd.terminate().success(), "a clean exit");
}

/// What the classifier sends is a valid chat completion request by
/// OpenAI's published spec, structured-output format included.
#[test]
fn the_classifier_request_is_valid_by_the_openai_spec() {
    let config = batchd::config::Config::defaults().expect("the default config");
    let classifier = &config.tiers.classifier;
    let request = classifier.request(
        classifier.model(&config.tiers),
        "Summarise the attached quarterly report for the board.",
    );
    common::openapi::validate_chat_request(&request).unwrap_or_else(|e| panic!("{request}: {e:?}"));
}
