//! Outcome reports: a [`Report`] collects typed outcomes as they arrive and
//! renders plain-text tables of throughput, latency per priority, outcomes,
//! retries, tokens and cost. Used by `batchd demo`; anything that reads
//! outcomes can use it. The tables and number formats are in [`table`],
//! shared with the other commands' summaries.

pub mod table;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use batchd_actors::pricing::PriceTable;
use batchd_actors::task::{Outcome, RouteKind, Status, Usage};

use table::{group, percentile, section, share, truncate, usd, Table};

/// How many failed tasks the report lists by name.
const FAILURE_SAMPLES: usize = 10;
/// Longest error message shown in the failures table.
const MESSAGE_WIDTH: usize = 60;

/// Totals and distributions over a set of outcomes.
#[derive(Debug, Clone, Default)]
pub struct Report {
    seen: HashSet<String>,
    outcomes: u64,
    repeated: u64,
    by_priority: BTreeMap<u8, PriorityStats>,
    by_status: BTreeMap<(String, String), u64>,
    by_model: BTreeMap<String, ModelStats>,
    /// Tasks and their cost (USD) per route.
    by_route: BTreeMap<String, (u64, f64)>,
    retries: u64,
    retried_tasks: u64,
    failures: Vec<Failure>,
    dead_letters: Option<u64>,
    elapsed: Option<Duration>,
    prices: Option<PriceTable>,
    /// The model tiering is measured against (the complex tier's).
    reference_model: Option<String>,
    levers: Levers,
    notes: Vec<String>,
}

/// What the cost levers saved over the outcomes seen, USD.
#[derive(Debug, Clone, Default)]
struct Levers {
    /// The batch discount on Batch API outcomes.
    batch_api: f64,
    /// Tiered outcomes' tokens at the reference model, less their cost.
    tiering: f64,
    /// Outcomes answered from a shared call, per model.
    shared: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default)]
struct PriorityStats {
    succeeded: u64,
    failed: u64,
    total_ms: Vec<u64>,
    queued_ms: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
struct ModelStats {
    tasks: u64,
    usage: Usage,
    cost_usd: f64,
    /// What the same tokens cost with no cached input.
    uncached_cost_usd: f64,
    /// Some usage had no price in the table.
    unpriced: bool,
}

#[derive(Debug, Clone)]
struct Failure {
    task_id: String,
    kind: String,
    message: String,
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// An empty report that also shows what the tokens would have cost
    /// without prompt caching, from `prices`.
    pub fn with_prices(prices: PriceTable) -> Report {
        Report {
            prices: Some(prices),
            ..Report::default()
        }
    }

    /// Also shows what tiering saved: each outcome whose model was picked
    /// by tier, its tokens priced at `model` (the complex tier's) less its cost.
    pub fn with_reference_model(mut self, model: impl Into<String>) -> Report {
        self.reference_model = Some(model.into());
        self
    }

    /// Adds one outcome. Returns false (and counts nothing) when an outcome
    /// for the same `task_id` was already recorded.
    pub fn record(&mut self, outcome: &Outcome) -> bool {
        if !self.seen.insert(outcome.task_id.clone()) {
            self.repeated += 1;
            return false;
        }
        self.outcomes += 1;
        let succeeded = outcome.status == Status::Succeeded;
        let kind = outcome
            .error
            .as_ref()
            .map_or("-", |e| e.kind.as_str())
            .to_owned();

        let p = self.by_priority.entry(outcome.priority).or_default();
        if succeeded {
            p.succeeded += 1;
        } else {
            p.failed += 1;
        }
        p.total_ms.push(outcome.timings.total_ms);
        p.queued_ms.push(outcome.timings.queued_ms);

        *self
            .by_status
            .entry((outcome.status.as_str().to_owned(), kind.clone()))
            .or_default() += 1;
        if let Some(route) = outcome.route {
            let r = self.by_route.entry(route.as_str().to_owned()).or_default();
            r.0 += 1;
            r.1 += outcome.cost_usd;
        }

        let attempts = u64::from(outcome.attempts);
        if attempts > 1 {
            self.retries += attempts - 1;
            self.retried_tasks += 1;
        }

        let usage = outcome.usage;
        let cost = outcome.cost_usd;
        if let Some(model) = outcome.model.as_deref() {
            let route = outcome.route.unwrap_or(RouteKind::Realtime);
            let no_cache = Usage {
                cached_input_tokens: 0,
                ..usage
            };
            let uncached = self
                .prices
                .as_ref()
                .map(|prices| prices.cost(model, &no_cache, route));
            let m = self.by_model.entry(model.to_owned()).or_default();
            // Tasks refused before reaching the model (an unknown model, say) don't count.
            if succeeded || usage != Usage::default() || cost > 0.0 {
                m.tasks += 1;
            }
            m.usage.input_tokens += usage.input_tokens;
            m.usage.cached_input_tokens += usage.cached_input_tokens;
            m.usage.output_tokens += usage.output_tokens;
            m.cost_usd += cost;
            match uncached {
                Some(Some(c)) => m.uncached_cost_usd += c,
                Some(None) if usage != Usage::default() => m.unpriced = true,
                _ => {}
            }
        }

        self.count_levers(outcome);
        if !succeeded && self.failures.len() < FAILURE_SAMPLES {
            self.failures.push(Failure {
                task_id: outcome.task_id.clone(),
                kind,
                message: outcome
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
            });
        }
        true
    }

    /// Outcomes recorded (one per task).
    pub fn outcomes(&self) -> u64 {
        self.outcomes
    }

    /// Outcomes recorded per priority number.
    pub fn outcomes_by_priority(&self) -> BTreeMap<u8, u64> {
        self.by_priority
            .iter()
            .map(|(p, s)| (*p, s.succeeded + s.failed))
            .collect()
    }

    /// Outcomes with `status: succeeded`.
    pub fn succeeded(&self) -> u64 {
        self.by_priority.values().map(|s| s.succeeded).sum()
    }

    /// Outcomes with `status: failed`.
    pub fn failed(&self) -> u64 {
        self.by_priority.values().map(|s| s.failed).sum()
    }

    /// Sum of `cost_usd`.
    pub fn cost_usd(&self) -> f64 {
        self.by_model.values().map(|m| m.cost_usd).sum()
    }

    /// Extra provider attempts: the sum of `attempts - 1`.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Sets the number of dead letters seen on the DLQ subjects.
    pub fn set_dead_letters(&mut self, n: u64) {
        self.dead_letters = Some(n);
    }

    /// Sets the wall time the outcomes took, for the throughput line.
    pub fn set_elapsed(&mut self, elapsed: Duration) {
        self.elapsed = Some(elapsed);
    }

    /// Adds a line to the closing notes.
    pub fn add_note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The report as plain-text tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_throughput(&mut out);
        self.render_latency(&mut out);
        self.render_outcomes(&mut out);
        self.render_cost(&mut out);
        self.render_failures(&mut out);
        if !self.notes.is_empty() {
            section(&mut out, "Notes");
            for note in &self.notes {
                let _ = writeln!(out, "  {note}");
            }
        }
        out
    }

    fn render_throughput(&self, out: &mut String) {
        section(out, "Throughput");
        match self.elapsed {
            Some(d) if d > Duration::ZERO => {
                let secs = d.as_secs_f64();
                let _ = writeln!(
                    out,
                    "  {} outcomes in {:.2} s: {} tasks/s",
                    group(self.outcomes),
                    secs,
                    group((self.outcomes as f64 / secs).round() as u64)
                );
            }
            _ => {
                let _ = writeln!(out, "  {} outcomes", group(self.outcomes));
            }
        }
    }

    fn render_latency(&self, out: &mut String) {
        section(out, "Latency by priority (ms, publish to outcome)");
        let mut t = Table::new(&[
            "priority",
            "tasks",
            "ok",
            "failed",
            "p50",
            "p95",
            "p99",
            "max",
            "queue p50",
        ]);
        let mut all_total = Vec::new();
        let mut all_queued = Vec::new();
        let (mut ok, mut failed) = (0, 0);
        for (p, s) in &self.by_priority {
            let name = if *p == 0 {
                "?".to_owned()
            } else {
                format!("p{p}")
            };
            t.row(latency_row(
                name,
                s.succeeded,
                s.failed,
                &s.total_ms,
                &s.queued_ms,
            ));
            all_total.extend_from_slice(&s.total_ms);
            all_queued.extend_from_slice(&s.queued_ms);
            ok += s.succeeded;
            failed += s.failed;
        }
        if self.by_priority.len() > 1 {
            t.rule();
            t.row(latency_row(
                "all".into(),
                ok,
                failed,
                &all_total,
                &all_queued,
            ));
        }
        out.push_str(&t.render());
    }

    fn render_outcomes(&self, out: &mut String) {
        section(out, "Outcomes");
        let mut t = Table::new(&["status", "error kind", "tasks", "share"]).text_columns(2);
        for ((status, kind), n) in &self.by_status {
            t.row(vec![
                status.clone(),
                kind.clone(),
                group(*n),
                share(*n, self.outcomes),
            ]);
        }
        out.push_str(&t.render());
        let _ = writeln!(out);
        let mut facts: Vec<(String, String)> = Vec::new();
        facts.push((
            "retries".into(),
            format!(
                "{} extra attempts; {} tasks ({}) needed more than one",
                group(self.retries),
                group(self.retried_tasks),
                share(self.retried_tasks, self.outcomes)
            ),
        ));
        if let Some(n) = self.dead_letters {
            facts.push(("dead letters".into(), group(n)));
        }
        if !self.by_route.is_empty() {
            let routes: Vec<String> = self
                .by_route
                .iter()
                .map(|(r, (n, cost))| format!("{r} {} ({})", group(*n), usd(*cost)))
                .collect();
            facts.push(("routes".into(), routes.join(", ")));
        }
        if self.repeated > 0 {
            facts.push((
                "repeats".into(),
                format!(
                    "{} outcome messages repeated a task already counted",
                    group(self.repeated)
                ),
            ));
        }
        let width = facts.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in facts {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
    }

    fn render_cost(&self, out: &mut String) {
        section(out, "Tokens and cost by model (USD)");
        let mut t = Table::new(&["model", "tasks", "input", "cached", "output", "cost"]);
        let mut total = ModelStats::default();
        for (model, m) in &self.by_model {
            if m.tasks == 0 {
                continue;
            }
            t.row(vec![
                model.clone(),
                group(m.tasks),
                group(m.usage.input_tokens),
                group(m.usage.cached_input_tokens),
                group(m.usage.output_tokens),
                usd(m.cost_usd),
            ]);
            total.tasks += m.tasks;
            total.usage.input_tokens += m.usage.input_tokens;
            total.usage.cached_input_tokens += m.usage.cached_input_tokens;
            total.usage.output_tokens += m.usage.output_tokens;
            total.cost_usd += m.cost_usd;
        }
        t.rule();
        t.row(vec![
            "total".into(),
            group(total.tasks),
            group(total.usage.input_tokens),
            group(total.usage.cached_input_tokens),
            group(total.usage.output_tokens),
            usd(total.cost_usd),
        ]);
        out.push_str(&t.render());
        if total.tasks > 0 {
            let _ = writeln!(
                out,
                "  {} per 1,000 tasks",
                usd(total.cost_usd * 1000.0 / total.tasks as f64)
            );
        }
        if let Some(uncached) = self.uncached_cost() {
            if uncached > total.cost_usd && total.usage.cached_input_tokens > 0 {
                let saved = uncached - total.cost_usd;
                let _ = writeln!(
                    out,
                    "  without prompt caching: {} (caching saved {}, {:.1}%)",
                    usd(uncached),
                    usd(saved),
                    saved * 100.0 / uncached
                );
            }
        }
        if self.prices.is_some() {
            let l = &self.levers;
            let mut parts = vec![format!("Batch API {}", usd(l.batch_api))];
            if let Some(reference) = &self.reference_model {
                parts.push(format!("tiering {} (against {reference})", usd(l.tiering)));
            }
            let shared: u64 = l.shared.values().sum();
            parts.push(format!(
                "dedupe {} ({} tasks from a shared call)",
                usd(self.dedupe_saved()),
                group(shared)
            ));
            let _ = writeln!(out, "  saved by levers: {}", parts.join(", "));
        }
    }

    fn count_levers(&mut self, o: &Outcome) {
        let (Some(prices), Some(model)) = (&self.prices, o.model.as_deref()) else {
            return;
        };
        if o.shared_call {
            *self.levers.shared.entry(model.to_owned()).or_default() += 1;
            return;
        }
        let route = o.route.unwrap_or(RouteKind::Realtime);
        let d = prices.batch_discount;
        if route == RouteKind::BatchApi && d < 1.0 {
            // Spend at (1 - d) of list price: the discount is d / (1 - d) of it.
            self.levers.batch_api += o.cost_usd * d / (1.0 - d);
        }
        let reference = self.reference_model.as_deref().filter(|r| *r != model);
        if let (Some(reference), Some(_)) = (reference, o.tier) {
            let tier = o.service_tier.unwrap_or_default();
            if let Some(at) = prices.tier_cost_picousd(reference, &o.usage, route, tier) {
                self.levers.tiering += (batchd_actors::pricing::usd(at) - o.cost_usd).max(0.0);
            }
        }
    }

    /// What dedupe saved: each shared outcome at the mean cost of a paid
    /// outcome of its model.
    fn dedupe_saved(&self) -> f64 {
        self.levers
            .shared
            .iter()
            .filter_map(|(model, n)| {
                let m = self.by_model.get(model)?;
                let paid = m.tasks.saturating_sub(*n);
                (paid > 0).then(|| *n as f64 * m.cost_usd / paid as f64)
            })
            .fold(0.0, |sum, saved| sum + saved)
    }

    /// What all recorded tokens would cost with no cached input; `None`
    /// without a price table or when a model has no price.
    fn uncached_cost(&self) -> Option<f64> {
        self.prices.as_ref()?;
        if self.by_model.values().any(|m| m.unpriced) {
            return None;
        }
        Some(self.by_model.values().map(|m| m.uncached_cost_usd).sum())
    }

    fn render_failures(&self, out: &mut String) {
        let failed = self.failed();
        if failed == 0 {
            return;
        }
        let title = if failed as usize > self.failures.len() {
            format!("Failed tasks (first {} of {})", self.failures.len(), failed)
        } else {
            format!("Failed tasks ({failed})")
        };
        section(out, &title);
        let mut t = Table::new(&["task", "error kind", "message"]).text_columns(3);
        for f in &self.failures {
            t.row(vec![
                f.task_id.clone(),
                f.kind.clone(),
                truncate(&f.message, MESSAGE_WIDTH),
            ]);
        }
        out.push_str(&t.render());
    }
}

fn latency_row(name: String, ok: u64, failed: u64, total: &[u64], queued: &[u64]) -> Vec<String> {
    let total = sorted(total);
    let queued = sorted(queued);
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), group);
    vec![
        name,
        group(ok + failed),
        group(ok),
        group(failed),
        ms(percentile(&total, 50.0)),
        ms(percentile(&total, 95.0)),
        ms(percentile(&total, 99.0)),
        ms(total.last().copied()),
        ms(percentile(&queued, 50.0)),
    ]
}

fn sorted(values: &[u64]) -> Vec<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fixtures;
    use batchd_actors::task::{ErrorKind, TaskError, Timings};
    use serde_json::json;

    fn outcome(id: &str, priority: u8, total_ms: u64, queued_ms: u64) -> Outcome {
        Outcome {
            task_id: id.into(),
            output: Some("ok".into()),
            usage: Usage {
                input_tokens: 1000,
                cached_input_tokens: 0,
                output_tokens: 100,
                ..Usage::default()
            },
            cost_usd: 0.00014,
            attempts: 1,
            priority,
            tenant: "acme".into(),
            timings: Timings {
                queued_ms,
                processing_ms: total_ms - queued_ms,
                total_ms,
            },
            ..fixtures::outcome(Status::Succeeded)
        }
    }

    fn failed(id: &str, kind: ErrorKind, message: &str) -> Outcome {
        let base = fixtures::outcome(Status::Failed);
        Outcome::failure(
            id.into(),
            TaskError::new(kind, message),
            3,
            base.tenant,
            5,
            base.completed_at,
        )
    }

    #[test]
    fn a_repeated_task_id_is_counted_once() {
        let mut r = Report::new();
        assert!(r.record(&outcome("a", 1, 10, 2)));
        assert!(!r.record(&outcome("a", 1, 10, 2)));
        assert!(r.record(&outcome("b", 2, 10, 2)));
        assert_eq!(r.outcomes(), 2);
        assert_eq!(r.outcomes_by_priority(), BTreeMap::from([(1, 1), (2, 1)]));
        assert!(r.render().contains("1 outcome messages repeated"));
    }

    #[test]
    fn totals_count_retries_failures_and_cost() {
        let mut r = Report::new();
        let mut o = outcome("a", 2, 100, 10);
        o.attempts = 3;
        r.record(&o);
        r.record(&outcome("b", 2, 100, 10));
        r.record(&failed("c", ErrorKind::InvalidRequest, "malformed JSON"));
        assert_eq!(r.succeeded(), 2);
        assert_eq!(r.failed(), 1);
        assert_eq!(r.retries(), 2);
        assert!((r.cost_usd() - 0.00028).abs() < 1e-12);
    }

    #[test]
    fn renders_the_expected_tables() {
        let mut r = Report::new();
        for i in 1..=100u64 {
            let p = if i <= 10 { 1 } else { 3 };
            r.record(&outcome(&format!("t{i}"), p, i * 10, i));
        }
        let mut retried = outcome("r1", 3, 2000, 20);
        retried.attempts = 2;
        retried.usage.cached_input_tokens = 512;
        r.record(&retried);
        r.record(&failed(
            "bad-1",
            ErrorKind::InvalidRequest,
            "unknown task type \"poetry\"",
        ));
        r.set_dead_letters(1);
        r.set_elapsed(Duration::from_secs(2));
        r.add_note("3 duplicate publishes were dropped");
        let text = r.render();

        // p3 total_ms, sorted: 5, 110, 120, ..., 1000, 2000 (92 values).
        // Nearest rank: p50 = 46th = 550, p95 = 88th = 970, p99 = 92nd = 2000.
        // All 102: 5, 10, 20, ..., 1000, 2000: p50 = 51st = 500, p95 = 97th = 960,
        // p99 = 101st = 1000. Queue times: p1 1..10 (p50 5); p3 5, 11..20, 20,
        // 21..100 (46th = 54); all 1..100 plus 5 and 20 (51st = 49).
        let expected_latency = "\
Latency by priority (ms, publish to outcome)
  priority  tasks   ok  failed  p50  p95    p99    max  queue p50
  ---------------------------------------------------------------
  p1           10   10       0   50  100    100    100          5
  p3           92   91       1  550  970  2,000  2,000         54
  ---------------------------------------------------------------
  all         102  101       1  500  960  1,000  2,000         49
";
        assert!(text.contains(expected_latency), "{text}");
        assert!(
            text.contains("  102 outcomes in 2.00 s: 51 tasks/s\n"),
            "{text}"
        );

        let expected_outcomes = "\
  status     error kind       tasks  share
  ----------------------------------------
  failed     invalid_request      1   1.0%
  succeeded  -                  101  99.0%

  retries       1 extra attempts; 1 tasks (1.0%) needed more than one
  dead letters  1
  routes        realtime 101 ($0.014140)
";
        assert!(text.contains(expected_outcomes), "{text}");

        let expected_cost = "\
  model         tasks    input  cached  output       cost
  -------------------------------------------------------
  gpt-4.1-nano    101  101,000     512  10,100  $0.014140
  -------------------------------------------------------
  total           101  101,000     512  10,100  $0.014140
  $0.140000 per 1,000 tasks
";
        assert!(text.contains(expected_cost), "{text}");
        assert!(text.contains("Failed tasks (1)\n"), "{text}");
        assert!(
            text.contains("  bad-1  invalid_request  unknown task type \"poetry\"\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Notes\n  3 duplicate publishes were dropped\n"),
            "{text}"
        );
    }

    #[test]
    fn prices_show_what_caching_saved() {
        let prices: PriceTable = serde_json::from_value(json!({
            "as_of": "2025-08-07",
            "models": {"gpt-4.1-nano": {"input": 0.10, "cached_input": 0.025, "output": 0.40}}
        }))
        .unwrap();
        let mut r = Report::with_prices(prices);
        let mut o = outcome("a", 1, 10, 1);
        // 1000 input tokens, 800 of them cached, 100 output:
        // with caching 200*0.10 + 800*0.025 + 100*0.40 = 80 per 1M tokens;
        // without, 1000*0.10 + 100*0.40 = 140 per 1M tokens.
        o.usage.cached_input_tokens = 800;
        o.cost_usd = 0.00008;
        r.record(&o);
        let text = r.render();
        assert!(
            text.contains("without prompt caching: $0.000140 (caching saved $0.000060, 42.9%)"),
            "{text}"
        );
    }

    #[test]
    fn the_levers_line_says_what_batch_tiering_and_dedupe_saved() {
        let prices: PriceTable = serde_json::from_value(json!({
            "as_of": "2025-08-07",
            "batch_discount": 0.5,
            "models": {
                "gpt-4.1-nano": {"input": 0.10, "cached_input": 0.025, "output": 0.40},
                "gpt-4.1": {"input": 2.00, "cached_input": 0.50, "output": 8.00},
            }
        }))
        .unwrap();
        let mut r = Report::with_prices(prices).with_reference_model("gpt-4.1");
        // 1000 input and 100 output tokens on nano: 0.00014 realtime, 0.00007
        // by batch; on gpt-4.1, 0.0028 realtime, 0.0014 by batch.
        let tiered = |id: &str, route: RouteKind, cost: f64| {
            let mut o = outcome(id, 3, 10, 1);
            o.model = Some("gpt-4.1-nano".into());
            o.tier = Some(batchd_actors::task::Tier::Simple);
            o.route = Some(route);
            o.cost_usd = cost;
            o
        };
        r.record(&tiered("a", RouteKind::Realtime, 0.00014));
        r.record(&tiered("b", RouteKind::BatchApi, 0.00007));
        let mut shared = tiered("c", RouteKind::Realtime, 0.0);
        shared.shared_call = true;
        shared.usage = Usage::default();
        r.record(&shared);
        let text = r.render();
        // Batch: 0.00007 off; tiering: (0.0028 - 0.00014) + (0.0014 - 0.00007);
        // dedupe: the shared task at the mean of the two paid ones.
        assert!(
            text.contains(
                "saved by levers: Batch API $0.000070, tiering $0.003990 (against gpt-4.1), dedupe $0.000105 (1 tasks from a shared call)"
            ),
            "{text}"
        );
    }
}
