//! Routing: which provider and model serve a task, and the exact chat request
//! sent for it. Task types render `{"text","options"}` payloads through their
//! prompt template; chat payloads pass through. Pure functions over a
//! [`Catalog`] built from the config.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::classifier::{cut, ClassifierConfig};
use crate::codec::quote;
use crate::pricing::Picousd;
use crate::route_policy::{RouteAsk, RoutePolicy, RoutePreference, TierOptions};
use crate::task::{Payload, RouteKind, ServiceTier, Task, Tier};

/// A task type from the config: how to turn `{"text","options"}` into a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskType {
    /// The system message.
    pub system_prompt: String,
    /// The user message; `{text}`, `{options}` (JSON) and `{options.KEY}` are filled in.
    pub template: String,
    /// Tier used when the task names none.
    #[serde(default = "default_tier")]
    pub default_tier: Tier,
    /// `max_completion_tokens` sent with the request.
    pub max_tokens: u32,
    /// How tasks of this type are sent (`realtime`, `batch_api`, `auto`);
    /// a task's own `route` outranks it.
    #[serde(default)]
    pub route: Option<RoutePreference>,
}

fn default_tier() -> Tier {
    Tier::Auto
}

/// The models behind each tier, and how `auto` picks one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierModels {
    /// The cheapest model.
    pub simple: String,
    /// The everyday model.
    pub standard: String,
    /// The strongest model.
    pub complex: String,
    /// `auto` picks `simple` for prompts up to this many characters.
    #[serde(default = "default_auto_simple")]
    pub auto_simple_max_chars: usize,
    /// ...`standard` up to this many, `complex` above.
    #[serde(default = "default_auto_standard")]
    pub auto_standard_max_chars: usize,
    /// Rules `auto` tries first, in order; the first that matches decides.
    #[serde(default)]
    pub rules: Vec<TierRule>,
    /// `[tiers.classifier]`: asked, when enabled, in place of prompt size.
    #[serde(default)]
    pub classifier: ClassifierConfig,
}

fn default_auto_simple() -> usize {
    4_000
}

fn default_auto_standard() -> usize {
    32_000
}

/// `[[tiers.rules]]`: a tier for the `auto` tasks that match every
/// condition given (a rule with none matches every task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierRule {
    /// Named in `tier_reason` (`rule:<name>`); the rule's index when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// The task's type.
    #[serde(default)]
    pub task_type: Option<String>,
    /// A regular expression found in the prompt (every message but the
    /// system one).
    #[serde(default)]
    pub pattern: Option<Pattern>,
    /// The prompt has at least this many characters.
    #[serde(default)]
    pub min_chars: Option<usize>,
    /// The prompt has at most this many characters.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// The tier chosen (not `auto`).
    pub tier: Tier,
}

/// A compiled regular expression, read and written as its source text.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// Compiles `source`; the error names what is wrong with it.
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        regex::Regex::new(source).map(Pattern)
    }

    /// The source text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        let source = String::deserialize(d)?;
        Pattern::new(&source)
            .map_err(|e| serde::de::Error::custom(format!("invalid pattern {source:?}: {e}")))
    }
}

/// What `auto` looks at.
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    /// The task's type, when it has one.
    pub task_type: Option<&'a str>,
    /// Every message's content but the system one, one per line.
    pub text: &'a str,
    /// Characters in every message, the system one included.
    pub chars: usize,
}

/// `tier_reason` of a tier chosen by prompt size.
pub const REASON_PROMPT_SIZE: &str = "prompt_size";
/// `tier_reason` of a tier chosen by the classifier.
pub const REASON_CLASSIFIER: &str = "classifier";

/// The tier a task got and why: `task` (the task named it), `task_type`
/// (its type's `default_tier`), `rule:<name or index>`, `classifier`,
/// `prompt_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierChoice {
    /// A concrete tier.
    pub tier: Tier,
    /// Why.
    pub reason: String,
    /// What the task paid the classifier (0: no call of its own).
    pub classifier_picousd: Picousd,
}

impl TierModels {
    /// The model for a concrete tier (`auto` reads as `standard`).
    pub fn model(&self, tier: Tier) -> &str {
        match tier {
            Tier::Simple => &self.simple,
            Tier::Standard | Tier::Auto => &self.standard,
            Tier::Complex => &self.complex,
        }
    }

    /// Picks the tier of a task that names no model: the task's own tier,
    /// else its type's default, else (`auto`) the first rule that matches,
    /// else the cheapest prompt-size band that fits.
    pub fn choose(
        &self,
        task: Option<Tier>,
        type_default: Option<Tier>,
        p: Prompt<'_>,
    ) -> TierChoice {
        let choice = |tier: Tier, reason: &str| TierChoice {
            tier,
            reason: reason.to_owned(),
            classifier_picousd: 0,
        };
        match (task, type_default) {
            (Some(t), _) if t != Tier::Auto => return choice(t, "task"),
            (None, Some(t)) if t != Tier::Auto => return choice(t, "task_type"),
            _ => {}
        }
        if let Some((i, rule)) = self.rules.iter().enumerate().find(|(_, r)| r.matches(p)) {
            let reason = match &rule.name {
                Some(name) => format!("rule:{name}"),
                None => format!("rule:{i}"),
            };
            return TierChoice {
                tier: rule.tier,
                reason,
                classifier_picousd: 0,
            };
        }
        choice(resolve_auto(Tier::Auto, p.chars, self), REASON_PROMPT_SIZE)
    }
}

impl TierRule {
    /// True when every condition the rule gives holds for `p`.
    pub fn matches(&self, p: Prompt<'_>) -> bool {
        self.task_type
            .as_deref()
            .is_none_or(|t| p.task_type == Some(t))
            && self.min_chars.is_none_or(|n| p.chars >= n)
            && self.max_chars.is_none_or(|n| p.chars <= n)
            && self.pattern.as_ref().is_none_or(|re| re.0.is_match(p.text))
    }
}

/// `auto` routing by size alone: the cheapest tier whose prompt-size band fits.
pub fn resolve_auto(tier: Tier, prompt_chars: usize, tiers: &TierModels) -> Tier {
    match tier {
        Tier::Auto if prompt_chars <= tiers.auto_simple_max_chars => Tier::Simple,
        Tier::Auto if prompt_chars <= tiers.auto_standard_max_chars => Tier::Standard,
        Tier::Auto => Tier::Complex,
        t => t,
    }
}

/// Where a task goes: (provider, model). Rate limits and concurrency are per route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Provider name from the config.
    pub provider: String,
    /// Model name sent to the provider.
    pub model: String,
}

impl Route {
    /// `<provider>/<model>`, as the route board and metrics name it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

/// The providers that take batch jobs now: those configured with
/// `batch = true` from the start, and those with `batch = "auto"` once a
/// probe found their batch API. Shared by every clone.
#[derive(Debug, Clone, Default)]
pub struct BatchProviders(Arc<RwLock<HashSet<String>>>);

impl BatchProviders {
    /// These providers, from the start.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        BatchProviders(Arc::new(RwLock::new(names.into_iter().collect())))
    }

    /// Whether `provider` takes batch jobs.
    pub fn contains(&self, provider: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(provider)
    }

    /// From now on `provider` takes batch jobs, or not.
    pub fn set(&self, provider: &str, on: bool) {
        let mut names = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if on {
            names.insert(provider.to_owned());
        } else {
            names.remove(provider);
        }
    }
}

/// Everything the engine needs to route tasks.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Task types by name.
    pub task_types: BTreeMap<String, TaskType>,
    /// Tier → model.
    pub tiers: TierModels,
    /// Model → provider name, for every model some provider serves.
    pub model_providers: HashMap<String, String>,
    /// Providers that take batch jobs now.
    pub batch_providers: BatchProviders,
    /// When a task goes by batch job.
    pub route_policy: RoutePolicy,
    /// The service tiers each provider offers, by provider name (none: the
    /// default tier only).
    pub service_tiers: HashMap<String, TierOptions>,
    /// Providers whose adapter marks the shared prefix for its cache
    /// (Anthropic's `cache_control`): a typed task's user message goes to
    /// them as two text parts, the template head and the rest, so the
    /// adapter can mark the end of the head.
    pub marks_cache_prefix: HashSet<String>,
}

/// A routed task: the route, the request body and the batching key.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Provider and model.
    pub route: Route,
    /// Realtime or by batch job ([`RoutePolicy::decide`]).
    pub kind: RouteKind,
    /// The OpenAI chat completion body, `model` included.
    pub request: Value,
    /// Hash of the shared prompt prefix (the system message and the task
    /// type's template up to its first placeholder), for grouping.
    pub prefix: u64,
    /// Characters of that shared prefix.
    pub prefix_chars: usize,
    /// Characters of its system message alone (what Anthropic caches).
    pub system_chars: usize,
    /// The tier chosen and why; `None` when the task named its model.
    pub tier: Option<TierChoice>,
    /// The service tier its realtime call asks for (sent as the body's
    /// `service_tier` unless `default`).
    pub service_tier: ServiceTier,
    /// Where a refused flex call sends it: the default tier (`Realtime`)
    /// or a batch job (`BatchApi`).
    pub on_flex_refusal: RouteKind,
    /// The prompt text the tier classifier is to label (cut to its
    /// `max_prompt_chars`), when it is enabled and only prompt size
    /// decided the tier; the plan stands until it is classified.
    pub classify: Option<String>,
}

impl Plan {
    /// Leaves the flex tier: the same request at the default tier, sent
    /// `kind` (realtime again, or in a batch job).
    pub fn leave_flex(&mut self, kind: RouteKind) {
        self.service_tier = ServiceTier::Default;
        self.kind = kind;
        if let Some(body) = self.request.as_object_mut() {
            body.remove("service_tier");
        }
    }
}

/// The task type a `{"text"}` payload without a `type` is rendered through.
pub const DEFAULT_TASK_TYPE: &str = "default";

/// Routes a task at `now` (its deadline decides the route kind); an `Err`
/// is an `invalid_request` message.
pub fn plan(task: &Task, catalog: &Catalog, now: DateTime<Utc>) -> Result<Plan, String> {
    plan_with(task, catalog, now, None)
}

/// [`plan`] with the tier already `decided` (by the classifier), when the
/// task names no model.
pub fn plan_with(
    task: &Task,
    catalog: &Catalog,
    now: DateTime<Utc>,
    decided: Option<TierChoice>,
) -> Result<Plan, String> {
    let named = match (&task.task_type, &task.payload) {
        (Some(name), _) => Some(name.as_str()),
        (None, Payload::Text { .. }) => Some(DEFAULT_TASK_TYPE),
        (None, Payload::Chat(_)) => None,
    };
    let task_type = match named {
        Some(name) => Some(catalog.task_types.get(name).ok_or_else(|| {
            if task.task_type.is_none() {
                return format!(
                    "field `type` is required for a {{\"text\"}} payload (no `{DEFAULT_TASK_TYPE}` task type is configured)"
                );
            }
            format!(
                "unknown task type {}; known types: {}",
                quote(name),
                catalog
                    .task_types
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?),
        None => None,
    };
    let mut body = match &task.payload {
        Payload::Text { text, options } => {
            let Some(tt) = task_type else {
                return Err("a {\"text\"} payload needs a task `type`".into());
            };
            let user = render(&tt.template, text, options);
            let mut m = Map::new();
            m.insert(
                "messages".into(),
                json!([
                    {"role": "system", "content": tt.system_prompt},
                    {"role": "user", "content": user},
                ]),
            );
            m.insert("max_completion_tokens".into(), json!(tt.max_tokens));
            m
        }
        Payload::Chat(chat) => {
            let mut m = chat.clone();
            // Without a type, the default type's output limit still applies.
            let limit = task_type.or_else(|| catalog.task_types.get(DEFAULT_TASK_TYPE));
            if let Some(tt) = limit {
                if !m.contains_key("max_tokens") && !m.contains_key("max_completion_tokens") {
                    m.insert("max_completion_tokens".into(), json!(tt.max_tokens));
                }
            }
            m
        }
    };
    let mut classify = None;
    let tier = match (&task.model, decided) {
        (Some(_), _) => None,
        (None, Some(choice)) => Some(choice),
        (None, None) => {
            let text = prompt_text(&body);
            let prompt = Prompt {
                task_type: named,
                text: &text,
                chars: prompt_chars(&body),
            };
            let choice = catalog
                .tiers
                .choose(task.tier, task_type.map(|t| t.default_tier), prompt);
            let classifier = &catalog.tiers.classifier;
            if classifier.enabled && choice.reason == REASON_PROMPT_SIZE {
                classify = Some(cut(&text, classifier.max_prompt_chars).to_owned());
            }
            Some(choice)
        }
    };
    let model = match (&task.model, &tier) {
        (Some(m), _) => m.clone(),
        (None, Some(choice)) => catalog.tiers.model(choice.tier).to_owned(),
        (None, None) => catalog.tiers.standard.clone(),
    };
    let provider = catalog.model_providers.get(&model).ok_or_else(|| {
        let mut known: Vec<&str> = catalog.model_providers.keys().map(String::as_str).collect();
        known.sort_unstable();
        format!(
            "model {} is not served by any configured provider; served models: {}",
            quote(&model),
            known.join(", ")
        )
    })?;
    body.insert("model".into(), Value::String(model.clone()));
    let head = task_type
        .filter(|_| matches!(task.payload, Payload::Text { .. }))
        .map_or("", |tt| template_head(&tt.template));
    let (prefix, system_chars) = prefix_hash(&body, head);
    let ask = RouteAsk {
        priority: task.priority,
        task: task.route,
        task_type: task_type.and_then(|t| t.route),
        provider_allows_batch: catalog.batch_providers.contains(provider),
        deadline: task.deadline,
    };
    let kind = catalog.route_policy.decide(ask, now);
    let service = catalog
        .service_tiers
        .get(provider)
        .map(|o| o.decide(ask, kind, &model))
        .unwrap_or(crate::route_policy::ServiceTierChoice {
            tier: ServiceTier::Default,
            on_refusal: RouteKind::Realtime,
        });
    if catalog.marks_cache_prefix.contains(provider) {
        split_head(&mut body, head);
    }
    let mut request = Value::Object(body);
    if !service.tier.is_default() {
        request["service_tier"] = Value::String(service.tier.as_str().to_owned());
    }
    Ok(Plan {
        kind,
        route: Route {
            provider: provider.clone(),
            model,
        },
        request,
        prefix,
        prefix_chars: system_chars + head.len(),
        system_chars,
        tier,
        service_tier: service.tier,
        on_flex_refusal: service.on_refusal,
        classify,
    })
}

/// Fills `{text}`, `{options}` and `{options.KEY}` (missing keys render empty).
pub fn render(template: &str, text: &str, options: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(template.len() + text.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let key = &after[..end];
        match key {
            "text" => out.push_str(text),
            "options" => out.push_str(&Value::Object(options.clone()).to_string()),
            k if k.starts_with("options.") => match options.get(&k["options.".len()..]) {
                Some(Value::String(s)) => out.push_str(s),
                Some(v) => out.push_str(&v.to_string()),
                None => {}
            },
            _ => {
                // Not a placeholder: keep the braces literally.
                out.push('{');
                out.push_str(key);
                out.push('}');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn prompt_chars(body: &Map<String, Value>) -> usize {
    body.get("messages")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| match m.get("content") {
                    Some(Value::String(s)) => s.len(),
                    Some(other) => other.to_string().len(),
                    None => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Every message's content but a leading system (or developer) one, a line each.
fn prompt_text(body: &Map<String, Value>) -> String {
    let mut out = String::new();
    let messages = body.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        if i == 0 && matches!(role, Some("system" | "developer")) {
            continue;
        }
        match m.get("content") {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(other) => out.push_str(&other.to_string()),
        }
        out.push('\n');
    }
    out
}

/// Makes the first user message, when it begins with `head` (the
/// template's shared start), two text parts: the head, then the rest.
fn split_head(body: &mut Map<String, Value>, head: &str) {
    if head.is_empty() {
        return;
    }
    let Some(user) = body
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .and_then(|ms| ms.iter_mut().find(|m| m["role"] == "user"))
    else {
        return;
    };
    let Some(rest) = user["content"].as_str().and_then(|c| c.strip_prefix(head)) else {
        return;
    };
    if rest.is_empty() {
        return;
    }
    user["content"] = json!([
        {"type": "text", "text": head},
        {"type": "text", "text": rest},
    ]);
}

/// The template's text before its first placeholder: the same for every
/// task of the type.
fn template_head(template: &str) -> &str {
    template.find('{').map_or(template, |at| &template[..at])
}

/// The hash of the system message and `head` (what every request of the
/// group starts with), and the system message's characters.
fn prefix_hash(body: &Map<String, Value>, head: &str) -> (u64, usize) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut system_chars = 0;
    if let Some(first) = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.first())
    {
        if matches!(
            first.get("role").and_then(Value::as_str),
            Some("system" | "developer")
        ) {
            first.to_string().hash(&mut h);
            system_chars = match first.get("content") {
                Some(Value::String(s)) => s.len(),
                Some(other) => other.to_string().len(),
                None => 0,
            };
        }
    }
    head.hash(&mut h);
    (h.finish(), system_chars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Encoding, Priority};

    fn catalog() -> Catalog {
        let mut task_types = BTreeMap::new();
        task_types.insert(
            "summarization".to_owned(),
            TaskType {
                system_prompt: "You summarize.".into(),
                template: "Summarize in {options.language}: {text}".into(),
                default_tier: Tier::Simple,
                max_tokens: 200,
                route: None,
            },
        );
        Catalog {
            task_types,
            tiers: TierModels {
                simple: "small".into(),
                standard: "medium".into(),
                complex: "large".into(),
                auto_simple_max_chars: 10,
                auto_standard_max_chars: 100,
                rules: Vec::new(),
                classifier: ClassifierConfig::default(),
            },
            model_providers: [("small", "p"), ("medium", "p"), ("large", "p")]
                .into_iter()
                .map(|(m, p)| (m.to_owned(), p.to_owned()))
                .collect(),
            batch_providers: BatchProviders::new(["p".to_owned()]),
            marks_cache_prefix: HashSet::new(),
            route_policy: RoutePolicy::default(),
            service_tiers: HashMap::new(),
        }
    }

    fn task(payload: Payload) -> Task {
        let task = Task::new(
            "t".into(),
            payload,
            Priority::P2,
            chrono::Utc::now(),
            Encoding::Json,
        );
        Task {
            task_type: Some("summarization".into()),
            ..task
        }
    }

    #[test]
    fn renders_templates() {
        let opts = json!({"language": "fr", "n": 3});
        let opts = opts.as_object().unwrap();
        assert_eq!(
            render(
                "{text}|{options.language}|{options.n}|{options.x}|{y}",
                "hi",
                opts
            ),
            "hi|fr|3||{y}"
        );
        assert_eq!(render("a {text", "hi", opts), "a {text");
    }

    #[test]
    fn text_payload_uses_the_types_default_tier_and_template() {
        let mut opts = Map::new();
        opts.insert("language".into(), json!("en"));
        let p = plan(
            &task(Payload::Text {
                text: "doc".into(),
                options: opts,
            }),
            &catalog(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(p.route.model, "small");
        assert_eq!(p.request["messages"][1]["content"], "Summarize in en: doc");
        assert_eq!(p.request["max_completion_tokens"], 200);
        assert_eq!(p.request["model"], "small");
    }

    #[test]
    fn a_provider_that_marks_its_cache_prefix_gets_the_template_head_as_its_own_part() {
        let mut c = catalog();
        c.marks_cache_prefix.insert("p".into());
        let text = |text: &str| {
            task(Payload::Text {
                text: text.into(),
                options: Map::new(),
            })
        };
        let p = plan(&text("doc"), &c, Utc::now()).unwrap();
        assert_eq!(
            p.request["messages"][1]["content"],
            json!([{"type": "text", "text": "Summarize in "},
                   {"type": "text", "text": ": doc"}])
        );
        let unmarked = plan(&text("doc"), &catalog(), Utc::now()).unwrap();
        assert_eq!(unmarked.prefix, p.prefix, "the same prefix group");
        assert_eq!(
            unmarked.request["messages"][1]["content"],
            "Summarize in : doc"
        );
    }

    #[test]
    fn auto_tier_picks_the_cheapest_band_that_fits() {
        let mut t = task(Payload::Chat(
            json!({"messages": [{"role": "user", "content": "x".repeat(50)}]})
                .as_object()
                .unwrap()
                .clone(),
        ));
        t.task_type = None;
        assert_eq!(
            plan(&t, &catalog(), Utc::now()).unwrap().route.model,
            "medium"
        );
        t.tier = Some(Tier::Complex);
        assert_eq!(
            plan(&t, &catalog(), Utc::now()).unwrap().route.model,
            "large"
        );
    }

    fn chat(content: &str) -> Task {
        let mut t = task(Payload::Chat(
            json!({"messages": [
                {"role": "system", "content": "You are a lawyer."},
                {"role": "user", "content": content},
            ]})
            .as_object()
            .unwrap()
            .clone(),
        ));
        t.task_type = None;
        t
    }

    fn rule(tier: Tier) -> TierRule {
        TierRule {
            name: None,
            task_type: None,
            pattern: None,
            min_chars: None,
            max_chars: None,
            tier,
        }
    }

    fn choice(p: &Plan) -> (&str, Tier, &str) {
        let c = p.tier.as_ref().unwrap();
        (p.route.model.as_str(), c.tier, c.reason.as_str())
    }

    #[test]
    fn auto_rules_match_in_order_on_pattern_type_and_size() {
        let mut c = catalog();
        c.tiers.rules = vec![
            TierRule {
                name: Some("legal".into()),
                pattern: Some(Pattern::new("(?i)contract|clause").unwrap()),
                ..rule(Tier::Complex)
            },
            TierRule {
                task_type: Some("summarization".into()),
                min_chars: Some(1),
                ..rule(Tier::Standard)
            },
            TierRule {
                max_chars: Some(30),
                ..rule(Tier::Standard)
            },
        ];
        let now = Utc::now();
        // The pattern is looked for in the prompt, not the system message.
        let p = plan(&chat("Review this Contract."), &c, now).unwrap();
        assert_eq!(choice(&p), ("large", Tier::Complex, "rule:legal"));
        // No rule matches: the size bands decide (the system prompt counts).
        let p = plan(&chat(&"x".repeat(50)), &c, now).unwrap();
        assert_eq!(choice(&p), ("medium", Tier::Standard, "prompt_size"));
        let p = plan(&chat("hi"), &c, now).unwrap();
        assert_eq!(choice(&p), ("medium", Tier::Standard, "rule:2"));
        // By type, when the type leaves the tier to `auto`.
        let mut t = task(Payload::Text {
            text: "doc".into(),
            options: Map::new(),
        });
        let p = plan(&t, &c, now).unwrap();
        assert_eq!(choice(&p), ("small", Tier::Simple, "task_type"));
        t.tier = Some(Tier::Auto);
        let p = plan(&t, &c, now).unwrap();
        assert_eq!(choice(&p), ("medium", Tier::Standard, "rule:1"));
    }

    #[test]
    fn a_named_tier_or_model_outranks_the_rules() {
        let mut c = catalog();
        c.tiers.rules = vec![rule(Tier::Complex)];
        let mut t = chat("anything");
        t.tier = Some(Tier::Simple);
        let p = plan(&t, &c, Utc::now()).unwrap();
        assert_eq!(choice(&p), ("small", Tier::Simple, "task"));
        t.model = Some("medium".into());
        let p = plan(&t, &c, Utc::now()).unwrap();
        assert_eq!(p.route.model, "medium");
        assert_eq!(p.tier, None);
        t.tier = None;
        t.model = None;
        let p = plan(&t, &c, Utc::now()).unwrap();
        assert_eq!(choice(&p), ("large", Tier::Complex, "rule:0"));
    }

    #[test]
    fn the_classifier_is_asked_only_where_prompt_size_would_decide() {
        let mut c = catalog();
        c.tiers.rules = vec![TierRule {
            pattern: Some(Pattern::new("(?i)contract").unwrap()),
            ..rule(Tier::Complex)
        }];
        let now = Utc::now();
        // Off: prompt size, nothing to classify.
        let p = plan(&chat("hello there"), &c, now).unwrap();
        assert_eq!(choice(&p), ("medium", Tier::Standard, "prompt_size"));
        assert_eq!(p.classify, None);
        c.tiers.classifier.enabled = true;
        c.tiers.classifier.max_prompt_chars = 8;
        // On: the prompt-size plan stands until classified, and the text
        // the classifier sees is the prompt without its system message, cut.
        let p = plan(&chat("hello there"), &c, now).unwrap();
        assert_eq!(choice(&p), ("medium", Tier::Standard, "prompt_size"));
        assert_eq!(p.classify.as_deref(), Some("hello th"));
        // A rule, a named tier, a type's default tier or a named model decide
        // without it.
        let p = plan(&chat("a contract"), &c, now).unwrap();
        assert_eq!((choice(&p).2, p.classify.as_deref()), ("rule:0", None));
        let mut t = chat("hello");
        t.tier = Some(Tier::Simple);
        assert_eq!(plan(&t, &c, now).unwrap().classify, None);
        t.tier = None;
        t.model = Some("large".into());
        assert_eq!(plan(&t, &c, now).unwrap().classify, None);
        let typed = task(Payload::Text {
            text: "doc".into(),
            options: Map::new(),
        });
        assert_eq!(plan(&typed, &c, now).unwrap().classify, None);
        // The verdict routes the task to its tier's model, the cost on it.
        let decided = TierChoice {
            tier: Tier::Complex,
            reason: REASON_CLASSIFIER.into(),
            classifier_picousd: 7,
        };
        let p = plan_with(&chat("hello there"), &c, now, Some(decided.clone())).unwrap();
        assert_eq!(choice(&p), ("large", Tier::Complex, "classifier"));
        assert_eq!(p.request["model"], "large");
        assert_eq!(p.tier, Some(decided));
        assert_eq!(p.classify, None, "classified once");
    }

    #[test]
    fn rules_deserialize_and_a_bad_pattern_is_refused() {
        let tiers: TierModels = from_json(
            r#"{"simple":"s","standard":"m","complex":"l",
                "rules":[{"pattern":"^\\d+$","tier":"simple"}]}"#,
        )
        .unwrap();
        assert_eq!(tiers.rules[0].pattern.as_ref().unwrap().as_str(), "^\\d+$");
        let e = from_json(
            r#"{"simple":"s","standard":"m","complex":"l","rules":[{"pattern":"(","tier":"simple"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid pattern \"(\""), "{e}");
    }

    fn from_json(json: &str) -> Result<TierModels, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn unknown_type_and_unserved_model_are_rejected_by_name() {
        let mut t = task(Payload::Text {
            text: "x".into(),
            options: Map::new(),
        });
        t.task_type = Some("poetry".into());
        assert!(plan(&t, &catalog(), Utc::now())
            .unwrap_err()
            .contains("unknown task type \"poetry\""));
        t.task_type = Some("summarization".into());
        t.model = Some("gpt-99".into());
        assert!(plan(&t, &catalog(), Utc::now())
            .unwrap_err()
            .contains("\"gpt-99\" is not served"));
    }

    #[test]
    fn a_text_payload_without_type_uses_the_default_type_when_configured() {
        let mut t = task(Payload::Text {
            text: "hello".into(),
            options: Map::new(),
        });
        t.task_type = None;
        let e = plan(&t, &catalog(), Utc::now()).unwrap_err();
        assert!(e.contains("`type` is required"), "{e}");
        let mut c = catalog();
        c.task_types.insert(
            DEFAULT_TASK_TYPE.into(),
            TaskType {
                system_prompt: "You are helpful.".into(),
                template: "{text}".into(),
                default_tier: Tier::Standard,
                max_tokens: 99,
                route: None,
            },
        );
        let p = plan(&t, &c, Utc::now()).unwrap();
        assert_eq!(p.request["messages"][1]["content"], "hello");
        assert_eq!(p.request["max_completion_tokens"], 99);
        assert_eq!(p.route.model, "medium");
    }

    #[test]
    fn the_plan_carries_the_route_kind_from_priority_type_task_and_provider() {
        let mut c = catalog();
        let mut t = task(Payload::Text {
            text: "x".into(),
            options: Map::new(),
        });
        assert_eq!(plan(&t, &c, Utc::now()).unwrap().kind, RouteKind::Realtime);
        t.priority = crate::task::Priority::P3;
        assert_eq!(plan(&t, &c, Utc::now()).unwrap().kind, RouteKind::BatchApi);
        if let Some(tt) = c.task_types.get_mut("summarization") {
            tt.route = Some(RoutePreference::Realtime);
        }
        assert_eq!(plan(&t, &c, Utc::now()).unwrap().kind, RouteKind::Realtime);
        t.route = Some(RoutePreference::BatchApi);
        assert_eq!(plan(&t, &c, Utc::now()).unwrap().kind, RouteKind::BatchApi);
        c.batch_providers.set("p", false);
        assert_eq!(plan(&t, &c, Utc::now()).unwrap().kind, RouteKind::Realtime);
    }

    #[test]
    fn same_system_prompt_shares_a_prefix_key() {
        let c = catalog();
        let a = plan(
            &task(Payload::Text {
                text: "a".into(),
                options: Map::new(),
            }),
            &c,
            Utc::now(),
        )
        .unwrap();
        let b = plan(
            &task(Payload::Text {
                text: "b".into(),
                options: Map::new(),
            }),
            &c,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(a.prefix, b.prefix);
        // "You summarize." then "Summarize in ".
        assert_eq!((a.system_chars, a.prefix_chars), (14, 14 + 13));
        let mut chat = task(Payload::Chat(
            json!({"messages": [{"role": "system", "content": "You summarize."},
                                {"role": "user", "content": "Summarize in x"}]})
            .as_object()
            .unwrap()
            .clone(),
        ));
        chat.model = a.request["model"].as_str().map(str::to_owned);
        let chat = plan(&chat, &c, Utc::now()).unwrap();
        assert_ne!(
            chat.prefix, a.prefix,
            "the template head is part of the key"
        );
        assert_eq!(
            chat.prefix_chars, 14,
            "a chat payload shares its system message"
        );
    }

    #[test]
    fn a_flex_plan_sends_service_tier_and_leaving_flex_removes_it() {
        let mut c = catalog();
        c.service_tiers.insert(
            "p".into(),
            TierOptions {
                flex: true,
                flex_fallback: crate::route_policy::FlexFallback::BatchApi,
                ..TierOptions::default()
            },
        );
        let mut t = task(Payload::Text {
            text: "x".into(),
            options: Map::new(),
        });
        t.priority = crate::task::Priority::P3;
        // A deadline inside the batch window: realtime, at the flex tier.
        t.deadline = Some(Utc::now() + chrono::Duration::hours(1));
        let mut p = plan(&t, &c, Utc::now()).unwrap();
        assert_eq!(
            (p.kind, p.service_tier, p.on_flex_refusal),
            (RouteKind::Realtime, ServiceTier::Flex, RouteKind::BatchApi)
        );
        assert_eq!(p.request["service_tier"], "flex");
        p.leave_flex(RouteKind::BatchApi);
        assert_eq!(
            (p.kind, p.service_tier),
            (RouteKind::BatchApi, ServiceTier::Default)
        );
        assert!(p.request.get("service_tier").is_none());
        // Far enough for a batch job: no tier at all.
        t.deadline = None;
        let p = plan(&t, &c, Utc::now()).unwrap();
        assert_eq!(p.kind, RouteKind::BatchApi);
        assert!(p.request.get("service_tier").is_none());
    }
}
