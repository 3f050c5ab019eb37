//! Outcome reports: a [`Report`] collects outcomes as they arrive (one JSON
//! value each, the shape of PROTOCOL.md) and renders plain-text tables of
//! throughput, latency per priority, outcomes, retries, tokens and cost.
//! Used by `batchd demo`; anything that reads outcomes can use it.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use batchd_actors::pricing::PriceTable;
use batchd_actors::task::{RouteKind, Usage};
use serde_json::Value;

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
    by_route: BTreeMap<String, u64>,
    retries: u64,
    retried_tasks: u64,
    failures: Vec<Failure>,
    dead_letters: Option<u64>,
    elapsed: Option<Duration>,
    prices: Option<PriceTable>,
    notes: Vec<String>,
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

    /// Adds one outcome. Returns false (and counts nothing) when an outcome
    /// for the same `task_id` was already recorded.
    pub fn record(&mut self, outcome: &Value) -> bool {
        if let Some(id) = outcome["task_id"].as_str() {
            if !self.seen.insert(id.to_owned()) {
                self.repeated += 1;
                return false;
            }
        }
        self.outcomes += 1;
        let status = outcome["status"].as_str().unwrap_or("unknown").to_owned();
        let kind = outcome["error"]["kind"].as_str().unwrap_or("-").to_owned();
        let succeeded = status == "succeeded";

        let priority = outcome["priority"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
            .unwrap_or(0);
        let p = self.by_priority.entry(priority).or_default();
        if succeeded {
            p.succeeded += 1;
        } else {
            p.failed += 1;
        }
        if let Some(ms) = outcome["timings"]["total_ms"].as_u64() {
            p.total_ms.push(ms);
        }
        if let Some(ms) = outcome["timings"]["queued_ms"].as_u64() {
            p.queued_ms.push(ms);
        }

        *self.by_status.entry((status, kind.clone())).or_default() += 1;
        if let Some(route) = outcome["route"].as_str() {
            *self.by_route.entry(route.to_owned()).or_default() += 1;
        }

        let attempts = outcome["attempts"].as_u64().unwrap_or(0);
        if attempts > 1 {
            self.retries += attempts - 1;
            self.retried_tasks += 1;
        }

        let usage = Usage {
            input_tokens: outcome["usage"]["input_tokens"].as_u64().unwrap_or(0),
            cached_input_tokens: outcome["usage"]["cached_input_tokens"]
                .as_u64()
                .unwrap_or(0),
            output_tokens: outcome["usage"]["output_tokens"].as_u64().unwrap_or(0),
        };
        let cost = outcome["cost_usd"].as_f64().unwrap_or(0.0);
        if let Some(model) = outcome["model"].as_str() {
            let route = match outcome["route"].as_str() {
                Some("batch_api") => RouteKind::BatchApi,
                _ => RouteKind::Realtime,
            };
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

        if !succeeded && self.failures.len() < FAILURE_SAMPLES {
            self.failures.push(Failure {
                task_id: outcome["task_id"].as_str().unwrap_or("?").to_owned(),
                kind,
                message: outcome["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
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
                .map(|(r, n)| format!("{r} {}", group(*n)))
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

/// The nearest-rank percentile of ascending `sorted` values: the smallest
/// value with at least `p` percent of the values at or below it. `None` for
/// no values; `p` is clamped to 0..=100.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// `1234567` → `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Dollars with enough decimals to show sub-cent totals.
pub fn usd(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("${x:.2}")
    } else if x.abs() >= 1.0 {
        format!("${x:.4}")
    } else {
        format!("${x:.6}")
    }
}

fn share(n: u64, of: u64) -> String {
    if of == 0 {
        return "-".into();
    }
    format!("{:.1}%", n as f64 * 100.0 / of as f64)
}

fn truncate(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut t: String = one_line.chars().take(max.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

fn section(out: &mut String, title: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(title);
    out.push('\n');
}

/// A plain-text table: text columns left-aligned, number columns
/// right-aligned, two spaces between columns, indented by two.
struct Table {
    header: Vec<String>,
    rows: Vec<Option<Vec<String>>>,
    /// How many leading columns hold text.
    text_columns: usize,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            text_columns: 1,
        }
    }

    /// The first `n` columns hold text (left-aligned).
    fn text_columns(mut self, n: usize) -> Table {
        self.text_columns = n;
        self
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Some(cells));
    }

    /// A horizontal rule before the next row.
    fn rule(&mut self) {
        self.rows.push(None);
    }

    fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in self.rows.iter().flatten() {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let mut text = String::from(" ");
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = width.saturating_sub(cell.chars().count());
                text.push(' ');
                if i < self.text_columns {
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad));
                } else {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                }
                text.push(' ');
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, &self.header);
        let rule_width = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        let rule = format!("  {}\n", "-".repeat(rule_width));
        out.push_str(&rule);
        for row in &self.rows {
            match row {
                Some(cells) => line(&mut out, cells),
                None => out.push_str(&rule),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcome(id: &str, priority: u8, total_ms: u64, queued_ms: u64) -> Value {
        json!({
            "task_id": id,
            "status": "succeeded",
            "output": "ok",
            "error": null,
            "model": "gpt-4.1-nano",
            "provider": "openai",
            "route": "realtime",
            "usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 100},
            "cost_usd": 0.00014,
            "attempts": 1,
            "priority": priority,
            "tenant": "acme",
            "timings": {"queued_ms": queued_ms, "processing_ms": total_ms - queued_ms, "total_ms": total_ms},
        })
    }

    fn failed(id: &str, kind: &str, message: &str) -> Value {
        json!({
            "task_id": id,
            "status": "failed",
            "output": null,
            "error": {"kind": kind, "message": message, "status_code": null},
            "model": null,
            "usage": {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0},
            "cost_usd": 0.0,
            "attempts": 0,
            "priority": 3,
            "timings": {"queued_ms": 5, "processing_ms": 0, "total_ms": 5},
        })
    }

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));

        let v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000];
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(1000));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(1000));

        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1, 2], f64::NAN), Some(1));
        assert_eq!(percentile(&[1, 2], 250.0), Some(2));
    }

    #[test]
    fn group_inserts_thousands_separators() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }

    #[test]
    fn usd_keeps_small_amounts_readable() {
        assert_eq!(usd(0.000123), "$0.000123");
        assert_eq!(usd(1.5), "$1.5000");
        assert_eq!(usd(1234.567), "$1234.57");
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
        o["attempts"] = json!(3);
        r.record(&o);
        r.record(&outcome("b", 2, 100, 10));
        r.record(&failed("c", "invalid_request", "malformed JSON"));
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
        retried["attempts"] = json!(2);
        retried["usage"]["cached_input_tokens"] = json!(512);
        r.record(&retried);
        r.record(&failed(
            "bad-1",
            "invalid_request",
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
  routes        realtime 101
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
        o["usage"]["cached_input_tokens"] = json!(800);
        o["cost_usd"] = json!(0.00008);
        r.record(&o);
        let text = r.render();
        assert!(
            text.contains("without prompt caching: $0.000140 (caching saved $0.000060, 42.9%)"),
            "{text}"
        );
    }

    #[test]
    fn long_messages_are_cut_to_one_line() {
        assert_eq!(truncate("a\nb", 10), "a b");
        assert_eq!(truncate("abcdefghij", 6), "abc...");
    }
}
