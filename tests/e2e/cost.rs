//! The cost ledger against a real nats-server and the simulated provider
//! over HTTP: it equals the provider's bill to the pico-dollar, a SIGKILL
//! leaves a gap no larger than the estimate of the calls in flight, a call
//! whose outcome is dropped as a duplicate is still counted, and budgets
//! fail or hold a tenant's tasks. `batchd cost --json` reads the same figures.

use crate::common;

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use batchd::config::Config;
use batchd::ledger::KvLedger;
use batchd::sim::{SimConfig, SimServer};
use batchd_actors::ledger::{day_key, DayTotals, Row, Totals};
use batchd_actors::ports::LedgerStore as _;
use batchd_actors::pricing::Picousd;
use batchd_actors::task::RouteKind;
use common::binary::Batchd;
use common::nats::NatsServer;
use serde_json::Value;

/// The ledger's totals: (exact, estimated, calls).
pub(crate) async fn ledger(js: &jetstream::Context, config: &Config) -> (Picousd, Picousd, u64) {
    let ledger = KvLedger::open(js, config)
        .await
        .expect("the ledger buckets");
    let mut t = (0, 0, 0);
    for (_, d, _) in ledger.days("").await.expect("read the ledger") {
        for r in d.rows {
            if r.estimated {
                t.1 += r.totals.cost_picousd;
            } else {
                t.0 += r.totals.cost_picousd;
            }
            t.2 += r.totals.calls;
        }
    }
    t
}

/// Waits until the ledger holds `calls` calls (it is flushed every 500 ms).
pub(crate) async fn wait_for_ledger_calls(
    js: &jetstream::Context,
    config: &Config,
    calls: u64,
) -> (Picousd, Picousd, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = ledger(js, config).await;
        if t.2 >= calls {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger has {t:?}, {calls} calls expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stack with `extra` config, and that config as the test reads it.
pub(crate) async fn stack_with(sim: SimConfig, extra: &str) -> (common::Stack, Config) {
    let stack = common::stack(sim, extra).await;
    let config = Config::from_toml_str(
        &common::config_toml(&stack.nats.url(), &stack.sim.base_url(), extra),
        "test",
    )
    .expect("test config");
    (stack, config)
}

fn tasks_for_tenants(n: usize, prefix: &str, tenants: &[&str]) -> Vec<(String, Value)> {
    common::tasks(n, prefix)
        .into_iter()
        .enumerate()
        .map(|(i, (subject, mut body))| {
            body["tenant"] = tenants[i % tenants.len()].into();
            (subject, body)
        })
        .collect()
}

fn cost_json(nats_url: &str, config: &std::path::Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["cost", "--json", "--nats-url", nats_url, "--config"])
        .arg(config)
        .output()
        .expect("run batchd cost");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("batchd cost --json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_equals_the_providers_bill_and_batchd_cost_reports_it() {
    let extra = format!("{}[retry]\nmax_attempts = 8\n", common::CIRCUIT_OFF);
    let (
        common::Stack {
            nats,
            sim,
            running,
            js,
        },
        config,
    ) = stack_with(
        SimConfig {
            latency: Duration::from_millis(10),
            error_rate: 0.05,
            seed: 11,
            ..SimConfig::default()
        },
        &extra,
    )
    .await;
    let n = 900;
    common::publish_many(&js, &tasks_for_tenants(n, "led", &["acme", "bob", "carol"])).await;
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", n as u64, Duration::from_secs(90)).await;
    common::assert_exactly_one_each(&outcomes, n);
    let (billed, billed_calls) = common::bill(&sim, &config);
    assert!(sim.stats().server_errors > 0, "some calls failed unbilled");
    let (exact, estimated, calls) = wait_for_ledger_calls(&js, &config, billed_calls).await;
    assert_eq!(calls, billed_calls);
    assert_eq!(exact, billed, "the ledger equals the bill exactly");
    assert_eq!(estimated, 0);
    let models: std::collections::BTreeSet<String> = outcomes
        .values()
        .filter_map(|o| o[0]["model"].as_str().map(str::to_owned))
        .collect();
    assert!(models.len() > 1, "a mixed workload: {models:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::config_file(dir.path(), &nats.url(), &sim.base_url(), &extra);
    let report = cost_json(&nats.url(), &path);
    assert_eq!(report["total_picousd"].as_u64(), Some(billed), "{report}");
    assert_eq!(report["estimated_picousd"].as_u64(), Some(0));
    assert_eq!(report["calls"].as_u64(), Some(billed_calls));
    let tenants: std::collections::BTreeSet<&str> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["tenant"].as_str())
        .collect();
    assert_eq!(tenants.len(), 3, "{tenants:?}");
    let per_task = report["cost_per_task_usd"].as_f64().expect("cost per task");
    assert!((per_task - billed as f64 / 1e12 / billed_calls as f64).abs() < 1e-12);
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_outcome_is_dropped_as_a_duplicate_is_counted_once() {
    let stack = common::stack(
        SimConfig {
            latency: Duration::from_millis(1500),
            ..SimConfig::default()
        },
        "",
    )
    .await;
    let (nats, sim, running, js) = (stack.nats, stack.sim, stack.running, stack.js);
    let config = common::config(&nats.url(), &sim.base_url());
    common::publish_many(&js, &common::tasks(1, "dup")).await;
    // While its call is in flight, another writer stores its outcome: the
    // engine's own is then dropped by the duplicate window.
    let sent_by = std::time::Instant::now() + Duration::from_secs(10);
    while sim.stats().requests == 0 {
        assert!(
            std::time::Instant::now() < sent_by,
            "the call never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = serde_json::json!({"task_id": "dup0", "status": "succeeded", "output": "x"});
    common::publish(
        &js,
        "batchd.results.dup0",
        serde_json::to_vec(&other).expect("json"),
        None,
        Some("dup0"),
    )
    .await;
    let (billed, billed_calls) = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sim.stats().succeeded < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the call was answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        common::bill(&sim, &config)
    };
    assert_eq!(billed_calls, 1);
    // The same bill over the simulator's HTTP API.
    let url = format!("{}/sim/bill", sim.base_url().trim_end_matches("/v1"));
    let over_http: std::collections::BTreeMap<String, batchd::sim::SimBill> = reqwest::get(url)
        .await
        .expect("GET /sim/bill")
        .json()
        .await
        .expect("the bill as JSON");
    assert_eq!(over_http, sim.bill());
    let t = wait_for_ledger_calls(&js, &config, 1).await;
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger(&js, &config).await, t);
    assert_eq!(t, (billed, 0, 1));
    assert_eq!(common::stream_len(&js, "BATCHD_RESULTS").await, 1);
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_ledger_is_within_the_estimate_of_the_calls_in_flight() {
    let nats = NatsServer::start().await;
    let sim = SimServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimConfig {
            latency: Duration::from_millis(300),
            jitter: Duration::from_millis(100),
            ..SimConfig::default()
        },
    )
    .await
    .expect("start the simulator");
    let extra = "[dispatch]\nrequest_timeout_secs = 3\n";
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, extra).await;
    let config = Config::load(&path).expect("config");
    let n = 1500;
    common::publish_many(&js, &common::tasks(n, "kl")).await;

    let mut first = Batchd::start(&path);
    common::wait_for_count(&js, "BATCHD_RESULTS", 300).await;
    first.kill();
    assert!(common::stream_len(&js, "BATCHD_RESULTS").await < n as u64);
    let _second = Batchd::start(&path);
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", n as u64, Duration::from_secs(120)).await;
    common::assert_exactly_one_each(&outcomes, n);
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;

    // The killed run's started records are estimated once the request
    // timeout has passed; then the ledger stops moving.
    let (billed, billed_calls) = common::bill(&sim, &config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = ledger(&js, &config).await;
    let mut still = 0;
    while still < 4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = ledger(&js, &config).await;
        still = if now == last && now.1 > 0 {
            still + 1
        } else {
            0
        };
        last = now;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger never settled: {last:?}"
        );
    }
    let (exact, estimated, calls) = last;
    assert!(estimated > 0, "calls were in flight at the kill");
    assert!(
        exact <= billed,
        "every exact call was billed: {exact} > {billed}"
    );
    let gap = (exact + estimated).abs_diff(billed);
    assert!(
        gap <= estimated,
        "ledger {exact} + {estimated} estimated vs bill {billed}: gap {gap}"
    );
    assert!(
        calls >= billed_calls,
        "{calls} calls in the ledger, {billed_calls} billed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_budget_gets_budget_exceeded_and_dead_letters_others_flow() {
    let extra = "[budgets.on_exceeded]\np2 = \"reject\"\n[budgets.tenants.acme]\ndaily_usd = 0.0\n";
    let common::Stack {
        nats: _nats,
        sim,
        running,
        js,
    } = common::stack(SimConfig::default(), extra).await;
    let tasks: Vec<(String, Value)> = tasks_for_tenants(20, "bud", &["acme", "bob"])
        .into_iter()
        .map(|(_, mut body)| {
            body["priority"] = 2.into();
            ("batchd.tasks.p2".to_owned(), body)
        })
        .collect();
    common::publish_many(&js, &tasks).await;
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", 20, Duration::from_secs(30)).await;
    for list in outcomes.values() {
        let o = &list[0];
        if o["tenant"] == "acme" {
            assert_eq!(o["status"], "failed", "{o}");
            assert_eq!(o["error"]["kind"], "budget_exceeded", "{o}");
        } else {
            assert_eq!(o["status"], "succeeded", "{o}");
        }
    }
    let dead = common::wait_for_messages(&js, "BATCHD_DLQ", 10, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 10);
    assert_eq!(
        sim.stats().requests,
        10,
        "no call for the tenant over budget"
    );
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_of_a_tenant_over_budget_finish_after_the_period() {
    // The ledger's clock starts four seconds before a midnight, and the
    // tenant has spent its day's budget already.
    let extra = "[ledger]\nclock_start = \"2026-03-01T23:59:56Z\"\n\
                 [budgets]\nhold_recheck_secs = 1\n\
                 [budgets.on_exceeded]\np3 = \"hold\"\n\
                 [budgets.tenants.acme]\ndaily_usd = 0.5\n";
    let nats = NatsServer::start().await;
    let sim = SimServer::start("127.0.0.1:0".parse().expect("addr"), SimConfig::default())
        .await
        .expect("start the simulator");
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, extra).await;
    let config = Config::load(&path).expect("config");
    let spent = DayTotals {
        day: "2026-03-01".into(),
        tenant: "acme".into(),
        rows: vec![Row {
            model: config.tiers.simple.clone(),
            priority: 3,
            route: RouteKind::Realtime,
            estimated: false,
            totals: Totals {
                calls: 1,
                cost_picousd: 1_000_000_000_000,
                ..Totals::default()
            },
        }],
        applied_through: 0,
    };
    KvLedger::open(&js, &config)
        .await
        .expect("ledger")
        .write_day(&day_key("2026-03-01", "acme"), &spent, None)
        .await
        .expect("seed the day's spend");
    let tasks: Vec<(String, Value)> = (0..6)
        .map(|i| {
            (
                "batchd.tasks.p3".to_owned(),
                common::task(&format!("hold{i}"), 3),
            )
        })
        .collect();
    common::publish_many(&js, &tasks).await;
    let _batchd = Batchd::start(&path);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim.stats().requests, 0, "held before midnight");
    assert_eq!(common::stream_len(&js, "BATCHD_RESULTS").await, 0);
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", 6, Duration::from_secs(30)).await;
    for list in outcomes.values() {
        assert_eq!(list[0]["status"], "succeeded", "{}", list[0]);
        assert_eq!(list[0]["attempts"], 1, "holding spent no attempt");
    }
    assert_eq!(common::stream_len(&js, "BATCHD_DLQ").await, 0);
    let (_, calls) = common::bill(&sim, &config);
    let t = wait_for_ledger_calls(&js, &config, 1 + calls).await;
    assert_eq!(t.2, 1 + calls, "the seeded call and the new day's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_are_sent_once_with_an_outcome_each_and_billed_once() {
    let (stack, config) = stack_with(
        SimConfig {
            latency: Duration::from_millis(300),
            ..SimConfig::default()
        },
        "[dedupe]\nenabled = true\nwindow_ms = 60000\n",
    )
    .await;
    let (sim, running, js) = (stack.sim, stack.running, stack.js);
    let n = 6;
    let tasks: Vec<(String, Value)> = (0..n)
        .map(|i| {
            let mut body = common::task(&format!("same{i}"), 2);
            body["type"] = "summarization".into();
            body["payload"]["text"] = "one identical document".into();
            ("batchd.tasks.p2".to_owned(), body)
        })
        .collect();
    common::publish_many(&js, &tasks).await;
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", n as u64, Duration::from_secs(60)).await;
    common::assert_exactly_one_each(&outcomes, n);
    assert_eq!(sim.stats().requests, 1, "one provider call for {n} tasks");
    let (billed, billed_calls) = common::bill(&sim, &config);
    assert_eq!(billed_calls, 1);
    let all: Vec<&Value> = outcomes.values().flatten().collect();
    let shared: Vec<&&Value> = all.iter().filter(|o| o["shared_call"] == true).collect();
    assert_eq!(shared.len(), n - 1, "{all:?}");
    let call_id = shared[0]["call_id"].as_str().expect("a call id");
    for o in &all {
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["output"], all[0]["output"], "{o}");
        // The tier and why: summarization's default tier.
        assert_eq!(o["tier"], "simple", "{o}");
        assert_eq!(o["tier_reason"], "task_type", "{o}");
    }
    for o in &shared {
        assert_eq!(o["call_id"], call_id, "{o}");
        assert_eq!(o["cost_usd"], 0.0, "{o}");
    }
    let cost: f64 = all
        .iter()
        .map(|o| o["cost_usd"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        (cost - billed as f64 / 1e12).abs() < 1e-12,
        "{cost} vs {billed}"
    );
    let t = wait_for_ledger_calls(&js, &config, 1).await;
    assert_eq!(t, (billed, 0, 1), "the ledger equals the bill");

    // `batchd cost` says what dedupe and tiering saved: each shared answer
    // the call's cost; the call's tokens at the complex tier's model less
    // what they cost on the simple tier's.
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "[dedupe]\nenabled = true\nwindow_ms = 60000\n";
    let path = common::config_file(dir.path(), &stack.nats.url(), &sim.base_url(), extra);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report = cost_json(&stack.nats.url(), &path);
        if report["saved"]["shared_tasks"].as_u64() == Some(n as u64 - 1) {
            break report;
        }
        assert!(tokio::time::Instant::now() < deadline, "{report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dedupe = report["saved"]["dedupe_usd"]
        .as_f64()
        .expect("dedupe saved");
    let expected = (n as f64 - 1.0) * billed as f64 / 1e12;
    assert!((dedupe - expected).abs() < 1e-12, "{dedupe} vs {expected}");
    let [(model, b)]: [(String, batchd::sim::SimBill); 1] = sim
        .bill()
        .into_iter()
        .collect::<Vec<_>>()
        .try_into()
        .expect("one model billed");
    assert_eq!(model, config.tiers.simple);
    let at_complex = config
        .prices
        .cost_picousd(&config.tiers.complex, &b.usage(), RouteKind::Realtime)
        .expect("the complex model's price");
    let tiering = report["saved"]["tiering_usd"]
        .as_f64()
        .expect("tiering saved");
    let expected = (at_complex - billed) as f64 / 1e12;
    assert!(expected > 0.0);
    assert!(
        (tiering - expected).abs() < 1e-12,
        "{tiering} vs {expected}"
    );
    assert_eq!(
        report["calls"].as_u64(),
        Some(1),
        "shared answers are not calls"
    );
    drop(running);
}

/// A task type whose system prompt (about 1,500 tokens) the provider caches.
fn house_brief(caching: bool) -> String {
    let system = "Follow the house style guide for every answer. ".repeat(125);
    format!(
        "[caching]\nenabled = {caching}\n\n[task_types.house_brief]\nsystem_prompt = \"{system}\"\ntemplate = \"Brief: {{text}}\"\ndefault_tier = \"simple\"\nmax_tokens = 64\n"
    )
}

/// Runs `n` priority-2 `house_brief` tasks; the outcomes and the stack.
async fn run_house_briefs(caching: bool, n: usize) -> (common::Stack, Config, Vec<Value>) {
    let (stack, config) = stack_with(
        SimConfig {
            latency: Duration::from_millis(300),
            ..SimConfig::default()
        },
        &house_brief(caching),
    )
    .await;
    let tasks: Vec<(String, Value)> = (0..n)
        .map(|i| {
            let mut body = common::task(&format!("brief{i}"), 2);
            body["type"] = "house_brief".into();
            ("batchd.tasks.p2".to_owned(), body)
        })
        .collect();
    common::publish_many(&stack.js, &tasks).await;
    let outcomes = common::wait_for_messages(
        &stack.js,
        "BATCHD_RESULTS",
        n as u64,
        Duration::from_secs(60),
    )
    .await;
    common::assert_exactly_one_each(&outcomes, n);
    let all: Vec<Value> = outcomes.into_values().flatten().collect();
    (stack, config, all)
}

fn cache_misses(outcomes: &[Value]) -> usize {
    outcomes
        .iter()
        .filter(|o| {
            assert_eq!(o["status"], "succeeded", "{o}");
            o["usage"]["cached_input_tokens"].as_u64().unwrap_or(0) == 0
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_sharing_a_long_prompt_warms_the_cache_once_and_batchd_cost_reports_the_saving() {
    let n = 12;
    let (stack, config, outcomes) = run_house_briefs(true, n).await;
    assert_eq!(
        cache_misses(&outcomes),
        1,
        "only the first request pays for the prefix: {outcomes:?}"
    );
    for o in &outcomes {
        let cached = o["usage"]["cached_input_tokens"].as_u64().unwrap_or(0);
        assert!(cached == 0 || cached >= 1024, "{o}");
    }
    let bill = stack.sim.bill();
    let saved: Picousd = bill
        .iter()
        .map(|(model, b)| {
            config
                .prices
                .cache_saving_picousd(model, &b.usage(), RouteKind::Realtime)
        })
        .sum();
    assert!(saved > 0);
    let (_, billed_calls) = common::bill(&stack.sim, &config);
    wait_for_ledger_calls(&stack.js, &config, billed_calls).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::config_file(
        dir.path(),
        &stack.nats.url(),
        &stack.sim.base_url(),
        &house_brief(true),
    );
    let report = cost_json(&stack.nats.url(), &path);
    let reported = report["saved"]["caching_usd"]
        .as_f64()
        .expect("caching saved");
    assert!(
        (reported - saved as f64 / 1e12).abs() < 1e-12,
        "batchd cost: {reported} USD saved by caching; the bill says {saved} pico-USD"
    );
    drop(stack.running);

    // Without the warm-up, the requests sent together all miss.
    let (stack, _, outcomes) = run_house_briefs(false, n).await;
    assert!(
        cache_misses(&outcomes) > 1,
        "caching off: the first wave pays in full: {outcomes:?}"
    );
    drop(stack.running);
}
