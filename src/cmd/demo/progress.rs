//! The demo's live progress: bars on a terminal, a line every few seconds
//! otherwise.

use std::time::Duration;

use batchd_actors::task::{Outcome, Priority};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tokio::time::Instant;

use crate::report::table::group;
use crate::report::Report;

/// How often a progress line is printed when stdout is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Live progress: bars on a terminal, a line every few seconds otherwise.
pub(super) struct Progress {
    pub(super) published: ProgressBar,
    completed: [ProgressBar; 3],
    started: Instant,
    /// Print lines instead of bars.
    plain: bool,
    last_line: Duration,
}

impl Progress {
    pub(super) fn new(
        messages: u64,
        per_priority: [u64; 3],
        terminal: bool,
        started: Instant,
    ) -> Progress {
        let target = if terminal {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        // Rate and ETA while running; the bar's message ("done in ...") after.
        let live = |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            if s.is_finished() {
                return;
            }
            let _ = write!(w, "{:>7}/s", group(s.per_sec().round() as u64));
            let len = s.len().unwrap_or(0);
            // Too early for an estimate before a twentieth is done.
            if s.pos() > 0 && s.pos() * 20 >= len && s.pos() < len {
                let _ = write!(w, "  eta {}s", s.eta().as_secs());
            }
        };
        let style = ProgressStyle::with_template(
            "{prefix:<12} {bar:30.cyan/blue} {human_pos:>7}/{human_len:<7} {live}{msg}",
        )
        .map(|s| s.with_key("live", live).progress_chars("##-"))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = |len: u64, name: &str| {
            let b = multi.add(ProgressBar::new(len));
            b.set_style(style.clone());
            b.set_prefix(name.to_owned());
            if len == 0 {
                b.finish_with_message("none");
            } else {
                b.enable_steady_tick(Duration::from_millis(200));
            }
            b
        };
        let published = bar(messages, "published");
        let completed = [
            bar(per_priority[0], "p1 premium"),
            bar(per_priority[1], "p2 standard"),
            bar(per_priority[2], "p3 bulk"),
        ];
        Progress {
            published,
            completed,
            started,
            plain: !terminal,
            last_line: Duration::ZERO,
        }
    }

    fn done_message(&self) -> String {
        format!("  done in {:.1} s", self.started.elapsed().as_secs_f64())
    }

    pub(super) fn published_all(&self) {
        self.published.finish_with_message(self.done_message());
    }

    pub(super) fn completed(&self, outcome: &Outcome) {
        let p = Priority::from_number(i64::from(outcome.priority)).unwrap_or(Priority::P3);
        let bar = &self.completed[p.index()];
        bar.inc(1);
        if bar.length().is_some_and(|len| bar.position() >= len) {
            bar.finish_with_message(self.done_message());
        }
    }

    /// Sets the outcome bars from the report (after outcomes were recorded elsewhere).
    pub(super) fn sync(&self, report: &Report) {
        for (p, n) in report.outcomes_by_priority() {
            if let Some(bar) =
                Priority::from_number(i64::from(p)).map(|p| &self.completed[p.index()])
            {
                bar.set_position(n);
                if bar.length().is_some_and(|len| n >= len) && !bar.is_finished() {
                    bar.finish_with_message(self.done_message());
                }
            }
        }
    }

    /// Prints a progress line every few seconds when there are no bars.
    pub(super) fn tick(&mut self, report: &Report) {
        let elapsed = self.started.elapsed();
        if !self.plain || elapsed < self.last_line + PLAIN_PROGRESS_EVERY {
            return;
        }
        self.last_line = elapsed;
        println!("{}", self.line(elapsed, report));
    }

    fn line(&self, elapsed: Duration, report: &Report) -> String {
        let by =
            |b: &ProgressBar| format!("{}/{}", group(b.position()), group(b.length().unwrap_or(0)));
        let total: u64 = self.completed.iter().filter_map(ProgressBar::length).sum();
        format!(
            "  [{:>5.1}s] published {}, outcomes {}/{} (p1 {}, p2 {}, p3 {})",
            elapsed.as_secs_f64(),
            by(&self.published),
            group(report.outcomes()),
            group(total),
            by(&self.completed[0]),
            by(&self.completed[1]),
            by(&self.completed[2]),
        )
    }

    /// Leaves the bars on screen: finished, or abandoned where they stopped.
    pub(super) fn finish(&self) {
        for b in std::iter::once(&self.published).chain(self.completed.iter()) {
            if !b.is_finished() {
                b.abandon();
            }
        }
        if !self.plain {
            // The cursor is left at the end of the last bar.
            println!();
        }
    }
}
