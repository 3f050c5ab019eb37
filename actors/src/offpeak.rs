//! Off-peak windows: work of the priorities listed (bulk, `p3`, by default
//! none until windows are configured) is released only inside daily UTC
//! windows, for providers that price it lower then. Plain data and
//! functions; the Intake applies [`OffPeak::release`] to each task it takes
//! in.
//!
//! Outside a window a task stays in JetStream: the Intake hands it back with
//! a nak delayed until the next window opens, so it holds a place in its
//! consumer's `max_ack_pending` at the server and none in batchd's memory;
//! once that many wait, the server delivers no more of that priority. A
//! task whose `deadline` would be missed by waiting (it falls before the
//! next opening plus `release_margin`) is released at once, at the normal
//! price.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};

use crate::task::Priority;

const DAY_SECS: u32 = 86_400;

/// One daily window in UTC, `[start, end)`; it may wrap midnight
/// (`22:00-02:00`). `00:00-24:00` is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

/// A window that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a UTC window HH:MM-HH:MM (00:00 to 24:00, start and end differ)")]
pub struct BadWindow(pub String);

fn seconds_of_day(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 3600 + m * 60)
}

impl FromStr for Window {
    type Err = BadWindow;

    fn from_str(s: &str) -> Result<Window, BadWindow> {
        let bad = || BadWindow(s.to_owned());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let start = seconds_of_day(a)
            .filter(|s| *s < DAY_SECS)
            .ok_or_else(bad)?;
        let end = seconds_of_day(b).ok_or_else(bad)?;
        if start == end % DAY_SECS && end != DAY_SECS {
            return Err(bad());
        }
        Ok(Window { start, end })
    }
}

impl Window {
    /// True when `now` is inside the window.
    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        let s = now.num_seconds_from_midnight();
        if self.start < self.end {
            self.start <= s && s < self.end
        } else {
            s >= self.start || s < self.end
        }
    }

    /// The next time the window opens after `now` (not counting an opening
    /// at `now` itself).
    fn next_start(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let s = now.num_seconds_from_midnight();
        let wait = (self.start + DAY_SECS - s) % DAY_SECS;
        let wait = if wait == 0 { DAY_SECS } else { wait };
        let at = now + chrono::Duration::seconds(i64::from(wait));
        at.with_nanosecond(0).unwrap_or(at)
    }
}

/// What the Intake does with one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Release {
    /// Send it now. `price_multiplier` applies to its cost (1.0 outside
    /// off-peak work).
    Now {
        /// Multiplier on the computed cost.
        price_multiplier: f64,
    },
    /// Its window is closed but its deadline can't wait: send it now at the
    /// normal price.
    Urgent,
    /// Hand it back to JetStream for this long: the window opens then.
    Hold(Duration),
}

/// The off-peak settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OffPeak {
    /// Daily UTC windows; none means the feature is off.
    pub windows: Vec<Window>,
    /// Priorities released only inside a window, by [`Priority::index`].
    pub priorities: [bool; 3],
    /// Multiplier on the cost of tasks released inside a window.
    pub price_multiplier: f64,
    /// Time kept in hand before a deadline: a task whose deadline falls
    /// before the next opening plus this is released at once.
    pub release_margin: Duration,
}

impl Default for OffPeak {
    fn default() -> OffPeak {
        OffPeak {
            windows: Vec::new(),
            priorities: [false, false, true],
            price_multiplier: 1.0,
            release_margin: Duration::from_secs(900),
        }
    }
}

impl OffPeak {
    /// True when priority `p`'s work waits for a window.
    pub fn applies(&self, p: Priority) -> bool {
        !self.windows.is_empty() && self.priorities[p.index()]
    }

    /// True when some window contains `now`.
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        self.windows.iter().any(|w| w.contains(now))
    }

    /// When the next window opens (`now` when one is open), `None` without windows.
    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_open(now) {
            return Some(now);
        }
        self.windows.iter().map(|w| w.next_start(now)).min()
    }

    /// What to do with a task of priority `p` with `deadline`, at `now`.
    pub fn release(
        &self,
        p: Priority,
        deadline: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Release {
        if !self.applies(p) {
            return Release::Now {
                price_multiplier: 1.0,
            };
        }
        let Some(open) = self.next_open(now).filter(|open| *open > now) else {
            return Release::Now {
                price_multiplier: self.price_multiplier,
            };
        };
        let margin = chrono::Duration::from_std(self.release_margin).unwrap_or_default();
        if deadline.is_some_and(|dl| dl < open + margin) {
            return Release::Urgent;
        }
        Release::Hold((open - now).to_std().unwrap_or(Duration::ZERO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn night() -> OffPeak {
        OffPeak {
            windows: vec!["00:00-06:00".parse().unwrap()],
            price_multiplier: 0.5,
            ..OffPeak::default()
        }
    }

    #[test]
    fn windows_parse_and_bad_ones_are_refused() {
        assert!("00:00-06:00".parse::<Window>().is_ok());
        assert!("22:30-02:00".parse::<Window>().is_ok());
        assert!("00:00-24:00".parse::<Window>().is_ok());
        for bad in [
            "",
            "0-6",
            "06:00",
            "25:00-01:00",
            "01:60-02:00",
            "03:00-03:00",
            "24:00-01:00",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_window_contains_its_start_not_its_end_and_may_wrap_midnight() {
        let w: Window = "00:00-06:00".parse().unwrap();
        assert!(w.contains(at("2026-03-01T00:00:00Z")));
        assert!(w.contains(at("2026-03-01T05:59:59Z")));
        assert!(!w.contains(at("2026-03-01T06:00:00Z")));
        let wrap: Window = "22:00-02:00".parse().unwrap();
        assert!(wrap.contains(at("2026-03-01T23:00:00Z")));
        assert!(wrap.contains(at("2026-03-01T01:00:00Z")));
        assert!(!wrap.contains(at("2026-03-01T12:00:00Z")));
        let all: Window = "00:00-24:00".parse().unwrap();
        assert!(all.contains(at("2026-03-01T23:59:59Z")));
    }

    #[test]
    fn the_next_opening_is_today_or_tomorrow() {
        let o = night();
        assert_eq!(
            o.next_open(at("2026-03-01T07:00:00Z")),
            Some(at("2026-03-02T00:00:00Z"))
        );
        let now = at("2026-03-01T03:00:00Z");
        assert_eq!(o.next_open(now), Some(now));
        let two = OffPeak {
            windows: vec![
                "00:00-06:00".parse().unwrap(),
                "12:00-13:00".parse().unwrap(),
            ],
            ..OffPeak::default()
        };
        assert_eq!(
            two.next_open(at("2026-03-01T07:30:00Z")),
            Some(at("2026-03-01T12:00:00Z"))
        );
    }

    #[test]
    fn bulk_work_waits_for_the_window_and_other_priorities_do_not() {
        let o = night();
        let noon = at("2026-03-01T12:00:00Z");
        assert_eq!(
            o.release(Priority::P3, None, noon),
            Release::Hold(Duration::from_secs(12 * 3600))
        );
        assert_eq!(
            o.release(Priority::P2, None, noon),
            Release::Now {
                price_multiplier: 1.0
            }
        );
        assert_eq!(
            o.release(Priority::P3, None, at("2026-03-01T01:00:00Z")),
            Release::Now {
                price_multiplier: 0.5
            }
        );
    }

    #[test]
    fn a_deadline_before_the_window_releases_the_task_at_once() {
        let o = night();
        let noon = at("2026-03-01T12:00:00Z");
        let before = Some(at("2026-03-01T20:00:00Z"));
        assert_eq!(o.release(Priority::P3, before, noon), Release::Urgent);
        // Inside the margin after the opening: it could not finish in time.
        let just_after = Some(at("2026-03-02T00:10:00Z"));
        assert_eq!(o.release(Priority::P3, just_after, noon), Release::Urgent);
        let later = Some(at("2026-03-02T03:00:00Z"));
        assert!(matches!(
            o.release(Priority::P3, later, noon),
            Release::Hold(_)
        ));
    }

    #[test]
    fn without_windows_nothing_waits() {
        let o = OffPeak::default();
        assert_eq!(
            o.release(Priority::P3, None, at("2026-03-01T12:00:00Z")),
            Release::Now {
                price_multiplier: 1.0
            }
        );
    }
}
