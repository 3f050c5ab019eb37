//! The simulated provider over real HTTP: each test starts a `SimServer` on
//! a free port and talks to it with reqwest, as batchd's provider client does.

use crate::common::openapi;

use std::time::{Duration, Instant};

use batchd::sim::{Fault, FaultKind, SimConfig, SimServer, SimStats};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Sim {
    server: SimServer,
    client: reqwest::Client,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no '{name}' header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    fn content(&self) -> &str {
        self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("no content in {}", self.body))
    }

    fn usage(&self, field: &str) -> u64 {
        self.body["usage"][field]
            .as_u64()
            .unwrap_or_else(|| panic!("no usage.{field} in {}", self.body))
    }

    fn cached_tokens(&self) -> u64 {
        self.body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cached_tokens in {}", self.body))
    }

    /// Asserts OpenAI's error body and returns its `error` object.
    fn error(&self, status: StatusCode, kind: &str) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        let error = &self.body["error"];
        assert_eq!(error["type"], kind, "{}", self.body);
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
        let fields: Vec<&str> = error
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in ["message", "type", "param", "code"] {
            assert!(fields.contains(&field), "no error.{field} in {}", self.body);
        }
        error
    }
}

impl Sim {
    async fn start(config: SimConfig) -> Sim {
        let server = SimServer::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .expect("simulator starts");
        Sim {
            server,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    /// The simulator's own `/sim/...` routes, outside `/v1`.
    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr())
    }

    fn add_fault(&self, spec: &str) {
        self.server.add_fault(fault(spec)).expect("valid fault");
    }

    async fn chat(&self, body: &Value) -> Reply {
        self.send(self.client.post(self.url("/chat/completions")).json(body))
            .await
    }

    /// `chat` with an owned body, for building many futures at once.
    async fn chat_owned(&self, body: Value) -> Reply {
        self.chat(&body).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("simulator answers");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body arrives");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {text}"));
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn stop(self) -> SimStats {
        let stats = self.server.stats();
        self.server.shutdown().await;
        stats
    }
}

fn ask(model: &str, question: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a careful analyst."},
            {"role": "user", "content": question}
        ]
    })
}

fn fault(spec: &str) -> Fault {
    spec.parse()
        .unwrap_or_else(|error| panic!("{spec}: {error}"))
}

/// The simulator's documented estimate: four characters a token.
fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

#[tokio::test]
async fn same_request_gets_the_same_answer_and_a_different_request_another() {
    let sim = Sim::start(SimConfig::default()).await;
    let question = ask(
        "gpt-4.1-mini",
        "Summarise the quarterly sales report for the board",
    );

    let first = sim.chat(&question).await;
    let again = sim.chat(&question).await;
    let other_question = sim
        .chat(&ask("gpt-4.1-mini", "List the risks in the contract"))
        .await;
    let other_model = sim
        .chat(&ask(
            "gpt-4.1",
            "Summarise the quarterly sales report for the board",
        ))
        .await;

    for reply in [&first, &again, &other_question, &other_model] {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    assert_eq!(first.content(), again.content());
    assert_ne!(first.content(), other_question.content());
    assert_ne!(first.content(), other_model.content());
    assert!(
        first.content().starts_with("Simulated answer "),
        "{}",
        first.content()
    );
    assert!(
        first
            .content()
            .contains("Summarise the quarterly sales report"),
        "the answer quotes the question: {}",
        first.content()
    );
    assert_ne!(
        first.body["id"], again.body["id"],
        "every completion has its own id"
    );
    assert_ne!(first.header("x-request-id"), again.header("x-request-id"));
    assert_eq!(sim.stop().await.succeeded, 4);
}

#[tokio::test]
async fn usage_adds_up_and_follows_the_token_estimate() {
    let sim = Sim::start(SimConfig::default()).await;
    let system = "You are a careful analyst.";
    let user = "Classify the sentiment of: the delivery was late but the support team was great.";
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]
    });

    let reply = sim.chat(&body).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // 3 tokens prime the reply; each message costs 3 + 1 for its role + its content.
    let expected_prompt = 3 + (4 + tokens(system)) + (4 + tokens(user));
    assert_eq!(reply.usage("prompt_tokens"), expected_prompt);
    assert_eq!(reply.usage("completion_tokens"), tokens(reply.content()));
    assert_eq!(
        reply.usage("total_tokens"),
        reply.usage("prompt_tokens") + reply.usage("completion_tokens")
    );
    assert_eq!(reply.cached_tokens(), 0, "short prompts are never cached");
    let details = &reply.body["usage"]["completion_tokens_details"];
    assert_eq!(
        *details,
        json!({"reasoning_tokens": 0, "audio_tokens": 0,
               "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0})
    );
    assert_eq!(
        reply.body["usage"]["prompt_tokens_details"]["audio_tokens"],
        0
    );
    sim.stop().await;
}

#[tokio::test]
async fn repeated_long_prefix_reports_cached_tokens_in_steps_of_128() {
    let sim = Sim::start(SimConfig::default()).await;
    // About 1500 tokens of shared instructions, then a short varying question.
    let instructions = "Follow the house style guide for every answer. ".repeat(125);
    let body = |question: &str| {
        json!({
            "model": "gpt-4.1-mini",
            "messages": [
                {"role": "system", "content": instructions},
                {"role": "user", "content": question}
            ]
        })
    };

    let first = sim.chat(&body("Rate ticket 1")).await;
    let second = sim.chat(&body("Rate ticket 2")).await;
    let other_model = sim
        .chat(&json!({"model": "gpt-4.1", "messages": body("Rate ticket 3")["messages"]}))
        .await;

    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert!(first.usage("prompt_tokens") >= 1024, "{}", first.body);
    assert_eq!(first.cached_tokens(), 0, "nothing seen before");
    let cached = second.cached_tokens();
    assert!(cached >= 1024, "shared prefix cached: {}", second.body);
    assert_eq!(cached % 128, 0, "cached in steps of 128: {cached}");
    assert!(cached <= second.usage("prompt_tokens"));
    assert!(
        second.usage("prompt_tokens") - cached < 128 + 64,
        "only the tail after the shared prefix is uncached: {}",
        second.body
    );
    assert_eq!(other_model.cached_tokens(), 0, "the cache is per model");
    sim.stop().await;
}

#[tokio::test]
async fn responses_and_requests_validate_against_the_openai_spec() {
    let sim = Sim::start(SimConfig::default()).await;
    let requests = [
        ask("gpt-5-mini", "Write a haiku about queues"),
        json!({
            "model": "gpt-4.1-nano",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this"}]}],
            "n": 2,
            "max_completion_tokens": 8,
            "response_format": {"type": "json_object"},
            "temperature": 0.2
        }),
    ];
    for request in requests {
        openapi::validate_chat_request(&request).expect("the test's request is valid");
        let reply = sim.chat(&request).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        if let Err(errors) = openapi::validate_chat_response(&reply.body) {
            panic!("response breaks the spec: {errors:#?}\n{}", reply.body);
        }
        assert_eq!(reply.body["object"], "chat.completion");
        assert!(reply.body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(reply.body["model"], request["model"]);
        assert_eq!(reply.body["service_tier"], "default");
        assert_eq!(reply.body["choices"][0]["message"]["refusal"], Value::Null);
        assert_eq!(
            reply.body["choices"][0]["message"]["annotations"],
            json!([])
        );
        assert_eq!(reply.body["choices"][0]["logprobs"], Value::Null);
        assert!(reply.header("content-type").starts_with("application/json"));
        assert!(reply.header("openai-processing-ms").parse::<u64>().is_ok());
    }
    sim.stop().await;
}

#[test]
fn spec_validation_rejects_bodies_that_break_the_spec() {
    let good_response = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                     "message": {"role": "assistant", "content": "hi", "refusal": null}}]
    });
    assert_eq!(openapi::validate_chat_response(&good_response), Ok(()));

    let mut bad_reason = good_response.clone();
    bad_reason["choices"][0]["finish_reason"] = json!("done");
    let mut no_choices = good_response.clone();
    no_choices.as_object_mut().unwrap().remove("choices");
    for bad in [bad_reason, no_choices] {
        assert!(
            openapi::validate_chat_response(&bad).is_err(),
            "accepted {bad}"
        );
    }

    // `max_completion_tokens` is `nullable` in the spec: null must pass.
    let nullable = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                          "max_completion_tokens": null});
    assert_eq!(openapi::validate_chat_request(&nullable), Ok(()));
    let bad_role = json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]});
    assert!(openapi::validate_chat_request(&bad_role).is_err());
    let no_messages = json!({"model": "m"});
    assert!(openapi::validate_chat_request(&no_messages).is_err());
}

#[tokio::test]
async fn invalid_bodies_get_400_with_openai_error_shape() {
    let sim = Sim::start(SimConfig::default()).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"messages": user}), Value::Null),
        (json!({"model": 42, "messages": user}), json!("model")),
        (json!({"model": "gpt-5"}), json!("messages")),
        (json!({"model": "gpt-5", "messages": []}), json!("messages")),
        (
            json!({"model": "gpt-5", "messages": {"role": "user"}}),
            json!("messages"),
        ),
        (
            json!({"model": "gpt-5", "messages": [{"role": "robot", "content": "hi"}]}),
            json!("messages[0].role"),
        ),
        (
            json!({"model": "gpt-5", "messages": [{"content": "hi"}]}),
            json!("messages[0].role"),
        ),
        (
            json!({"model": "gpt-5", "messages": user, "n": 0}),
            json!("n"),
        ),
    ];
    for (body, param) in &cases {
        let reply = sim.chat(body).await;
        let error = reply.error(StatusCode::BAD_REQUEST, "invalid_request_error");
        assert_eq!(error["param"], *param, "{body} -> {}", reply.body);
        assert!(reply.headers.contains_key("x-request-id"));
    }

    let streaming = sim
        .chat(&json!({"model": "gpt-5", "messages": user, "stream": true}))
        .await;
    let error = streaming.error(StatusCode::BAD_REQUEST, "invalid_request_error");
    assert_eq!(
        error["message"],
        "streaming is not supported by the simulator"
    );
    assert_eq!(error["param"], "stream");

    let not_json = sim
        .send(
            sim.client
                .post(sim.url("/chat/completions"))
                .header("content-type", "application/json")
                .body("{\"model\": "),
        )
        .await;
    let error = not_json.error(StatusCode::BAD_REQUEST, "invalid_request_error");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("could not parse the JSON body"));

    let stats = sim.stop().await;
    assert_eq!(stats.bad_requests, cases.len() as u64 + 2);
    assert_eq!(stats.succeeded, 0);
}

#[tokio::test]
async fn api_key_is_optional_but_a_malformed_authorization_gets_401() {
    let sim = Sim::start(SimConfig::default()).await;
    let body = ask("gpt-5-nano", "ping");
    let post = || sim.client.post(sim.url("/chat/completions")).json(&body);

    let with_key = sim.send(post().bearer_auth("sk-anything")).await;
    let malformed = sim
        .send(post().header("authorization", "sk-anything"))
        .await;

    assert_eq!(with_key.status, StatusCode::OK, "{}", with_key.body);
    let error = malformed.error(StatusCode::UNAUTHORIZED, "invalid_request_error");
    assert_eq!(error["code"], "invalid_api_key");
    sim.stop().await;
}

#[tokio::test]
async fn requests_over_rpm_get_429_with_retry_after_and_ratelimit_headers() {
    let sim = Sim::start(SimConfig {
        rpm: 3,
        ..SimConfig::default()
    })
    .await;
    let body = ask("gpt-4.1-mini", "Tag this article");

    let mut remaining = Vec::new();
    for _ in 0..3 {
        let reply = sim.chat(&body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.header("x-ratelimit-limit-requests"), "3");
        assert!(reply.header("x-ratelimit-reset-requests").ends_with('s'));
        assert!(
            !reply.headers.contains_key("x-ratelimit-limit-tokens"),
            "no tpm set"
        );
        remaining.push(reply.header("x-ratelimit-remaining-requests").to_owned());
    }
    assert_eq!(remaining, ["2", "1", "0"]);

    let limited = sim.chat(&body).await;
    let error = limited.error(StatusCode::TOO_MANY_REQUESTS, "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["param"], Value::Null);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("Rate limit reached for gpt-4.1-mini"),
        "{error}"
    );
    // One request comes back every 20 s at 3 per minute.
    let retry_after: u64 = limited.header("retry-after").parse().unwrap();
    assert!((1..=20).contains(&retry_after), "retry-after {retry_after}");
    let retry_after_ms: u64 = limited.header("retry-after-ms").parse().unwrap();
    assert!(
        (1..=20_000).contains(&retry_after_ms),
        "retry-after-ms {retry_after_ms}"
    );
    assert_eq!(retry_after, retry_after_ms.div_ceil(1000));
    assert_eq!(limited.header("x-ratelimit-limit-requests"), "3");
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), "0");

    let stats = sim.stop().await;
    assert_eq!(
        stats,
        SimStats {
            requests: 4,
            succeeded: 3,
            rate_limited: 1,
            server_errors: 0,
            bad_requests: 0,
            ..SimStats::default()
        }
    );
}

#[tokio::test]
async fn tokens_over_tpm_get_429_of_type_tokens() {
    let sim = Sim::start(SimConfig {
        tpm: 1000,
        ..SimConfig::default()
    })
    .await;
    // About 700 prompt tokens: the first fits in 1000 per minute, the second does not.
    let long = ask(
        "gpt-4o-mini",
        &"Extract every date from this log line. ".repeat(70),
    );
    let too_large = ask("gpt-4o-mini", &"x".repeat(8000));

    let first = sim.chat(&long).await;
    let second = sim.chat(&long).await;
    let never = sim.chat(&too_large).await;

    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.header("x-ratelimit-limit-tokens"), "1000");
    let remaining: u64 = first
        .header("x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        remaining >= 1000 - first.usage("total_tokens"),
        "{remaining}"
    );
    assert!(
        !first.headers.contains_key("x-ratelimit-limit-requests"),
        "no rpm set"
    );

    let error = second.error(StatusCode::TOO_MANY_REQUESTS, "tokens");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(second.header("retry-after").parse::<u64>().unwrap() >= 1);

    let error = never.error(StatusCode::TOO_MANY_REQUESTS, "tokens");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("Request too large"),
        "{error}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn error_rate_one_answers_every_request_with_openai_server_error() {
    let sim = Sim::start(SimConfig::default()).await;
    let body = ask("gpt-5", "Draft a reply");
    sim.server.set_config(|config| config.error_rate = 1.0);

    let failed = sim.chat(&body).await;
    sim.server.set_config(|config| config.error_rate = 0.0);
    let recovered = sim.chat(&body).await;

    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        failed.body,
        json!({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": null,
            "code": null
        }})
    );
    assert!(failed.headers.contains_key("x-request-id"));
    assert_eq!(recovered.status, StatusCode::OK, "{}", recovered.body);
    let stats = sim.stop().await;
    assert_eq!((stats.server_errors, stats.succeeded), (1, 1));
}

#[tokio::test]
async fn injected_errors_follow_the_seed() {
    async fn outcomes(seed: u64) -> Vec<StatusCode> {
        let sim = Sim::start(SimConfig {
            error_rate: 0.5,
            seed,
            ..SimConfig::default()
        })
        .await;
        let mut statuses = Vec::new();
        for i in 0..40 {
            statuses.push(
                sim.chat(&ask("gpt-5-nano", &format!("task {i}")))
                    .await
                    .status,
            );
        }
        sim.stop().await;
        statuses
    }

    let first = outcomes(7).await;
    assert_eq!(first, outcomes(7).await, "same seed, same failures");
    assert_ne!(first, outcomes(8).await, "another seed, other failures");
    let failures = first
        .iter()
        .filter(|status| **status == StatusCode::INTERNAL_SERVER_ERROR)
        .count();
    assert!(
        (8..=32).contains(&failures),
        "{failures} of 40 failed at rate 0.5"
    );
}

#[tokio::test]
async fn small_output_limit_truncates_with_finish_reason_length() {
    let sim = Sim::start(SimConfig::default()).await;
    let mut body = ask("gpt-4.1", "Write a detailed report on the incident");

    let full = sim.chat(&body).await;
    body["max_completion_tokens"] = json!(5);
    let limited = sim.chat(&body).await;
    body.as_object_mut()
        .unwrap()
        .remove("max_completion_tokens");
    body["max_tokens"] = json!(7);
    let legacy = sim.chat(&body).await;

    assert_eq!(full.body["choices"][0]["finish_reason"], "stop");
    assert_eq!(limited.body["choices"][0]["finish_reason"], "length");
    assert_eq!(limited.usage("completion_tokens"), 5);
    assert!(
        full.content().starts_with(limited.content()),
        "a prefix of the full answer"
    );
    assert_eq!(legacy.body["choices"][0]["finish_reason"], "length");
    assert_eq!(legacy.usage("completion_tokens"), 7);
    sim.stop().await;
}

#[tokio::test]
async fn several_choices_when_n_is_set() {
    let sim = Sim::start(SimConfig::default()).await;
    let mut body = ask("gpt-5-mini", "Suggest a product name");
    body["n"] = json!(3);

    let reply = sim.chat(&body).await;

    let choices = reply.body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (index, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], index);
    }
    assert_ne!(
        choices[1]["message"]["content"],
        choices[2]["message"]["content"]
    );
    let completion: u64 = choices
        .iter()
        .map(|choice| tokens(choice["message"]["content"].as_str().unwrap()))
        .sum();
    assert_eq!(reply.usage("completion_tokens"), completion);
    sim.stop().await;
}

#[tokio::test]
async fn latency_is_applied_before_answering() {
    let sim = Sim::start(SimConfig {
        latency: Duration::from_millis(150),
        ..SimConfig::default()
    })
    .await;

    let started = Instant::now();
    let reply = sim.chat(&ask("gpt-5", "Wait for it")).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    let processing: u64 = reply.header("openai-processing-ms").parse().unwrap();
    assert!(processing >= 150, "openai-processing-ms {processing}");
    sim.stop().await;
}

#[tokio::test]
async fn records_request_bodies_when_asked() {
    let sim = Sim::start(SimConfig::default()).await;
    let before = ask("gpt-5", "not recorded");
    let during = [ask("gpt-5", "first"), json!({"model": "gpt-5"})];

    sim.chat(&before).await;
    sim.server
        .set_config(|config| config.record_requests = true);
    for body in &during {
        sim.chat(body).await;
    }

    assert_eq!(sim.server.recorded_requests(), during.to_vec());
    sim.stop().await;
}

#[tokio::test]
async fn models_endpoint_lists_models_in_openai_shape() {
    let sim = Sim::start(SimConfig::default()).await;

    let list = sim.send(sim.client.get(sim.url("/models"))).await;
    let one = sim
        .send(sim.client.get(sim.url("/models/gpt-4.1-mini")))
        .await;
    let unknown = sim
        .send(sim.client.get(sim.url("/models/no-such-model")))
        .await;

    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["object"], "list");
    let models = list.body["data"].as_array().unwrap();
    let ids: Vec<&str> = models.iter().filter_map(|m| m["id"].as_str()).collect();
    for id in [
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4o-mini",
        "gpt-5",
        "gpt-5-nano",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    for model in models {
        assert_eq!(model["object"], "model");
        assert!(
            model["created"].is_u64() && model["owned_by"].is_string(),
            "{model}"
        );
    }
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.body["id"], "gpt-4.1-mini");
    let error = unknown.error(StatusCode::NOT_FOUND, "invalid_request_error");
    assert_eq!(error["code"], "model_not_found");
    sim.stop().await;
}

#[tokio::test]
async fn unknown_routes_get_404_with_openai_error() {
    let sim = Sim::start(SimConfig::default()).await;

    let unknown = sim
        .send(sim.client.post(sim.url("/embeddings")).json(&json!({})))
        .await;
    let wrong_method = sim.send(sim.client.get(sim.url("/chat/completions"))).await;

    let error = unknown.error(StatusCode::NOT_FOUND, "invalid_request_error");
    assert_eq!(error["message"], "Invalid URL (POST /v1/embeddings)");
    let error = wrong_method.error(StatusCode::NOT_FOUND, "invalid_request_error");
    assert_eq!(error["message"], "Invalid URL (GET /v1/chat/completions)");
    sim.stop().await;
}

#[tokio::test]
async fn many_concurrent_requests_are_all_answered() {
    let sim = Sim::start(SimConfig::default()).await;
    let requests = (0..200).map(|i| sim.chat_owned(ask("gpt-5-nano", &format!("item {i}"))));

    let replies = futures::future::join_all(requests).await;

    assert!(replies.iter().all(|reply| reply.status == StatusCode::OK));
    assert_eq!(sim.stop().await.succeeded, 200);
}

#[tokio::test]
async fn each_fault_kind_answers_like_openai_for_its_model_only() {
    let sim = Sim::start(SimConfig::default()).await;
    for spec in [
        "outage@0s..1h:m-outage",
        "outage=500@0s..1h:m-outage-500",
        "unauthorized@0s..1h:m-unauthorized",
        "forbidden@0s..1h:m-forbidden",
        "model_not_found@0s..1h:m-not-found",
        "quota@0s..1h:m-quota",
        "rate_limit_storm=1500@0s..1h:m-storm",
    ] {
        sim.add_fault(spec);
    }
    let key = "sk-proj-0123456789abcdefghijklmnopqrstuvwxyzSECRET";
    let chat = |model: &str| {
        let request = sim
            .client
            .post(sim.url("/chat/completions"))
            .bearer_auth(key)
            .json(&ask(model, "Summarise the incident"));
        sim.send(request)
    };

    let outage = chat("m-outage").await;
    assert_eq!(
        outage.body,
        json!({"error": {"message": "The server is overloaded or not ready yet.",
                         "type": "server_error", "param": null, "code": null}})
    );
    assert_eq!(outage.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(outage.headers.contains_key("x-request-id"));

    let outage_500 = chat("m-outage-500").await;
    outage_500.error(StatusCode::INTERNAL_SERVER_ERROR, "server_error");

    let unauthorized = chat("m-unauthorized").await;
    let error = unauthorized.error(StatusCode::UNAUTHORIZED, "invalid_request_error");
    assert_eq!(error["code"], "invalid_api_key");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("Incorrect API key provided: sk-proj-****"),
        "{message}"
    );
    assert!(
        !message.contains(key) && !message.contains("SECRET"),
        "{message}"
    );
    assert!(
        message.contains("CRET."),
        "the last four characters show: {message}"
    );

    let forbidden = chat("m-forbidden").await;
    forbidden.error(StatusCode::FORBIDDEN, "request_forbidden");

    let not_found = chat("m-not-found").await;
    let error = not_found.error(StatusCode::NOT_FOUND, "invalid_request_error");
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(
        error["message"],
        "The model 'm-not-found' does not exist or you do not have access to it."
    );

    let quota = chat("m-quota").await;
    let error = quota.error(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota");
    assert_eq!(error["code"], "insufficient_quota");
    assert!(!quota.headers.contains_key("retry-after"));
    assert!(!quota.headers.contains_key("retry-after-ms"));

    let storm = chat("m-storm").await;
    let error = storm.error(StatusCode::TOO_MANY_REQUESTS, "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("Rate limit reached for m-storm"),
        "{error}"
    );
    assert_eq!(storm.header("retry-after-ms"), "1500");
    assert_eq!(storm.header("retry-after"), "2");
    assert_eq!(storm.header("x-ratelimit-remaining-requests"), "0");

    let other = chat("gpt-4.1-mini").await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);

    let model_stats = sim.server.model_stats();
    let stats = sim.stop().await;
    assert_eq!(
        stats,
        SimStats {
            requests: 8,
            succeeded: 1,
            rate_limited: 1,
            unavailable: 2,
            auth_errors: 2,
            not_found: 1,
            quota_errors: 1,
            ..SimStats::default()
        }
    );
    assert_eq!(model_stats.len(), 8);
    assert_eq!(
        model_stats["m-quota"],
        SimStats {
            requests: 1,
            quota_errors: 1,
            ..SimStats::default()
        }
    );
    assert_eq!(model_stats["gpt-4.1-mini"].succeeded, 1);
}

#[tokio::test]
async fn unauthorized_fault_without_a_key_asks_for_one() {
    let sim = Sim::start(SimConfig::default()).await;
    sim.add_fault("unauthorized@0s..1h");

    let reply = sim.chat(&ask("gpt-5", "hello")).await;

    let error = reply.error(StatusCode::UNAUTHORIZED, "invalid_request_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("You didn't provide an API key."),
        "{error}"
    );
    assert_eq!(sim.stop().await.auth_errors, 1);
}

#[tokio::test]
async fn slow_fault_delays_only_its_model() {
    let sim = Sim::start(SimConfig::default()).await;
    sim.add_fault("slow=300@0s..1h:gpt-4.1");

    let started = Instant::now();
    let slowed = sim.chat(&ask("gpt-4.1", "Take your time")).await;
    let slowed_took = started.elapsed();
    let other = sim.chat(&ask("gpt-4.1-mini", "Be quick")).await;

    assert_eq!(slowed.status, StatusCode::OK, "{}", slowed.body);
    assert!(slowed_took >= Duration::from_millis(300), "{slowed_took:?}");
    let processing: u64 = slowed.header("openai-processing-ms").parse().unwrap();
    assert!(processing >= 300, "openai-processing-ms {processing}");
    assert_eq!(other.status, StatusCode::OK);
    let processing: u64 = other.header("openai-processing-ms").parse().unwrap();
    assert!(
        processing < 300,
        "another model is not slowed: {processing} ms"
    );
    sim.stop().await;
}

#[tokio::test]
async fn fault_window_opens_and_closes_on_the_sim_clock() {
    let sim = Sim::start(SimConfig::default()).await;
    let body = ask("gpt-5-mini", "Are you there?");
    sim.add_fault("outage@500ms..900ms");
    sim.server.reset_clock();

    let before = sim.chat(&body).await;
    tokio::time::sleep(Duration::from_millis(500).saturating_sub(sim.server.clock())).await;
    let during = sim.chat(&body).await;
    tokio::time::sleep(Duration::from_millis(900).saturating_sub(sim.server.clock())).await;
    let after = sim.chat(&body).await;

    assert_eq!(before.status, StatusCode::OK, "{}", before.body);
    assert_eq!(
        during.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        during.body
    );
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    let stats = sim.stop().await;
    assert_eq!((stats.succeeded, stats.unavailable), (2, 1));
}

#[tokio::test]
async fn clearing_faults_ends_them_at_once() {
    let sim = Sim::start(SimConfig::default()).await;
    let body = ask("gpt-5", "ping");
    sim.add_fault("quota@0s..1h");

    let during = sim.chat(&body).await;
    sim.server.clear_faults();
    let after = sim.chat(&body).await;

    assert_eq!(during.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    assert!(sim.server.faults().is_empty());
    sim.stop().await;
}

/// Sends a chat completion with `client`; `Err` when the connection fails.
async fn try_chat(sim: &Sim, client: &reqwest::Client) -> Result<StatusCode, reqwest::Error> {
    let response = client
        .post(sim.url("/chat/completions"))
        .json(&ask("gpt-5-nano", "still there?"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    Ok(response.status())
}

/// A client without connection reuse: every request connects anew.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test]
async fn refuse_closes_the_port_drops_open_connections_and_reopens_on_the_same_port() {
    let sim = Sim::start(SimConfig::default()).await;
    let fresh = fresh_client();
    // `sim.client` keeps its connection alive between requests.
    assert_eq!(try_chat(&sim, &sim.client).await.unwrap(), StatusCode::OK);

    let now = sim.server.clock();
    let until = now + Duration::from_millis(600);
    sim.server
        .add_fault(Fault::new(FaultKind::Refuse, now..until))
        .unwrap();

    // The listener closes as soon as its task sees the new fault.
    let deadline = Instant::now() + Duration::from_millis(500);
    let refused = loop {
        match try_chat(&sim, &fresh).await {
            Err(error) => break error,
            Ok(_) if Instant::now() < deadline => tokio::task::yield_now().await,
            Ok(status) => panic!("still served ({status}) after the refusal started"),
        }
    };
    assert!(refused.is_connect(), "{refused:?}");
    let kept_alive = try_chat(&sim, &sim.client).await;
    assert!(kept_alive.is_err(), "{kept_alive:?}");

    // It reopens on the same address when the window ends, not before.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match try_chat(&sim, &fresh).await {
            Ok(status) => {
                assert_eq!(status, StatusCode::OK);
                break;
            }
            Err(error) if Instant::now() < deadline => {
                assert!(error.is_connect(), "{error:?}");
                assert!(sim.server.clock() < until + Duration::from_secs(1));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("never reopened: {error:?}"),
        }
    }
    assert!(sim.server.clock() >= until, "reopened early");
    assert_eq!(try_chat(&sim, &sim.client).await.unwrap(), StatusCode::OK);

    let stats = sim.stop().await;
    assert!(stats.dropped_connections >= 1, "{stats:?}");
    assert_eq!(
        stats.succeeded, 3,
        "refused requests never arrive: {stats:?}"
    );
}

#[tokio::test]
async fn refuse_cuts_a_request_in_flight() {
    let sim = Sim::start(SimConfig {
        latency: Duration::from_secs(5),
        ..SimConfig::default()
    })
    .await;
    let started = Instant::now();
    let in_flight = try_chat(&sim, &sim.client);
    let refuse = async {
        while sim.server.stats().requests == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let now = sim.server.clock();
        sim.server
            .add_fault(Fault::new(
                FaultKind::Refuse,
                now..now + Duration::from_millis(200),
            ))
            .unwrap();
    };

    let (result, ()) = tokio::join!(in_flight, refuse);

    assert!(result.is_err(), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sim.stop().await.succeeded, 0);
}

#[tokio::test]
async fn admin_api_adds_lists_and_clears_faults_and_reports_stats() {
    let sim = Sim::start(SimConfig::default()).await;
    let admin =
        |method: reqwest::Method, path: &str| sim.client.request(method, sim.admin_url(path));

    let added = sim
        .send(admin(reqwest::Method::POST, "/sim/faults").json(
            &json!({"kind": "unauthorized", "from": "0s", "until": "1h", "model": "gpt-4.1-nano"}),
        ))
        .await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.body);
    let added = sim
        .send(admin(reqwest::Method::POST, "/sim/faults").json(&json!([
            {"kind": "slow", "value": 10, "from": "0s", "until": "1h"},
            {"kind": "refuse", "from": "50m", "until": "1h"}
        ])))
        .await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.body);
    assert_eq!(
        added.body["faults"],
        json!([
            {"kind": "unauthorized", "from": "0s", "until": "1h0m0s", "model": "gpt-4.1-nano"},
            {"kind": "slow", "value": 10, "from": "0s", "until": "1h0m0s"},
            {"kind": "refuse", "from": "50m0s", "until": "1h0m0s"}
        ])
    );

    let invalid = sim
        .send(admin(reqwest::Method::POST, "/sim/faults").json(&json!([
            {"kind": "quota", "from": "0s", "until": "1h"},
            {"kind": "refuse", "from": "0s", "until": "1h", "model": "gpt-5"}
        ])))
        .await;
    let error = invalid.error(StatusCode::BAD_REQUEST, "invalid_request_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("cannot be limited to one model"),
        "{error}"
    );
    assert_eq!(sim.server.faults().len(), 3, "all or nothing");

    let denied = sim.chat(&ask("gpt-4.1-nano", "hi")).await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    let served = sim.chat(&ask("gpt-4.1-mini", "hi")).await;
    assert_eq!(served.status, StatusCode::OK);

    let stats = sim.send(admin(reqwest::Method::GET, "/sim/stats")).await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.body["requests"], 2);
    assert_eq!(stats.body["auth_errors"], 1);
    assert_eq!(stats.body["unavailable"], 0);
    assert_eq!(stats.body["models"]["gpt-4.1-nano"]["auth_errors"], 1);
    assert_eq!(stats.body["models"]["gpt-4.1-mini"]["succeeded"], 1);

    let reset = sim
        .send(admin(reqwest::Method::POST, "/sim/clock/reset"))
        .await;
    assert_eq!(reset.status, StatusCode::OK);
    assert!(sim.server.clock() < Duration::from_secs(1));
    let listed = sim.send(admin(reqwest::Method::GET, "/sim/faults")).await;
    assert_eq!(listed.body["faults"].as_array().unwrap().len(), 3);
    assert!(listed.body["clock"].as_str().unwrap().ends_with('s'));

    let cleared = sim
        .send(admin(reqwest::Method::DELETE, "/sim/faults"))
        .await;
    assert_eq!(cleared.body, json!({"cleared": 3}));
    let served = sim.chat(&ask("gpt-4.1-nano", "hi")).await;
    assert_eq!(served.status, StatusCode::OK);

    let not_json = sim
        .send(admin(reqwest::Method::POST, "/sim/faults").body("outage@1s..2s"))
        .await;
    not_json.error(StatusCode::BAD_REQUEST, "invalid_request_error");
    let wrong_method = sim.send(admin(reqwest::Method::PUT, "/sim/stats")).await;
    wrong_method.error(StatusCode::NOT_FOUND, "invalid_request_error");
    sim.stop().await;
}

#[tokio::test]
async fn recording_keeps_only_the_most_recent_bodies_up_to_the_limit() {
    let sim = Sim::start(SimConfig {
        record_requests: true,
        ..SimConfig::default()
    })
    .await;
    sim.server.set_record_limit(2);
    let bodies: Vec<Value> = (0..3).map(|i| ask("gpt-5", &format!("item {i}"))).collect();

    for body in &bodies {
        sim.chat(body).await;
    }

    assert_eq!(sim.server.recorded_requests(), bodies[1..].to_vec());
    sim.server.set_record_limit(1);
    assert_eq!(sim.server.recorded_requests(), bodies[2..].to_vec());
    sim.stop().await;
}

#[test]
fn sim_command_refuses_bad_faults_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad_file = dir.path().join("faults.json");
    std::fs::write(
        &bad_file,
        r#"[{"kind": "outage", "from": "10s", "until": "5s"}]"#,
    )
    .unwrap();
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec!["--fault".into(), "outage@10s..5s".into()],
            "the window 10s..5s is empty",
        ),
        (
            vec!["--fault".into(), "outage@10..20s".into()],
            "'10' is not a duration: each number needs a unit: ms, s, m or h",
        ),
        (
            vec!["--faults".into(), bad_file.display().to_string()],
            "the window 10s..5s is empty",
        ),
    ];
    for (args, expected) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
            .arg("sim")
            .args(["--addr", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn service_tiers_answer_as_openai_does_and_are_billed_apart() {
    let sim = Sim::start(SimConfig {
        latency: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    sim.server.set_flex_models(vec!["gpt-5-mini".into()]);
    let with_tier = |model: &str, tier: &str| {
        let mut body = ask(model, "Rate this review");
        body["service_tier"] = tier.into();
        body
    };

    // Flex on a model of the flex list: flex, slower, billed apart.
    let flex = with_tier("gpt-5-mini", "flex");
    openapi::validate_chat_request(&flex).expect("a flex request is valid");
    let started = Instant::now();
    let reply = sim.chat(&flex).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["service_tier"], "flex");
    assert!(started.elapsed() >= Duration::from_millis(300));
    openapi::validate_chat_response(&reply.body).expect("a flex answer is valid");
    // Flex on another model, `auto` and `default`: the default tier.
    for (model, tier) in [
        ("gpt-4.1-mini", "flex"),
        ("gpt-5-mini", "auto"),
        ("gpt-5-mini", "default"),
    ] {
        let reply = sim.chat(&with_tier(model, tier)).await;
        assert_eq!(reply.body["service_tier"], "default", "{model} {tier}");
    }
    // Priority (and its alias fast): billed apart.
    let reply = sim.chat(&with_tier("gpt-4.1-mini", "priority")).await;
    assert_eq!(reply.body["service_tier"], "priority");
    let reply = sim.chat(&with_tier("gpt-4.1-mini", "fast")).await;
    assert_eq!(reply.body["service_tier"], "priority");
    // An unknown tier is a 400 naming the field.
    let reply = sim.chat(&with_tier("gpt-5-mini", "cheap")).await;
    let error = reply.error(StatusCode::BAD_REQUEST, "invalid_request_error");
    assert_eq!(error["param"], "service_tier");

    let flex_bill = sim.server.flex_bill();
    assert_eq!(flex_bill["gpt-5-mini"].requests, 1);
    assert_eq!(
        flex_bill["gpt-5-mini"].completion_tokens,
        tokens(
            sim.chat(&flex).await.content() // the same request, the same answer
        )
    );
    assert_eq!(sim.server.priority_bill()["gpt-4.1-mini"].requests, 2);
    let bill = sim.server.bill();
    assert_eq!(bill["gpt-4.1-mini"].requests, 1);
    assert_eq!(bill["gpt-5-mini"].requests, 2);
    let tiers: Value = reqwest::get(sim.admin_url("/sim/tiers"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tiers["flex"]["gpt-5-mini"]["requests"], 2);
    assert_eq!(tiers["priority"]["gpt-4.1-mini"]["requests"], 2);
    assert_eq!(tiers["flex_models"], json!(["gpt-5-mini"]));
    sim.stop().await;
}

#[tokio::test]
async fn flex_requests_are_refused_at_the_unavailable_rate_and_not_billed() {
    let sim = Sim::start(SimConfig {
        tiers: batchd::sim::TierConfig {
            flex_unavailable_rate: 1.0,
            ..Default::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut body = ask("gpt-5-nano", "Enrich this record");
    body["service_tier"] = "flex".into();
    let reply = sim.chat(&body).await;
    let error = reply.error(StatusCode::TOO_MANY_REQUESTS, "resource_unavailable");
    assert_eq!(error["code"], "resource_unavailable");
    // The default tier of the same model is served.
    let reply = sim.chat(&ask("gpt-5-nano", "Enrich this record")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(sim.server.flex_bill().is_empty());
    let stats = sim.stop().await;
    assert_eq!((stats.resource_unavailable, stats.succeeded), (1, 1));
}
