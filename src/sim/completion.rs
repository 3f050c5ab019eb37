//! The simulated model: a deterministic answer per (model, messages), its
//! usage, and the `chat.completion` object in OpenAI's shape.
//!
//! A request whose `response_format` is a `json_schema` gets an object valid
//! for a simple schema ([`schema_answer`]): each string property with an
//! `enum` takes one of its values, picked by the hash of the model and
//! prompt, so the same prompt always gets the same label.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::hash::{mix, Fnv64};
use super::request::{count_tokens, ChatRequest};

/// Words of the last user message quoted in the answer.
const TOPIC_WORDS: usize = 12;

/// Longest quote, so one giant "word" (base64, a log line) stays short.
const TOPIC_CHARS: usize = 80;

/// Generic sentences the answers are built from; the hash picks which.
const SENTENCES: [&str; 16] = [
    "The main point is clear and well supported by the details given.",
    "Three factors stand out: scope, timing and cost.",
    "The overall tone is neutral, with a slight positive lean.",
    "A short summary would put the practical consequences first.",
    "More context could change the assessment, but the core conclusion holds.",
    "The evidence points in one direction, although a few details remain open.",
    "In brief, the request is reasonable and can be handled as described.",
    "The most important risk is an incomplete picture of the constraints.",
    "A careful reader would check the assumptions behind the numbers.",
    "The recommended next step is to confirm the key facts with the source.",
    "Overall, the answer is yes, with the caveats noted above.",
    "The text is consistent with itself and free of obvious contradictions.",
    "Compared with similar cases, this one is fairly typical.",
    "The language is clear, so the intent is easy to follow.",
    "Two categories fit best: analysis and reporting.",
    "No sensitive content was found in the material provided.",
];

/// The answers to one request, before they are wrapped in a response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Generated {
    pub choices: Vec<GeneratedChoice>,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GeneratedChoice {
    pub content: String,
    pub finish_reason: &'static str,
}

/// Answers `request`; the same model and messages always give the same text.
pub(crate) fn generate(request: &ChatRequest) -> Generated {
    let request_hash = Fnv64::new()
        .write(request.model.as_bytes())
        .write(&[0])
        .write(request.prompt.text.as_bytes())
        .finish();
    let topic = topic(request.prompt.last_user_text());

    let mut completion_tokens = 0;
    let choices = (0..request.choices)
        .map(|index| {
            // Choice 0 keeps the request's own hash so `n` does not change the first answer.
            let hash = if index == 0 {
                request_hash
            } else {
                mix(request_hash ^ u64::from(index))
            };
            let mut content = answer_text(hash, &topic);
            if let Some(schema) = &request.json_schema {
                content = schema_answer(schema, hash, &content).to_string();
            } else if request.json_output {
                content = json!({ "answer": content }).to_string();
            }
            let (content, finish_reason) = truncate(content, request.max_output_tokens);
            completion_tokens += count_tokens(&content);
            GeneratedChoice {
                content,
                finish_reason,
            }
        })
        .collect();
    Generated {
        choices,
        completion_tokens,
    }
}

/// An object valid for `schema` (an object schema; anything else gets
/// `{"answer": text}`): a string property with an `enum` takes the value
/// the hash picks, a plain string the answer text, a number or integer a
/// small count, a boolean a bit of the hash; other properties are null.
pub(crate) fn schema_answer(schema: &Value, hash: u64, text: &str) -> Value {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return json!({ "answer": text });
    };
    let mut out = Map::new();
    for (i, (name, property)) in properties.iter().enumerate() {
        let h = mix(hash ^ (i as u64));
        let kind = property.get("type").and_then(Value::as_str);
        let value = match (property.get("enum").and_then(Value::as_array), kind) {
            (Some(values), _) if !values.is_empty() => {
                let at = usize::try_from(h % values.len() as u64).unwrap_or(0);
                values[at].clone()
            }
            (_, Some("string")) => Value::String(text.to_owned()),
            (_, Some("integer" | "number")) => json!(h % 10),
            (_, Some("boolean")) => Value::Bool(h & 1 == 1),
            _ => Value::Null,
        };
        out.insert(name.clone(), value);
    }
    Value::Object(out)
}

/// The first words of the user's message, as a quoted subject.
fn topic(text: &str) -> String {
    let mut words = text.split_whitespace();
    let mut topic = words
        .by_ref()
        .take(TOPIC_WORDS)
        .collect::<Vec<_>>()
        .join(" ");
    if topic.is_empty() {
        return "your request".to_owned();
    }
    let mut cut_short = words.next().is_some();
    if let Some((at, _)) = topic.char_indices().nth(TOPIC_CHARS) {
        topic.truncate(at);
        cut_short = true;
    }
    if cut_short {
        topic.push_str("...");
    }
    format!("\"{topic}\"")
}

fn answer_text(hash: u64, topic: &str) -> String {
    let count = 2 + (hash >> 8) % 4;
    // An odd step walks all 16 sentences without repeating one.
    let start = hash % 16;
    let step = 1 + 2 * ((hash >> 4) % 8);
    let mut text = format!("Simulated answer {:08x}: regarding {topic}.", hash >> 32);
    for k in 0..count {
        let index = (start + k * step) % 16;
        text.push(' ');
        text.push_str(SENTENCES[index as usize]);
    }
    text
}

/// Cuts the answer at the output-token limit, like a model that ran out of room.
fn truncate(content: String, limit: Option<u64>) -> (String, &'static str) {
    let Some(limit) = limit else {
        return (content, "stop");
    };
    if count_tokens(&content) <= limit {
        return (content, "stop");
    }
    let keep_chars = usize::try_from(limit.saturating_mul(4)).unwrap_or(usize::MAX);
    let cut = content
        .char_indices()
        .nth(keep_chars)
        .map_or(content.len(), |(at, _)| at);
    let mut content = content;
    content.truncate(cut);
    (content, "length")
}

/// OpenAI's CreateChatCompletionResponse.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    pub service_tier: &'static str,
    pub system_fingerprint: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
    pub refusal: Option<String>,
    /// Always empty: the simulator cites no sources.
    pub annotations: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct PromptTokensDetails {
    pub cached_tokens: u64,
    pub audio_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
    pub audio_tokens: u64,
    pub accepted_prediction_tokens: u64,
    pub rejected_prediction_tokens: u64,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u64, cached_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: 0,
                audio_tokens: 0,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            },
        }
    }
}

impl Generated {
    pub(crate) fn into_choices(self) -> Vec<Choice> {
        self.choices
            .into_iter()
            .zip(0..)
            .map(|(choice, index)| Choice {
                index,
                message: AssistantMessage {
                    role: "assistant",
                    content: choice.content,
                    refusal: None,
                    annotations: Vec::new(),
                },
                logprobs: None,
                finish_reason: choice.finish_reason,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::request::parse;
    use serde_json::json;

    fn request(model: &str, user: &str) -> ChatRequest {
        parse(&json!({"model": model, "messages": [{"role": "user", "content": user}]})).unwrap()
    }

    #[test]
    fn same_request_same_answer_and_different_request_different_answer() {
        let first = generate(&request("gpt-4.1-mini", "Summarise the report"));
        let again = generate(&request("gpt-4.1-mini", "Summarise the report"));
        let other_text = generate(&request("gpt-4.1-mini", "Summarise the memo"));
        let other_model = generate(&request("gpt-4.1", "Summarise the report"));
        assert_eq!(first, again);
        assert_ne!(first.choices[0].content, other_text.choices[0].content);
        assert_ne!(first.choices[0].content, other_model.choices[0].content);
    }

    #[test]
    fn answer_quotes_the_first_words_of_the_last_user_message() {
        let answer = generate(&request(
            "m",
            "Classify the sentiment of this review please",
        ));
        let content = &answer.choices[0].content;
        assert!(content.starts_with("Simulated answer "), "{content}");
        assert!(
            content.contains("\"Classify the sentiment of this review please\""),
            "{content}"
        );
        assert_eq!(answer.choices[0].finish_reason, "stop");
        assert_eq!(answer.completion_tokens, count_tokens(content));
    }

    #[test]
    fn quote_of_a_huge_single_word_stays_short() {
        let answer = generate(&request("m", &"x".repeat(10_000)));
        assert!(
            answer.choices[0].content.len() < 1000,
            "{}",
            answer.choices[0].content
        );
    }

    #[test]
    fn output_limit_truncates_and_reports_length() {
        let mut limited = request("m", "Write a long essay");
        limited.max_output_tokens = Some(5);
        let answer = generate(&limited);
        assert_eq!(answer.choices[0].finish_reason, "length");
        assert_eq!(answer.completion_tokens, 5);
        assert_eq!(answer.choices[0].content.chars().count(), 20);
    }

    #[test]
    fn json_response_format_gives_a_json_object() {
        let mut json_request = request("m", "Extract the fields");
        json_request.json_output = true;
        let content = &generate(&json_request).choices[0].content;
        let parsed: serde_json::Value = serde_json::from_str(content).unwrap();
        assert!(parsed["answer"]
            .as_str()
            .unwrap()
            .starts_with("Simulated answer"));
    }

    fn schema_request(user: &str) -> ChatRequest {
        parse(&json!({
            "model": "m",
            "messages": [{"role": "user", "content": user}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "label",
                "strict": true,
                "schema": {
                    "type": "object",
                    "properties": {
                        "tier": {"type": "string", "enum": ["simple", "standard", "complex"]},
                        "note": {"type": "string"},
                        "n": {"type": "integer"}
                    },
                    "required": ["tier", "note", "n"],
                    "additionalProperties": false
                }
            }}
        }))
        .unwrap()
    }

    #[test]
    fn json_schema_answers_an_object_with_enum_values_fixed_by_the_prompt() {
        let mut labels = std::collections::BTreeSet::new();
        for i in 0..40 {
            let prompt = format!("Label document {i}");
            let answer = generate(&schema_request(&prompt));
            let again = generate(&schema_request(&prompt));
            assert_eq!(answer, again, "the same prompt, the same label");
            let parsed: Value = serde_json::from_str(&answer.choices[0].content).unwrap();
            let tier = parsed["tier"].as_str().unwrap().to_owned();
            assert!(["simple", "standard", "complex"].contains(&tier.as_str()));
            assert!(parsed["note"]
                .as_str()
                .unwrap()
                .starts_with("Simulated answer"));
            assert!(parsed["n"].as_u64().unwrap() < 10);
            labels.insert(tier);
        }
        assert_eq!(labels.len(), 3, "every label is given to some prompt");
    }

    #[test]
    fn several_choices_differ_but_the_first_is_unchanged() {
        let single = generate(&request("m", "Name a colour"));
        let mut three = request("m", "Name a colour");
        three.choices = 3;
        let three = generate(&three);
        assert_eq!(three.choices.len(), 3);
        assert_eq!(three.choices[0], single.choices[0]);
        assert_ne!(three.choices[1].content, three.choices[2].content);
        let sum: u64 = three.choices.iter().map(|c| count_tokens(&c.content)).sum();
        assert_eq!(three.completion_tokens, sum);
    }

    #[test]
    fn usage_totals_add_up() {
        let usage = Usage::new(1200, 1024, 40);
        assert_eq!(usage.total_tokens, 1240);
        assert_eq!(usage.prompt_tokens_details.cached_tokens, 1024);
    }
}
