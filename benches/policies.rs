//! Micro-benchmarks of the engine's plain functions, the per-task work of
//! the Intake and the Dispatcher: decoding (JSON and MessagePack), routing
//! and rendering, pricing, backoff. `cargo bench --bench policies`.

use std::hint::black_box;

use batchd::config::Config;
use batchd_actors::backoff::RetryPolicy;
use batchd_actors::codec::{decode_task, Inbound, ReplyPolicy};
use batchd_actors::pricing::{cost, ModelPrice};
use batchd_actors::routing::{plan, render};
use batchd_actors::task::{Priority, Usage};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

fn seed_task() -> Value {
    json!({
        "task_id": "t_8a7b6c5d",
        "type": "summarization",
        "payload": {
            "text": "Quarterly revenue grew while churn fell; the team shipped two releases and hired three engineers.",
            "options": {"language": "en", "max_words": 50}
        },
        "priority": 2,
        "tenant": "acme",
        "metadata": {"n": 42}
    })
}

fn batch_line() -> Value {
    json!({
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4.1-nano",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello."}
            ],
            "max_tokens": 20
        }
    })
}

static REPLY_POLICY: std::sync::LazyLock<ReplyPolicy> =
    std::sync::LazyLock::new(|| ReplyPolicy::default_for("batchd"));

fn inbound<'a>(body: &'a [u8], content_type: Option<&'a str>) -> Inbound<'a> {
    Inbound {
        priority: Priority::P2,
        content_type,
        body,
        published_at: chrono::Utc::now(),
        max_payload_bytes: 262_144,
        generation: 0,
        reply_to: &REPLY_POLICY,
    }
}

fn decoding(c: &mut Criterion) {
    let json_body = serde_json::to_vec(&seed_task()).expect("json");
    let msgpack_body = rmp_serde::to_vec_named(&seed_task()).expect("msgpack");
    let line_body = serde_json::to_vec(&batch_line()).expect("json");
    let mut g = c.benchmark_group("codec::decode_task");
    g.bench_function("task, JSON", |b| {
        b.iter(|| decode_task(black_box(inbound(&json_body, None))))
    });
    g.bench_function("task, MessagePack", |b| {
        b.iter(|| {
            decode_task(black_box(inbound(
                &msgpack_body,
                Some("application/msgpack"),
            )))
        })
    });
    g.bench_function("OpenAI Batch line, JSON", |b| {
        b.iter(|| decode_task(black_box(inbound(&line_body, Some("application/json")))))
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    let catalog = Config::defaults()
        .expect("default config")
        .engine_settings()
        .catalog;
    let json_body = serde_json::to_vec(&seed_task()).expect("json");
    let task = decode_task(inbound(&json_body, None)).expect("a valid task");
    let line_body = serde_json::to_vec(&batch_line()).expect("json");
    let chat = decode_task(inbound(&line_body, None)).expect("a valid line");
    let mut g = c.benchmark_group("routing");
    g.bench_function("plan, text payload", |b| {
        b.iter(|| plan(black_box(&task), black_box(&catalog), chrono::Utc::now()))
    });
    g.bench_function("plan, chat payload", |b| {
        b.iter(|| plan(black_box(&chat), black_box(&catalog), chrono::Utc::now()))
    });
    let options = json!({"language": "en", "max_words": 50, "labels": "a,b,c"});
    let options = options.as_object().expect("an object").clone();
    let template =
        "Summarize the following in {options.language}, at most {options.max_words} words:\n\n{text}";
    let text = "Quarterly revenue grew while churn fell. ".repeat(20);
    g.bench_function("render", |b| {
        b.iter(|| render(black_box(template), black_box(&text), black_box(&options)))
    });
    g.finish();
}

fn pricing(c: &mut Criterion) {
    let price = ModelPrice {
        input: 0.15,
        cached_input: 0.075,
        output: 0.60,
        cache_write: None,
    };
    let usage = Usage {
        input_tokens: 812,
        cached_input_tokens: 768,
        output_tokens: 41,
        ..Usage::default()
    };
    c.bench_function("pricing::cost", |b| {
        b.iter(|| cost(black_box(&price), black_box(&usage)))
    });
}

fn backoff(c: &mut Criterion) {
    let policy = RetryPolicy {
        max_attempts: 5,
        base_delay_ms: 500,
        max_delay_ms: 60_000,
    };
    let mut rng = StdRng::seed_from_u64(7);
    let mut attempt = 0u32;
    c.bench_function("backoff::RetryPolicy::delay", |b| {
        b.iter(|| {
            attempt = attempt % 10 + 1;
            policy.delay(black_box(attempt), &mut rng)
        })
    });
}

criterion_group!(benches, decoding, routing, pricing, backoff);
criterion_main!(benches);
