//! The demo's workload: a reproducible mix of tasks over the three
//! priorities, the five task types, both encodings, OpenAI chat bodies and
//! Batch lines, prompts sharing a long prefix, a few bad inputs and duplicate
//! publishes, with realistic texts.

use batchd_actors::task::Priority;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Workloads at least this large include the deliberately bad inputs.
pub(crate) const MIN_TASKS_FOR_BAD_INPUTS: u64 = 100;

/// One message to publish.
#[derive(Clone)]
pub(crate) struct Message {
    pub(crate) priority: Priority,
    pub(crate) msg_id: String,
    pub(crate) content_type: &'static str,
    pub(crate) body: Bytes,
}

/// The demo's reproducible workload.
pub(crate) struct Workload {
    pub(crate) messages: Vec<Message>,
    /// Unique tasks per priority (what gets an outcome).
    pub(crate) per_priority: [u64; 3],
    pub(crate) msgpack: u64,
    pub(crate) chat: u64,
    pub(crate) batch_lines: u64,
    pub(crate) long_context: u64,
    pub(crate) bad: u64,
    pub(crate) duplicates: u64,
}

pub(crate) const TENANTS: [(&str, u32); 4] = [
    ("acme", 40),
    ("globex", 30),
    ("initech", 20),
    ("umbrella", 10),
];
pub(crate) const TYPES: [(&str, u32); 5] = [
    ("content_analysis", 25),
    ("classification", 30),
    ("summarization", 20),
    ("data_enrichment", 17),
    ("report_generation", 8),
];
pub(crate) const LANGUAGES: [(&str, u32); 5] =
    [("en", 70), ("de", 10), ("fr", 8), ("es", 8), ("ja", 4)];

impl Workload {
    /// `n` unique tasks (bad inputs included) plus a few duplicate publishes,
    /// the same for the same `seed`.
    pub(crate) fn generate(n: u64, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let handbook = handbook();
        let mut w = Workload {
            messages: Vec::with_capacity(usize::try_from(n).unwrap_or(0) + 8),
            per_priority: [0; 3],
            msgpack: 0,
            chat: 0,
            batch_lines: 0,
            long_context: 0,
            bad: 0,
            duplicates: 0,
        };
        let bad = if n >= MIN_TASKS_FOR_BAD_INPUTS {
            bad_inputs()
        } else {
            Vec::new()
        };
        let good = n - bad.len() as u64;
        for i in 0..good {
            let priority = pick(
                &mut rng,
                &[(Priority::P1, 10), (Priority::P2, 30), (Priority::P3, 60)],
            );
            let roll: f64 = rng.random();
            let (msg_id, body) = if roll < 0.01 {
                w.batch_lines += 1;
                batch_line(&mut rng, i)
            } else if roll < 0.03 {
                w.chat += 1;
                chat_task(&mut rng, i, priority)
            } else if roll < 0.07 {
                w.long_context += 1;
                handbook_task(&mut rng, i, priority, &handbook)
            } else {
                typed_task(&mut rng, i, priority)
            };
            let msgpack = rng.random_bool(0.15);
            let encoded = if msgpack {
                rmp_serde::to_vec_named(&body).ok()
            } else {
                None
            };
            let (content_type, bytes) = match encoded {
                Some(b) => {
                    w.msgpack += 1;
                    ("application/msgpack", b)
                }
                None => ("application/json", body.to_string().into_bytes()),
            };
            w.per_priority[priority.index()] += 1;
            w.messages.push(Message {
                priority,
                msg_id,
                content_type,
                body: Bytes::from(bytes),
            });
        }
        for b in bad {
            w.per_priority[b.priority.index()] += 1;
            w.bad += 1;
            let at = rng.random_range(0..=w.messages.len());
            w.messages.insert(at, b);
        }
        if good >= 10 {
            for _ in 0..3 {
                let original = rng.random_range(0..w.messages.len() / 2);
                let copy = w.messages[original].clone();
                let at = rng.random_range(w.messages.len() / 2..=w.messages.len());
                w.messages.insert(at, copy);
                w.duplicates += 1;
            }
        }
        w
    }

    /// Unique tasks: what gets an outcome.
    pub(crate) fn tasks(&self) -> u64 {
        self.per_priority.iter().sum()
    }
}

pub(crate) fn pick<T: Copy>(rng: &mut StdRng, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total.max(1));
    for (item, weight) in items {
        if roll < *weight {
            return *item;
        }
        roll -= weight;
    }
    items[items.len() - 1].0
}

pub(crate) fn one<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

/// `count` sentences from `pool`, with `{p}` replaced by a product.
pub(crate) fn sentences(rng: &mut StdRng, pool: &[&str], count: usize) -> String {
    let product = one(rng, PRODUCTS);
    (0..count)
        .map(|_| one(rng, pool).replace("{p}", product))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn metadata(rng: &mut StdRng, i: u64) -> Value {
    json!({"source": one(rng, &["crm", "helpdesk", "web", "mobile", "import"]), "seq": i})
}

/// A `{"text", "options"}` task of one of the five configured types.
pub(crate) fn typed_task(rng: &mut StdRng, i: u64, priority: Priority) -> (String, Value) {
    let task_type = pick(rng, &TYPES);
    let language = pick(rng, &LANGUAGES);
    let (text, options) = match task_type {
        "content_analysis" => {
            let n = rng.random_range(2..=12);
            (
                sentences(rng, REVIEW_SENTENCES, n),
                json!({"language": language}),
            )
        }
        "classification" => {
            let n = rng.random_range(1..=4);
            let subject = one(rng, TICKET_SUBJECTS);
            (
                format!(
                    "Subject: {subject}\n\n{}",
                    sentences(rng, TICKET_SENTENCES, n)
                ),
                json!({"labels": "billing, bug, feature_request, account, shipping, other"}),
            )
        }
        "summarization" => {
            let n = rng.random_range(5..=30);
            (
                sentences(rng, MEETING_SENTENCES, n),
                json!({"language": language, "max_words": one(rng, &["30", "50", "80", "120"])}),
            )
        }
        "data_enrichment" => {
            let name = format!(
                "{} {}",
                one(rng, COMPANY_WORDS),
                one(rng, &["GmbH", "Inc.", "Ltd", "SA", "BV", "LLC"])
            );
            let domain: String = name
                .split_whitespace()
                .next()
                .unwrap_or("example")
                .to_ascii_lowercase();
            (
                format!(
                    "name: {name}\nwebsite: https://{domain}.example\ncity: {}\nnotes: {}",
                    one(rng, CITIES),
                    one(rng, TICKET_SENTENCES)
                ),
                json!({"fields": one(rng, &["industry, employee_range, country", "industry, founded_year", "country, vat_id_format, industry"])}),
            )
        }
        _ => (
            weekly_metrics(rng),
            json!({"style": one(rng, &["executive summary", "detailed analysis", "weekly status update"])}),
        ),
    };
    let mut task = json!({
        "task_id": format!("t{i:06}"),
        "type": task_type,
        "payload": {"text": text, "options": options},
        "priority": priority.number(),
        "tenant": pick(rng, &TENANTS),
        "metadata": metadata(rng, i),
    });
    let roll: f64 = rng.random();
    if roll < 0.03 {
        task["model"] = json!("gpt-4o-mini");
    } else if roll < 0.08 {
        task["tier"] = json!(one(rng, &["simple", "standard", "complex"]));
    }
    (format!("t{i:06}"), task)
}

/// A task whose payload is an OpenAI chat body.
pub(crate) fn chat_task(rng: &mut StdRng, i: u64, priority: Priority) -> (String, Value) {
    let n = rng.random_range(1..=3);
    let review = sentences(rng, REVIEW_SENTENCES, n);
    let ask = one(
        rng,
        &[
            "Translate into French:",
            "Rewrite politely, as a reply from the vendor:",
            "Extract the product and the main complaint as JSON:",
            "Give this review a star rating from 1 to 5 and one reason:",
        ],
    );
    let id = format!("t{i:06}");
    let task = json!({
        "task_id": id,
        "payload": {
            "messages": [
                {"role": "system", "content": "You are a concise assistant for an e-commerce team."},
                {"role": "user", "content": format!("{ask}\n\n{review}")},
            ],
            "max_tokens": 150,
            "temperature": 0.2,
        },
        "priority": priority.number(),
        "tenant": pick(rng, &TENANTS),
        "tier": "simple",
        "metadata": metadata(rng, i),
    });
    (id, task)
}

/// A line of an OpenAI Batch API input file, published as is.
pub(crate) fn batch_line(rng: &mut StdRng, i: u64) -> (String, Value) {
    let id = format!("req-{i:06}");
    let product = one(rng, PRODUCTS);
    let line = json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": format!("Write a one-sentence product description of {product}.")}],
            "max_tokens": 60,
        },
    });
    (id, line)
}

/// A chat task whose long system message (a policy handbook) is shared by
/// every such task, so the provider can serve it from its prompt cache.
pub(crate) fn handbook_task(
    rng: &mut StdRng,
    i: u64,
    priority: Priority,
    handbook: &str,
) -> (String, Value) {
    let id = format!("t{i:06}");
    let question = format!(
        "{} (order #{})",
        one(rng, HANDBOOK_QUESTIONS),
        rng.random_range(100_000..999_999)
    );
    let task = json!({
        "task_id": id,
        "payload": {
            "messages": [
                {"role": "system", "content": handbook},
                {"role": "user", "content": question},
            ],
            "max_tokens": 200,
        },
        "priority": priority.number(),
        "tenant": "acme",
        "metadata": metadata(rng, i),
    });
    (id, task)
}

/// The bad inputs: each one gets a failed outcome and a dead letter.
pub(crate) fn bad_inputs() -> Vec<Message> {
    let json_msg = |id: &str, p: Priority, body: String| Message {
        priority: p,
        msg_id: id.to_owned(),
        content_type: "application/json",
        body: Bytes::from(body.into_bytes()),
    };
    let text = |t: &str| json!({"text": t, "options": {"language": "en"}});
    vec![
        json_msg(
            "bad-json",
            Priority::P3,
            r#"{"task_id": "bad-json", "type": "summarization", "payload": {"text": "cut off"#.into(),
        ),
        Message {
            priority: Priority::P2,
            msg_id: "bad-msgpack".into(),
            content_type: "application/msgpack",
            body: Bytes::from_static(&[0xc1, 0x00, 0xff]),
        },
        json_msg(
            "bad-type",
            Priority::P2,
            json!({"task_id": "bad-type", "type": "poetry", "payload": text("roses"), "priority": 2})
                .to_string(),
        ),
        json_msg(
            "bad-priority",
            Priority::P3,
            json!({"task_id": "bad-priority", "type": "classification", "payload": text("jump the queue"), "priority": 1})
                .to_string(),
        ),
        json_msg(
            "bad-model",
            Priority::P3,
            json!({"task_id": "bad-model", "type": "content_analysis", "payload": text("hello"), "model": "gpt-9-ultra"})
                .to_string(),
        ),
        json_msg(
            "bad-payload",
            Priority::P3,
            json!({"task_id": "bad-payload", "type": "summarization"}).to_string(),
        ),
        json_msg(
            "bad-task-id",
            Priority::P2,
            json!({"task_id": "not a valid id!", "type": "classification", "payload": text("x")})
                .to_string(),
        ),
    ]
}

pub(crate) fn weekly_metrics(rng: &mut StdRng) -> String {
    let week = rng.random_range(1..=52);
    let mut text = format!("Week {week} metrics, {}:\n", one(rng, COMPANY_WORDS));
    for metric in [
        "signups",
        "active accounts",
        "churned accounts",
        "support tickets",
        "median first response (min)",
        "NPS",
    ] {
        let value = rng.random_range(12..9_000);
        let change = rng.random_range(-25..=40);
        text.push_str(&format!(
            "- {metric}: {value} ({change:+}% week over week)\n"
        ));
    }
    let n = rng.random_range(2..=8);
    text.push_str("\nObservations: ");
    text.push_str(&sentences(rng, MEETING_SENTENCES, n));
    text
}

/// A support policy of about 6,000 characters, the same every time.
pub(crate) fn handbook() -> String {
    let mut text = String::from(
        "You are the support assistant of ACME Corp. Answer the customer's question using only the policy below. \
         Quote the section number you rely on. If the policy does not cover the question, say so and offer a human agent.\n\n\
         ACME CORP CUSTOMER SUPPORT POLICY (revision 14)\n\n",
    );
    let areas = [
        "hardware orders",
        "software subscriptions",
        "professional services",
        "gift cards",
        "marketplace items",
        "enterprise contracts",
    ];
    let mut section = 1;
    for (k, area) in areas.iter().enumerate() {
        let days = 14 + 7 * k;
        let hours = 24 + 12 * k;
        for clause in [
            format!("Refunds for {area}: a customer may ask for a full refund within {days} days of delivery, provided the item or service is returned or cancelled in the condition it was received. After {days} days, a refund needs the approval of a team lead and is limited to store credit."),
            format!("Response times for {area}: premium customers get a first answer within {} hours and standard customers within {hours} hours, counted in business hours of the customer's region.", hours / 4),
            format!("Escalation for {area}: when a case is reopened twice, or when the customer mentions legal action, hand the case to the escalation desk and tell the customer who will contact them and by when."),
            format!("Data requests for {area}: export and deletion requests are confirmed within {} days; never send account data to an e-mail address that is not on file.", 3 + k),
        ] {
            text.push_str(&format!("Section {section}. {clause}\n"));
            section += 1;
        }
    }
    text
}

pub(crate) const PRODUCTS: &[&str] = &[
    "the X200 headphones",
    "the Pro plan",
    "the mobile app",
    "the standing desk",
    "the espresso machine",
    "the billing dashboard",
    "the smart thermostat",
    "the trail running shoes",
];

pub(crate) const REVIEW_SENTENCES: &[&str] = &[
    "I have been using {p} for three weeks now.",
    "Setup of {p} took less than ten minutes.",
    "Battery life is noticeably worse than advertised.",
    "Customer support answered within an hour and fixed the problem.",
    "The price went up twice this year, which is frustrating.",
    "Honestly the best purchase I made this year.",
    "It stopped syncing after the last update.",
    "Shipping was fast but the box arrived dented.",
    "The documentation is thin; I had to search forums for answers.",
    "I would recommend {p} to anyone working from home.",
    "Compared to the previous version, {p} feels slower.",
    "The new design is cleaner and easier to read.",
    "Two of my colleagues bought {p} after trying mine.",
    "The refund process was painless.",
    "Build quality is excellent for the price.",
    "I had to contact support three times about the same issue.",
];

pub(crate) const TICKET_SUBJECTS: &[&str] = &[
    "Charged twice this month",
    "Cannot log in after password reset",
    "Feature request: export to CSV",
    "Package marked delivered but not received",
    "How do I change the account owner?",
    "App crashes when uploading photos",
    "Invoice shows the wrong VAT number",
    "Please add dark mode",
];

pub(crate) const TICKET_SENTENCES: &[&str] = &[
    "This happened again this morning.",
    "I attached a screenshot of the error message.",
    "Our team of twelve depends on this every day.",
    "The tracking number has not changed in five days.",
    "I already tried clearing the cache and reinstalling.",
    "Can you tell me when this will be fixed?",
    "We would pay extra for this feature.",
    "The card ending in 4242 was charged twice.",
    "My manager left the company and I need admin rights.",
    "It works on the web but not on Android.",
];

pub(crate) const MEETING_SENTENCES: &[&str] = &[
    "The team agreed to move the launch by one week to finish load testing.",
    "Revenue in the northern region grew eight percent quarter over quarter.",
    "Two enterprise customers asked for single sign-on before renewal.",
    "Support volume dropped after the new onboarding flow shipped.",
    "Marketing will run a smaller campaign focused on existing customers.",
    "The data team found that most churn happens in the first thirty days.",
    "Hiring for the platform team is behind plan; two roles are still open.",
    "Infrastructure costs rose because of the new analytics pipeline.",
    "Legal reviewed the new terms of service and requested minor changes.",
    "The mobile release is blocked on an app store review.",
    "Customer interviews point to pricing as the main objection.",
    "The pilot with the logistics partner will be extended to March.",
    "Security completed the annual penetration test with no critical findings.",
    "Action item: finance to share the updated forecast by Friday.",
];

pub(crate) const COMPANY_WORDS: &[&str] = &[
    "Northwind",
    "Bluefin",
    "Copperleaf",
    "Halvorsen",
    "Kestrel",
    "Lumen",
    "Oakridge",
    "Solvay",
    "Tidewater",
    "Vantage",
];

pub(crate) const CITIES: &[&str] = &[
    "Berlin", "Lyon", "Austin", "Osaka", "Porto", "Utrecht", "Leeds", "Denver",
];

pub(crate) const HANDBOOK_QUESTIONS: &[&str] = &[
    "Can I still return my headphones? They arrived 20 days ago.",
    "I want all my data deleted. How long does it take?",
    "Nobody has answered my ticket for two days and I am a premium customer.",
    "Can I get a refund on a gift card?",
    "This is the third time I reopen this case. What now?",
    "Our enterprise contract renewal was charged but we cancelled. Refund?",
    "Can you send my account export to my new private e-mail address?",
    "How fast do you answer standard customers about marketplace items?",
];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_workload_is_reproducible_and_shaped_as_announced() {
        let a = Workload::generate(5000, 42);
        let b = Workload::generate(5000, 42);
        assert_eq!(a.tasks(), 5000);
        assert_eq!(a.messages.len(), 5003, "5000 tasks and 3 duplicates");
        assert_eq!(a.bad, 7);
        assert_eq!(a.per_priority, b.per_priority);
        assert!(a
            .messages
            .iter()
            .zip(&b.messages)
            .all(|(x, y)| x.msg_id == y.msg_id && x.body == y.body));
        let [p1, p2, p3] = a.per_priority;
        assert!((400..600).contains(&p1), "{p1}");
        assert!((1350..1650).contains(&p2), "{p2}");
        assert!((2800..3200).contains(&p3), "{p3}");
        assert!(a.msgpack > 500 && a.chat > 50 && a.batch_lines > 20 && a.long_context > 100);
        let ids: HashSet<&str> = a.messages.iter().map(|m| m.msg_id.as_str()).collect();
        assert_eq!(ids.len(), 5000, "duplicates reuse an id, nothing else does");
    }

    #[test]
    fn small_workloads_skip_bad_inputs_and_duplicates() {
        let w = Workload::generate(5, 1);
        assert_eq!(w.tasks(), 5);
        assert_eq!(w.messages.len(), 5);
        assert_eq!((w.bad, w.duplicates), (0, 0));
    }

    #[test]
    fn the_handbook_is_long_enough_to_be_cached() {
        // The simulator caches prompts of 1024 tokens (4096 characters) and more.
        assert!(handbook().len() > 5000, "{}", handbook().len());
    }
}
