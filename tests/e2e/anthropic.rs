//! Anthropic Messages beside OpenAI in one engine, against a real
//! nats-server and the simulated provider over HTTP: `claude-*` tasks go to
//! the Anthropic provider (system prompt cached with `cache_control`,
//! `max_tokens` set), the others to OpenAI; a 529 storm is retried; the sum
//! of outcome costs equals the simulator's bill; the Anthropic key, read
//! from `ANTHROPIC_API_KEY`, never reaches logs, outcomes or metrics.

use crate::common;

use std::time::Duration;

use batchd::config::Config;
use batchd::sim::{SimConfig, SimServer};
use common::nats::NatsServer;
use common::process::LoggedBatchd;
use serde_json::{json, Value};

const CLAUDE: &str = "claude-3-5-haiku-latest";
const API_KEY: &str = "sk-ant-CANARY5-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_and_openai_tasks_run_in_one_engine_with_their_provider_cost_and_no_key_leak() {
    let nats = NatsServer::start().await;
    let sim = SimServer::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            record_requests: true,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    // Every Anthropic call answers 529 overloaded_error for the first 2 s.
    sim.add_fault(format!("outage@0s..2s:{CLAUDE}").parse().unwrap())
        .unwrap();
    let long_system = "Follow the house style guide carefully. ".repeat(130);
    let extra = format!(
        r#"
[providers.anthropic]
base_url = "{}"
base_url_env = "BATCHD_TEST_UNSET"
[task_types.house_brief]
system_prompt = "{long_system}"
template = "Brief: {{text}}"
default_tier = "simple"
max_tokens = 64
"#,
        sim.anthropic_base_url()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = common::config_file(dir.path(), &nats.url(), &sim.base_url(), &extra);
    let config = Config::load(&path).unwrap();
    let client = nats.client().await;
    batchd::nats::ensure_topology(&client, &config)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);

    let mut tasks = common::tasks(20, "oai");
    for i in 0..20 {
        let p = [1u8, 2, 3][i % 3];
        tasks.push((
            format!("batchd.tasks.p{p}"),
            json!({"task_id": format!("claude{i}"), "type": "house_brief", "model": CLAUDE,
                   "payload": {"text": format!("note {i}")}, "priority": p, "tenant": "acme"}),
        ));
    }
    common::publish_many(&js, &tasks).await;
    sim.reset_clock();

    let batchd = LoggedBatchd::start(&path, &[("ANTHROPIC_API_KEY", API_KEY)]);
    let outcomes =
        common::wait_for_one_outcome_each(&js, tasks.len(), Duration::from_secs(90)).await;
    let dead = common::read_all(&js, "BATCHD_DLQ").await;
    let metrics = batchd.metrics().await;
    let logs = batchd.stop();

    let mut cost = 0.0;
    for (subject, list) in &outcomes {
        let o: &Value = &list[0];
        assert_eq!(o["status"], "succeeded", "{subject}: {o}");
        let claude = o["task_id"].as_str().unwrap().starts_with("claude");
        let (provider, model_prefix) = if claude {
            ("anthropic", CLAUDE)
        } else {
            ("openai", "gpt-")
        };
        assert_eq!(o["provider"], provider, "{o}");
        assert!(
            o["model"].as_str().unwrap().starts_with(model_prefix),
            "{o}"
        );
        let usage = &o["usage"];
        assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{o}");
        if claude {
            // Inclusive usage: the cached system prompt counts in input_tokens.
            let cached = usage["cached_input_tokens"].as_u64().unwrap_or(0)
                + usage["cache_write_input_tokens"].as_u64().unwrap_or(0);
            assert!(cached >= 1024, "the system prompt was cached: {o}");
            assert!(usage["input_tokens"].as_u64().unwrap() > cached, "{o}");
        }
        cost += o["cost_usd"].as_f64().unwrap();
    }
    assert!(dead.is_empty(), "no dead letters: {dead:?}");

    let stats = sim.model_stats();
    assert!(
        stats[CLAUDE].unavailable > 0,
        "the 529 storm was met: {:?}",
        stats[CLAUDE]
    );
    let bill = sim.bill();
    assert_eq!(bill[CLAUDE].requests, 20);
    assert!(bill[CLAUDE].cache_write_tokens > 0 && bill[CLAUDE].cached_tokens > 0);
    // The route's prompt cache, as /metrics reports it.
    let series = |name: &str| -> f64 {
        let prefix = format!("{name}{{provider=\"anthropic\",model=\"{CLAUDE}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
    };
    assert_eq!(
        series("batchd_route_cached_tokens_total"),
        bill[CLAUDE].cached_tokens as f64
    );
    assert!(
        series("batchd_route_prompt_tokens_total") > series("batchd_route_cached_tokens_total")
    );
    assert!(series("batchd_cache_saved_usd_total") > 0.0);
    let billed = common::bill(&sim, &config).0 as f64 / 1e12;
    assert!(
        (cost - billed).abs() < 1e-9,
        "outcomes cost {cost} USD, the provider billed {billed} USD"
    );

    let sent = sim
        .recorded_requests()
        .into_iter()
        .find(|r| r["model"] == CLAUDE)
        .expect("an Anthropic request was recorded");
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["system"][0]["cache_control"]["type"], "ephemeral");
    assert_eq!(sent["messages"][0]["role"], "user");

    let texts = [
        ("logs", logs),
        ("outcomes", serde_json::to_string(&outcomes).unwrap()),
        ("metrics", metrics),
    ];
    for (what, text) in &texts {
        assert!(
            !text.contains(API_KEY),
            "the Anthropic key is in the {what}"
        );
    }
}

/// POSTs a Messages body with the given headers to the simulator.
async fn post_messages(
    sim: &SimServer,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/messages", sim.anthropic_base_url()))
        .json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

#[tokio::test]
async fn the_sim_answers_messages_with_anthropic_headers_errors_and_additive_cached_usage() {
    let sim = common::start_sim(SimConfig::default()).await;
    let auth = [
        ("x-api-key", "sk-ant-test"),
        ("anthropic-version", "2023-06-01"),
    ];
    let system = "Answer in the house style. ".repeat(200);
    let body = json!({
        "model": CLAUDE, "max_tokens": 500,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hello"}]
    });

    let (status, _, error) = post_messages(&sim, &auth[1..], &body).await;
    assert_eq!(status, 401);
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "authentication_error");
    let (status, _, error) = post_messages(&sim, &auth[..1], &body).await;
    assert_eq!(
        (status, &error["error"]["type"]),
        (400, &json!("invalid_request_error"))
    );
    let (status, _, error) =
        post_messages(&sim, &auth, &json!({"model": CLAUDE, "messages": []})).await;
    assert_eq!(
        (status, &error["error"]["type"]),
        (400, &json!("invalid_request_error"))
    );

    // First use writes the marked prefix to the cache, the next reads it.
    let (status, headers, first) = post_messages(&sim, &auth, &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(headers.contains_key("request-id"));
    assert_eq!(first["type"], "message");
    assert_eq!(first["content"][0]["type"], "text");
    assert_eq!(first["stop_reason"], "end_turn");
    let written = first["usage"]["cache_creation_input_tokens"]
        .as_u64()
        .unwrap();
    assert!(written >= 1024, "{first}");
    assert_eq!(first["usage"]["cache_read_input_tokens"], 0);
    let (_, _, second) = post_messages(&sim, &auth, &body).await;
    assert_eq!(second["usage"]["cache_read_input_tokens"], written);
    assert_eq!(second["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(
        second["usage"]["input_tokens"], first["usage"]["input_tokens"],
        "input_tokens leaves the cached tokens out"
    );
    let bill = sim.bill()[CLAUDE];
    assert_eq!(
        (bill.requests, bill.cache_write_tokens, bill.cached_tokens),
        (2, written, written)
    );

    sim.set_config(|c| c.error_rate = 1.0);
    let (status, _, error) = post_messages(&sim, &auth, &body).await;
    assert_eq!(status, 529);
    assert_eq!(error["error"]["type"], "overloaded_error");

    sim.set_config(|c| {
        c.error_rate = 0.0;
        c.rpm = 1;
    });
    let _ = post_messages(&sim, &auth, &body).await;
    let (status, headers, error) = post_messages(&sim, &auth, &body).await;
    assert_eq!(status, 429);
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(headers["anthropic-ratelimit-requests-limit"], "1");
    assert_eq!(headers["anthropic-ratelimit-requests-remaining"], "0");
    let reset = headers["anthropic-ratelimit-requests-reset"]
        .to_str()
        .unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(reset).is_ok(),
        "{reset}"
    );
    let stats = sim.model_stats()[CLAUDE];
    assert_eq!((stats.server_errors, stats.rate_limited), (1, 1));

    // Scripted faults answer in Anthropic's words.
    sim.set_config(|c| c.rpm = 0);
    for (spec, status, kind) in [
        ("quota@0s..1h:claude-broke", 400, "invalid_request_error"),
        ("outage@0s..1h:claude-down", 529, "overloaded_error"),
        (
            "unauthorized@0s..1h:claude-locked",
            401,
            "authentication_error",
        ),
    ] {
        sim.add_fault(spec.parse().unwrap()).unwrap();
        let model = spec.rsplit(':').next().unwrap();
        let mut body = body.clone();
        body["model"] = json!(model);
        let (got, _, error) = post_messages(&sim, &auth, &body).await;
        assert_eq!(
            (got, &error["error"]["type"]),
            (status, &json!(kind)),
            "{spec}"
        );
    }
    sim.shutdown().await;
}
