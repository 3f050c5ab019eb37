//! The simulated provider over real HTTP: each test starts a `SimServer` on
//! a free port and talks to it with reqwest, as batchd's provider client does.

#[path = "common/openapi.rs"]
mod openapi;

use std::time::{Duration, Instant};

use batchd::sim::{SimConfig, SimServer, SimStats};
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
