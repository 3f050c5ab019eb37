//! The closing summary of `batchd submit --wait`: what happened to the
//! lines, what they cost, and where the output is.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use batchd_actors::task::{Priority, Status};

use super::collect::Collected;
use super::lines::Line;
use crate::client::Published;
use crate::report::table::{group, usd, Table};

/// Totals for the closing table.
#[derive(Debug, Default)]
pub struct Summary {
    succeeded: usize,
    failed: usize,
    refused: usize,
    pending: usize,
    unreadable: usize,
    cost: f64,
    input_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    failures: BTreeMap<String, usize>,
    by_priority: [usize; 3],
    retried: usize,
}

impl Summary {
    /// Counts what happened to every line.
    pub fn new(lines: &[Line], slots: &[Option<Collected>]) -> Summary {
        let mut s = Summary::default();
        for (line, slot) in lines.iter().zip(slots) {
            match (line.refusal(), slot) {
                (Some(_), _) => s.refused += 1,
                (None, None) => s.pending += 1,
                (None, Some(Collected::Unreadable(_))) => s.unreadable += 1,
                (None, Some(Collected::Outcome(o))) => {
                    s.cost += o.cost_usd;
                    s.input_tokens += o.usage.input_tokens;
                    s.cached_tokens += o.usage.cached_input_tokens;
                    s.output_tokens += o.usage.output_tokens;
                    if let Some(p) = Priority::from_number(i64::from(o.priority)) {
                        s.by_priority[p.index()] += 1;
                    }
                    s.retried += usize::from(o.attempts > 1);
                    match o.status {
                        Status::Succeeded => s.succeeded += 1,
                        Status::Failed => {
                            s.failed += 1;
                            let kind = o
                                .error
                                .as_ref()
                                .map_or("failed", |e| e.kind.as_str())
                                .to_owned();
                            *s.failures.entry(kind).or_default() += 1;
                        }
                    }
                }
            }
        }
        s
    }

    /// The closing table and totals.
    pub fn render(&self, published: &Published, out: &Path) -> String {
        let total = self.succeeded + self.failed + self.refused + self.pending + self.unreadable;
        let failures: Vec<String> = self
            .failures
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let row =
            |name: &str, n: usize, detail: String| vec![name.to_owned(), group(n as u64), detail];
        let mut t = Table::new(&["outcome", "lines", "detail"]).text_column(2);
        t.row(row("succeeded", self.succeeded, String::new()));
        t.row(row("failed", self.failed, failures.join(", ")));
        if self.refused > 0 {
            t.row(row("not submitted", self.refused, "invalid_line".into()));
        }
        if self.pending > 0 {
            t.row(row("no outcome yet", self.pending, "timeout".into()));
        }
        if self.unreadable > 0 {
            t.row(row("unreadable", self.unreadable, String::new()));
        }
        t.rule();
        t.row(row("total", total, String::new()));
        let mut text = t.render();
        let _ = writeln!(
            text,
            "  cost         {}  (tokens: {} in, {} of them cached, {} out)",
            usd(self.cost),
            group(self.input_tokens),
            group(self.cached_tokens),
            group(self.output_tokens)
        );
        let [p1, p2, p3] = self.by_priority;
        let _ = writeln!(
            text,
            "  by priority  p1 {p1}, p2 {p2}, p3 {p3}; {} retried; {} already queued or done (deduplicated)",
            self.retried, published.duplicates
        );
        let _ = write!(text, "  output       {}", out.display());
        text
    }
}
