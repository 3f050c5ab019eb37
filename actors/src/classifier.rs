//! The tier classifier: for an `auto` task that no `[[tiers.rules]]` rule
//! decided, a cheap model is asked to label the prompt `simple`, `standard`
//! or `complex`, and the task goes to that tier's model
//! (`tier_reason = "classifier"`).
//!
//! - **The call** asks for a structured answer (`response_format` of type
//!   `json_schema`: an object whose `tier` is one of the three labels) and is
//!   read leniently ([`parse_verdict`]): that object, or a bare label word,
//!   as providers without structured output answer. It goes through the
//!   route of the classifier's model like any call: its gate (rate budget,
//!   concurrency, circuit) admits it, the provider port sends it, and the
//!   ledger records it (started, then finished) as a billed call of the task.
//!   It reports nothing to the route's circuit: a classifier that fails only
//!   sends tasks to prompt size.
//! - **Its cost** is counted on the task: added to the outcome's `cost_usd`
//!   and reported as `classifier_cost_usd`.
//! - **The cache** keeps verdicts by a hash of the model and the prompt text
//!   the classifier sees ([`VerdictCache`], bounded, oldest out first); a
//!   cached verdict costs nothing. Identical prompts classified at the same
//!   time share one call: the first task pays for it, the others wait for
//!   its verdict.
//! - **No verdict** (the call failed, timed out, or answered no label): the
//!   task keeps its prompt-size tier; the task itself never fails for it.
//!
//! Runs in the Intake, in a task of its own per delivery that needs it, so
//! the actor never waits on the call.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::context::EngineContext;
use crate::dispatcher::{bound_tokens, finish_call, record_start};
use crate::metrics;
use crate::ports::ProviderError;
use crate::pricing::Picousd;
use crate::routing::{Route, TierModels};
use crate::task::{ServiceTier, Task, Tier};

/// The instructions the classifier gets by default.
pub const DEFAULT_INSTRUCTIONS: &str = "You route requests to language models of three sizes. \
Read the request below (do not answer it) and label how capable a model it needs:\n\
- simple: short extraction, classification, formatting or lookup; one obvious step.\n\
- standard: ordinary writing, summarising or analysis of moderate length.\n\
- complex: multi-step reasoning, expert or legal/financial/medical judgement, long or subtle material.\n\
Answer with exactly one word: simple, standard or complex.";

/// `[tiers.classifier]`: the optional tier classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierConfig {
    /// Whether `auto` tasks no rule decided are classified (else: prompt size).
    pub enabled: bool,
    /// The model asked; empty: the simple tier's model.
    pub model: String,
    /// Its system message.
    pub instructions: String,
    /// The prompt (every message but the system one) is cut to this many
    /// characters before it is sent.
    pub max_prompt_chars: usize,
    /// `max_completion_tokens` of the call.
    pub max_completion_tokens: u32,
    /// Verdicts kept (0: none).
    pub cache_entries: usize,
    /// How long the classification may take, admission at the route included.
    pub timeout_secs: u64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            enabled: false,
            model: String::new(),
            instructions: DEFAULT_INSTRUCTIONS.to_owned(),
            max_prompt_chars: 4_000,
            max_completion_tokens: 20,
            cache_entries: 10_000,
            timeout_secs: 10,
        }
    }
}

impl ClassifierConfig {
    /// The model asked: `model`, else the simple tier's.
    pub fn model<'a>(&'a self, tiers: &'a TierModels) -> &'a str {
        if self.model.is_empty() {
            &tiers.simple
        } else {
            &self.model
        }
    }

    /// How long a classification may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The chat request that asks `model` to label `prompt`.
    pub fn request(&self, model: &str, prompt: &str) -> Value {
        json!({
            "model": model,
            "messages": [
                {"role": "system", "content": self.instructions},
                {"role": "user", "content": prompt},
            ],
            "max_completion_tokens": self.max_completion_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "tier",
                    "strict": true,
                    "schema": {
                        "type": "object",
                        "properties": {
                            "tier": {"type": "string", "enum": ["simple", "standard", "complex"]}
                        },
                        "required": ["tier"],
                        "additionalProperties": false
                    }
                }
            }
        })
    }
}

/// `text` cut to at most `max_chars` bytes, at a character boundary.
pub fn cut(text: &str, max_chars: usize) -> &str {
    if text.len() <= max_chars {
        return text;
    }
    let mut end = max_chars;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The label in a classifier's answer: a JSON object's `tier` (`label` or
/// `answer` also read), or the answer's first word, in any case and with
/// punctuation around it. `None` when it names no tier.
pub fn parse_verdict(output: &str) -> Option<Tier> {
    let output = output.trim();
    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(output) {
        return ["tier", "label", "answer"]
            .iter()
            .find_map(|k| fields.get(*k).and_then(Value::as_str))
            .and_then(label);
    }
    let word = output
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':')
        .find(|w| !w.trim_matches(|c: char| !c.is_alphanumeric()).is_empty())?;
    label(word)
}

fn label(word: &str) -> Option<Tier> {
    let word = word
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_ascii_lowercase();
    match word.as_str() {
        "simple" => Some(Tier::Simple),
        "standard" => Some(Tier::Standard),
        "complex" => Some(Tier::Complex),
        _ => None,
    }
}

/// The cache key of a verdict: a hash of the model and the prompt text the
/// classifier sees.
pub fn cache_key(model: &str, prompt: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut h);
    prompt.hash(&mut h);
    h.finish()
}

/// Verdicts by [`cache_key`], at most `capacity`; the oldest goes first.
#[derive(Debug, Default)]
pub struct VerdictCache {
    capacity: usize,
    verdicts: HashMap<u64, Tier>,
    order: VecDeque<u64>,
}

impl VerdictCache {
    /// An empty cache of `capacity` verdicts (0: keeps none).
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity,
            ..VerdictCache::default()
        }
    }

    /// The verdict kept for `key`.
    pub fn get(&self, key: u64) -> Option<Tier> {
        self.verdicts.get(&key).copied()
    }

    /// Keeps `tier` for `key`, dropping the oldest verdict when full.
    pub fn put(&mut self, key: u64, tier: Tier) {
        if self.capacity == 0 {
            return;
        }
        if self.verdicts.insert(key, tier).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.verdicts.remove(&old);
            }
        }
    }

    /// Verdicts kept.
    pub fn len(&self) -> usize {
        self.verdicts.len()
    }

    /// True when it keeps none.
    pub fn is_empty(&self) -> bool {
        self.verdicts.is_empty()
    }
}

/// What classifying one task gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The tier, when the classifier named one.
    pub tier: Option<Tier>,
    /// What this task paid for it: the exact cost of the call it made, 0
    /// for a cached or shared verdict.
    pub cost: Picousd,
}

/// A classification in flight: the verdict, once known (`Some(None)`:
/// no verdict).
type Pending = watch::Receiver<Option<Option<Tier>>>;

/// The classifier's shared state: the verdict cache and the calls in
/// flight. One per engine.
#[derive(Debug)]
pub struct Classifier {
    cache: Mutex<VerdictCache>,
    in_flight: Mutex<HashMap<u64, Pending>>,
}

impl Classifier {
    /// With a cache of `capacity` verdicts.
    pub fn new(capacity: usize) -> Self {
        Classifier {
            cache: Mutex::new(VerdictCache::new(capacity)),
            in_flight: Mutex::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, VerdictCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Settles a call in flight however its leader ends (a dropped leader
/// leaves its followers with no verdict).
struct Lead<'a> {
    classifier: &'a Classifier,
    key: u64,
    tx: watch::Sender<Option<Option<Tier>>>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.classifier.in_flight().remove(&self.key);
        self.tx.send_if_modified(|v| {
            let unset = v.is_none();
            if unset {
                *v = Some(None);
            }
            unset
        });
    }
}

/// Classifies `task`'s prompt text `prompt` (already cut): from the cache,
/// from an identical prompt's call in flight, or by a call of its own.
pub async fn classify(ctx: &EngineContext, task: &Task, prompt: &str) -> Verdict {
    let config = &ctx.settings.catalog.tiers.classifier;
    let model = config.model(&ctx.settings.catalog.tiers);
    let key = cache_key(model, prompt);
    let classifier = &ctx.classifier;
    let no_cost = |tier: Option<Tier>| Verdict { tier, cost: 0 };
    let pending = {
        // The cache is read under the lock of the calls in flight: a leader
        // keeps its verdict before it leaves them, so no prompt is called
        // for twice.
        let mut in_flight = classifier.in_flight();
        if let Some(tier) = classifier.cache().get(key) {
            metrics::tier_classified("cached");
            return no_cost(Some(tier));
        }
        match in_flight.get(&key) {
            Some(rx) => Err(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                in_flight.insert(key, rx);
                Ok(Lead {
                    classifier,
                    key,
                    tx,
                })
            }
        }
    };
    let lead = match pending {
        Ok(lead) => lead,
        Err(mut rx) => {
            let tier =
                match tokio::time::timeout(config.timeout(), rx.wait_for(Option::is_some)).await {
                    Ok(Ok(v)) => v.flatten(),
                    _ => None,
                };
            metrics::tier_classified(if tier.is_some() { "shared" } else { "failed" });
            return no_cost(tier);
        }
    };
    let (tier, cost) = call(ctx, task, model, &config.request(model, prompt)).await;
    if let Some(t) = tier {
        classifier.cache().put(key, t);
    }
    lead.tx.send_replace(Some(tier));
    drop(lead);
    metrics::tier_classified(if tier.is_some() { "ok" } else { "failed" });
    Verdict { tier, cost }
}

/// One classifier call through the route of `model`, recorded in the ledger
/// as a call of `task`: the label (when the answer gives one) and the
/// exact cost of the call (0 when it was not answered).
async fn call(
    ctx: &EngineContext,
    task: &Task,
    model: &str,
    request: &Value,
) -> (Option<Tier>, Picousd) {
    let config = &ctx.settings.catalog.tiers.classifier;
    let deadline = Instant::now() + config.timeout();
    let task_id = task.task_id.as_str();
    let Some(provider) = ctx.settings.catalog.model_providers.get(model) else {
        tracing::debug!(
            task_id,
            model,
            "classifier model is served by no provider; prompt size decides"
        );
        return (None, 0);
    };
    let route = Route {
        provider: provider.clone(),
        model: model.to_owned(),
    };
    let Some(entry) = ctx.routes.get_or_create(ctx, &route) else {
        tracing::debug!(
            task_id,
            model,
            "classifier provider is not wired; prompt size decides"
        );
        return (None, 0);
    };
    let (prompt_tokens, _) = bound_tokens(request);
    let Ok(permit) = tokio::time::timeout_at(
        deadline,
        entry
            .gate
            .admit_in_turn(task.priority, prompt_tokens, false),
    )
    .await
    else {
        tracing::debug!(
            task_id,
            model,
            "classifier route did not admit the call in time; prompt size decides"
        );
        return (None, 0);
    };
    let started = std::time::Instant::now();
    let call_id = crate::ledger::classifier_call_id(task_id, task.generation);
    let record = record_start(ctx, task, call_id, model, request, ServiceTier::Default).await;
    let result = tokio::time::timeout_at(deadline, entry.provider.complete(request))
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::Timeout {
                message: format!("no classifier answer within {:?}", config.timeout()),
            })
        });
    drop(permit);
    let cost = finish_call(ctx, record, &result, 1.0, None).await;
    let (label, outcome) = match &result {
        Ok(c) => {
            metrics::spent(
                model,
                &task.tenant,
                task.priority,
                crate::pricing::usd(cost),
                &c.usage,
            );
            let tier = c.output.as_deref().and_then(parse_verdict);
            if tier.is_none() {
                tracing::debug!(task_id, model, output = ?c.output, "classifier answer names no tier; prompt size decides");
            }
            (tier, "ok")
        }
        Err(e) => {
            tracing::debug!(task_id, model, error = %e, "classifier call failed; prompt size decides");
            let verdict = crate::retry_scheduler::classify(e, 1, &ctx.settings.retry);
            (None, crate::dispatcher::verdict_label(verdict))
        }
    };
    metrics::provider_request(&route.provider, model, outcome, started.elapsed());
    (label, cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_from_the_schema_object_or_a_bare_word() {
        assert_eq!(parse_verdict(r#"{"tier":"complex"}"#), Some(Tier::Complex));
        assert_eq!(
            parse_verdict(r#" {"label": "Simple"} "#),
            Some(Tier::Simple)
        );
        assert_eq!(parse_verdict("standard"), Some(Tier::Standard));
        assert_eq!(parse_verdict("Complex."), Some(Tier::Complex));
        assert_eq!(
            parse_verdict("**simple**\nbecause it is short"),
            Some(Tier::Simple)
        );
        assert_eq!(
            parse_verdict("Tier: standard"),
            None,
            "the first word decides"
        );
        assert_eq!(parse_verdict(r#"{"tier":"huge"}"#), None);
        assert_eq!(parse_verdict(r#"{"other":"simple"}"#), None);
        assert_eq!(parse_verdict(""), None);
        assert_eq!(parse_verdict("auto"), None, "auto is no verdict");
    }

    #[test]
    fn the_cache_is_bounded_and_drops_the_oldest_verdict() {
        let mut cache = VerdictCache::new(2);
        cache.put(1, Tier::Simple);
        cache.put(2, Tier::Standard);
        cache.put(1, Tier::Simple);
        assert_eq!(cache.len(), 2);
        cache.put(3, Tier::Complex);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(1), None, "the oldest went");
        assert_eq!(cache.get(2), Some(Tier::Standard));
        assert_eq!(cache.get(3), Some(Tier::Complex));
        let mut off = VerdictCache::new(0);
        off.put(1, Tier::Simple);
        assert!(off.is_empty());
    }

    #[test]
    fn the_cache_key_is_the_model_and_the_prompt() {
        assert_eq!(cache_key("m", "p"), cache_key("m", "p"));
        assert_ne!(cache_key("m", "p"), cache_key("n", "p"));
        assert_ne!(cache_key("m", "p"), cache_key("m", "q"));
    }

    #[test]
    fn prompts_are_cut_at_a_character_boundary() {
        assert_eq!(cut("hello", 10), "hello");
        assert_eq!(cut("hello", 3), "hel");
        assert_eq!(cut("héllo", 2), "h", "é is two bytes");
        assert_eq!(cut("", 0), "");
    }

    #[test]
    fn the_request_asks_for_one_of_the_three_labels() {
        let config = ClassifierConfig::default();
        let r = config.request("small", "Sort these words");
        assert_eq!(r["model"], "small");
        assert_eq!(r["messages"][0]["content"], DEFAULT_INSTRUCTIONS);
        assert_eq!(r["messages"][1]["content"], "Sort these words");
        assert_eq!(r["max_completion_tokens"], 20);
        assert_eq!(
            r["response_format"]["json_schema"]["schema"]["properties"]["tier"]["enum"],
            json!(["simple", "standard", "complex"])
        );
    }
}
