//! The task decoder, both encodings: the first byte picks the Content-Type,
//! the rest is the body. A valid task is also routed (template rendering,
//! output limits) and its outcome encoded. Nothing may panic, and every
//! rejection message stays bounded.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use batchd_actors::codec::{decode_task, encode, Inbound, ReplyPolicy, MAX_MESSAGE_CHARS};
use batchd_actors::routing::{plan, Catalog, TaskType, TierModels};
use batchd_actors::task::{Priority, Tier};
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<ReplyPolicy> = LazyLock::new(|| ReplyPolicy::default_for("batchd"));

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| {
    let task_type = |template: &str| TaskType {
        system_prompt: "You are terse.".into(),
        template: template.into(),
        default_tier: Tier::Auto,
        max_tokens: 64,
        route: None,
    };
    let mut task_types = BTreeMap::new();
    task_types.insert("default".to_owned(), task_type("{text}"));
    task_types.insert(
        "summarization".to_owned(),
        task_type("In {options.language}, {options}: {text} {unknown} {"),
    );
    let models = ["m-small", "m-mid", "m-big"];
    Catalog {
        task_types,
        tiers: TierModels {
            simple: models[0].into(),
            standard: models[1].into(),
            complex: models[2].into(),
            auto_simple_max_chars: 100,
            auto_standard_max_chars: 1000,
            rules: Vec::new(),
            classifier: Default::default(),
        },
        model_providers: models
            .iter()
            .map(|m| (m.to_string(), "p".to_owned()))
            .collect::<HashMap<_, _>>(),
        batch_providers: Default::default(),
        route_policy: Default::default(),
        service_tiers: Default::default(),
        marks_cache_prefix: ["p".to_owned()].into_iter().collect(),
    }
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 5 {
        0 => None,
        1 => Some("application/json"),
        2 => Some("application/msgpack"),
        3 => Some("Application/X-MsgPack; charset=binary"),
        _ => Some("text/plain"),
    };
    let inbound = Inbound {
        priority: Priority::P2,
        content_type,
        body,
        published_at: chrono::DateTime::UNIX_EPOCH,
        max_payload_bytes: 262_144,
        generation: 0,
        reply_to: &POLICY,
    };
    match decode_task(inbound) {
        Ok(task) => {
            if let Ok(p) = plan(&task, &CATALOG, chrono::DateTime::<chrono::Utc>::UNIX_EPOCH) {
                assert!(p.request.get("model").is_some());
            }
            let _ = encode(&task.original, task.encoding);
        }
        Err(r) => {
            assert!(r.message.chars().count() <= MAX_MESSAGE_CHARS);
            let _ = encode(&r.original, r.encoding);
        }
    }
});
