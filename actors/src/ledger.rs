//! The cost ledger as plain values: the record of one billed call, the
//! totals of one tenant's UTC day, their KV keys, the spend seen so far and
//! the clock that says which day it is. The CostAccountant moves them
//! through a [`crate::ports::LedgerStore`]; nothing here does I/O (the
//! grouped writes are in [`crate::call_sheets`]).
//!
//! How a call is counted exactly once:
//!
//! 1. Before the request goes out, the Dispatcher records it as `started`,
//!    with an estimate (every prompt token at the input rate and the whole
//!    output limit). The call id is new for every request.
//! 2. When the answer comes, it records the call again: `finished`, with
//!    the usage and the exact cost; `estimated` when no answer came in time
//!    (the provider may have billed it); `refused` when the provider did not
//!    bill it (refused, rate limited).
//! 3. Records are written in **sheets**: one KV value `sheet.<ULID>` holds
//!    every record the process had to write at that moment (calls going out
//!    together share one write), written once and never updated. Each
//!    record of a sheet carries the sheet's revision.
//! 4. The CostAccountant reads every sheet in the order the store wrote
//!    them (a watch from the start) and adds the final records to the totals
//!    of their tenant and day, `day.<YYYY-MM-DD>.<tenant>`, with one
//!    revision-checked update per key and flush. The totals remember the
//!    highest sheet revision they include (`applied_through`): a sheet seen
//!    again after a restart, or by a second accountant, is skipped.
//! 5. A `started` record with no final one after the request timeout (its
//!    writer died: a SIGKILL) is written again as `estimated` and `lapsed`,
//!    and counted at its estimate. Every accountant reads the sheets in the
//!    same order, so they agree on which came first: a lapsed record after
//!    the call's final one is ignored, and so is a final record after the
//!    call lapsed (the call stays counted at its estimate).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Datelike, Duration as Span, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::pricing::Picousd;
use crate::task::{RouteKind, ServiceTier, Usage};

/// Key prefix of call sheets (in the calls bucket).
pub const SHEET_PREFIX: &str = "sheet.";
/// Key prefix of daily totals (in the ledger bucket).
pub const DAY_PREFIX: &str = "day.";

/// A fresh call id for one provider request of a task: the task id, its
/// generation and attempt, and a ULID (so each request is a new call).
pub fn new_call_id(task_id: &str, generation: u32, attempt: u32) -> String {
    format!("{task_id}.g{generation}.a{attempt}.{}", ulid::Ulid::new())
}

/// A fresh call id for a tier classifier request made for a task: the task
/// id, its generation, `classify` and a ULID.
pub fn classifier_call_id(task_id: &str, generation: u32) -> String {
    format!("{task_id}.g{generation}.classify.{}", ulid::Ulid::new())
}

/// Where a call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// The request is going out; only the estimate is known.
    Started,
    /// The provider answered; usage and cost are exact.
    Finished,
    /// The answer was never seen (a crash, a timeout): counted at the estimate.
    Estimated,
    /// The provider refused it and did not bill it: not counted.
    Refused,
    /// Not a call: a task answered from another task's call (dedupe),
    /// counted as a shared task with what it saved, never as spend.
    Shared,
}

/// One billed (or about to be billed) provider call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The call id (the key is `call.<call_id>`).
    pub call_id: String,
    /// Where it stands.
    pub state: CallState,
    /// Its task.
    pub task_id: String,
    /// The task's tenant.
    pub tenant: String,
    /// The model called.
    pub model: String,
    /// The task's priority (1–3).
    pub priority: u8,
    /// How it was sent.
    pub route: RouteKind,
    /// The service tier asked for, then the one that served it (priced so).
    #[serde(default, skip_serializing_if = "ServiceTier::is_default")]
    pub service_tier: ServiceTier,
    /// When the request went out (ledger clock).
    pub started_at: DateTime<Utc>,
    /// The UTC day it is counted on: the day it finished, or started when
    /// its answer was never seen.
    pub day: String,
    /// The estimate made before the request.
    pub estimate_picousd: Picousd,
    /// Usage, once answered.
    #[serde(default)]
    pub usage: Usage,
    /// The cost counted: exact once finished, the estimate once estimated.
    #[serde(default)]
    pub cost_picousd: Picousd,
    /// Estimated by an accountant because its writer stopped answering.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lapsed: bool,
    /// What tiering saved on it: the same usage priced at the complex
    /// tier's model, less its cost (0 when its task named its model or got
    /// the complex tier).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tiering_saved_picousd: Picousd,
    /// A `shared` record: what the call it was answered from cost, saved.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dedupe_saved_picousd: Picousd,
}

fn is_zero(n: &Picousd) -> bool {
    *n == 0
}

impl CallRecord {
    /// A request about to go out, on `at`'s day, with its estimate.
    pub fn started(
        task_id: &str,
        call_id: String,
        tenant: &str,
        model: &str,
        priority: u8,
        at: DateTime<Utc>,
        estimate_picousd: Picousd,
    ) -> CallRecord {
        CallRecord {
            call_id,
            state: CallState::Started,
            task_id: task_id.to_owned(),
            tenant: tenant.to_owned(),
            model: model.to_owned(),
            priority,
            route: RouteKind::Realtime,
            service_tier: ServiceTier::Default,
            started_at: at,
            day: day_of(at),
            estimate_picousd,
            usage: Usage::default(),
            cost_picousd: 0,
            lapsed: false,
            tiering_saved_picousd: 0,
            dedupe_saved_picousd: 0,
        }
    }

    /// A task answered from another task's call at `at`: no spend, `saved`
    /// (what that call cost) counted as dedupe's saving.
    pub fn shared(mut self, saved: Picousd, at: DateTime<Utc>) -> CallRecord {
        self.state = CallState::Shared;
        self.usage = Usage::default();
        self.cost_picousd = 0;
        self.estimate_picousd = 0;
        self.tiering_saved_picousd = 0;
        self.dedupe_saved_picousd = saved;
        self.day = day_of(at);
        self
    }

    /// The key of the daily totals it is counted in.
    pub fn day_key(&self) -> String {
        day_key(&self.day, &self.tenant)
    }

    /// The answer came: exact usage and cost, counted on `now`'s day.
    pub fn finish(&mut self, usage: Usage, cost: Picousd, now: DateTime<Utc>) {
        self.state = CallState::Finished;
        self.usage = usage;
        self.cost_picousd = cost;
        self.day = day_of(now);
    }

    /// The answer will never be seen: counted at the estimate, on the day
    /// the request went out.
    pub fn estimate(&mut self) {
        self.state = CallState::Estimated;
        self.cost_picousd = self.estimate_picousd;
        self.day = day_of(self.started_at);
    }

    /// Its writer is gone: counted at the estimate, marked lapsed.
    pub fn lapse(&mut self) {
        self.estimate();
        self.lapsed = true;
    }

    /// True once it is to be counted.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state,
            CallState::Finished | CallState::Estimated | CallState::Shared
        )
    }
}

/// A fresh key for a call sheet.
pub fn new_sheet_key() -> String {
    format!("{SHEET_PREFIX}{}", ulid::Ulid::new())
}

/// A sheet of call records as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallSheet {
    /// The records, in the order they were written.
    pub records: Vec<CallRecord>,
    /// The sheet's revision in the store (increasing in write order).
    pub revision: u64,
}

/// The KV key of a tenant's totals for a day. The tenant is base64url
/// encoded: it may hold characters a key may not.
pub fn day_key(day: &str, tenant: &str) -> String {
    format!("{DAY_PREFIX}{day}.{}", URL_SAFE_NO_PAD.encode(tenant))
}

/// The UTC day of an instant, `YYYY-MM-DD`.
pub fn day_of(t: DateTime<Utc>) -> String {
    // Written out rather than through `format("%Y-%m-%d")`, which parses
    // its pattern on every call: this runs twice per provider call.
    format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day())
}

/// The UTC month of an instant, `YYYY-MM` (a prefix of its days).
pub fn month_of(t: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", t.year(), t.month())
}

/// The next UTC midnight after `t`.
pub fn next_day(t: DateTime<Utc>) -> DateTime<Utc> {
    let d = t.date_naive() + Span::days(1);
    Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN))
}

/// The first instant of the UTC month after `t`.
pub fn next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    let first = NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(t.date_naive());
    Utc.from_utc_datetime(&first.and_time(chrono::NaiveTime::MIN))
}

/// Calls, tokens and spend of one row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Provider calls billed.
    pub calls: u64,
    /// Prompt tokens, cached included.
    pub input_tokens: u64,
    /// Cached prompt tokens.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the cache.
    #[serde(default)]
    pub cache_write_input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Spend in pico-dollars (10⁻¹² USD).
    pub cost_picousd: Picousd,
    /// What tiering saved on these calls (see [`CallRecord`]).
    #[serde(default)]
    pub tiering_saved_picousd: Picousd,
    /// Tasks answered from another task's call (not calls).
    #[serde(default)]
    pub shared_tasks: u64,
    /// What those shared answers saved.
    #[serde(default)]
    pub dedupe_saved_picousd: Picousd,
}

impl Totals {
    /// Adds one record.
    pub fn add(&mut self, r: &CallRecord) {
        if r.state == CallState::Shared {
            self.shared_tasks += 1;
            self.dedupe_saved_picousd += r.dedupe_saved_picousd;
            return;
        }
        self.tiering_saved_picousd += r.tiering_saved_picousd;
        self.calls += 1;
        self.input_tokens += r.usage.input_tokens;
        self.cached_input_tokens += r.usage.cached_input_tokens;
        self.cache_write_input_tokens += r.usage.cache_write_input_tokens;
        self.output_tokens += r.usage.output_tokens;
        self.cost_picousd += r.cost_picousd;
    }

    /// Adds another row's totals.
    pub fn merge(&mut self, o: &Totals) {
        self.calls += o.calls;
        self.input_tokens += o.input_tokens;
        self.cached_input_tokens += o.cached_input_tokens;
        self.cache_write_input_tokens += o.cache_write_input_tokens;
        self.output_tokens += o.output_tokens;
        self.cost_picousd += o.cost_picousd;
        self.tiering_saved_picousd += o.tiering_saved_picousd;
        self.shared_tasks += o.shared_tasks;
        self.dedupe_saved_picousd += o.dedupe_saved_picousd;
    }
}

/// One row of a tenant's day: a model, priority and route, exact or estimated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The model.
    pub model: String,
    /// The priority (1–3).
    pub priority: u8,
    /// How calls were sent.
    pub route: RouteKind,
    /// True for spend of calls whose answer was never seen.
    pub estimated: bool,
    /// The totals.
    #[serde(flatten)]
    pub totals: Totals,
}

/// The value of `day.<day>.<tenant>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayTotals {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// The tenant.
    pub tenant: String,
    /// One row per model, priority, route and exactness.
    pub rows: Vec<Row>,
    /// The highest call-record revision counted here.
    pub applied_through: u64,
}

impl DayTotals {
    /// Empty totals.
    pub fn new(day: &str, tenant: &str) -> DayTotals {
        DayTotals {
            day: day.to_owned(),
            tenant: tenant.to_owned(),
            rows: Vec::new(),
            applied_through: 0,
        }
    }

    /// Adds the records not counted yet (revision above `applied_through`;
    /// the records of one sheet share its revision); `records` are in
    /// revision order. Returns the spend added.
    pub fn apply(&mut self, records: &[(CallRecord, u64)]) -> Picousd {
        let mut added = 0;
        let before = self.applied_through;
        for (r, revision) in records {
            if *revision <= before || !r.is_final() {
                continue;
            }
            let estimated = r.state == CallState::Estimated;
            let at = self.rows.iter().position(|row| {
                row.model == r.model
                    && row.priority == r.priority
                    && row.route == r.route
                    && row.estimated == estimated
            });
            let row = match at {
                Some(i) => &mut self.rows[i],
                None => {
                    self.rows.push(Row {
                        model: r.model.clone(),
                        priority: r.priority,
                        route: r.route,
                        estimated,
                        totals: Totals::default(),
                    });
                    let last = self.rows.len() - 1;
                    &mut self.rows[last]
                }
            };
            row.totals.add(r);
            added += r.cost_picousd;
            self.applied_through = *revision;
        }
        added
    }

    /// The day's spend, exact and estimated.
    pub fn spend(&self) -> Picousd {
        self.rows.iter().map(|r| r.totals.cost_picousd).sum()
    }

    /// True when the record at `revision` is counted here already.
    pub fn includes(&self, revision: u64) -> bool {
        revision <= self.applied_through
    }
}

/// Spend seen so far per tenant and day: the ledger's totals plus records
/// counted since. Budgets are checked against it before each call, once it
/// has been read from the ledger ([`Spend::loaded`]).
#[derive(Debug)]
pub struct Spend {
    days: Mutex<HashMap<String, HashMap<String, Picousd>>>,
    loaded: tokio::sync::watch::Sender<bool>,
}

impl Default for Spend {
    fn default() -> Self {
        Spend {
            days: Mutex::default(),
            loaded: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Spend {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Picousd>>> {
        self.days.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces everything (an accountant starting from the ledger); from
    /// then on [`Spend::loaded`] resolves at once.
    pub fn reset(&self, totals: impl IntoIterator<Item = (String, String, Picousd)>) {
        {
            let mut m = self.map();
            m.clear();
            for (tenant, day, amount) in totals {
                *m.entry(tenant).or_default().entry(day).or_default() += amount;
            }
        }
        self.loaded.send_replace(true);
    }

    /// Resolves once the ledger's totals have been read: a budget checked
    /// before would not see what was spent before this start.
    pub async fn loaded(&self) {
        let mut rx = self.loaded.subscribe();
        // An error means the sender is gone with the engine.
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    /// Adds spend of `tenant` on `day`.
    pub fn add(&self, tenant: &str, day: &str, amount: Picousd) {
        let mut m = self.map();
        let days = match m.get_mut(tenant) {
            Some(d) => d,
            None => m.entry(tenant.to_owned()).or_default(),
        };
        match days.get_mut(day) {
            Some(v) => *v += amount,
            None => {
                days.insert(day.to_owned(), amount);
            }
        }
    }

    /// Spend of `tenant` on `day` and in the month of `day` (its first
    /// seven characters), in pico-dollars.
    pub fn of(&self, tenant: &str, day: &str) -> (Picousd, Picousd) {
        let m = self.map();
        let Some(days) = m.get(tenant) else {
            return (0, 0);
        };
        let month = day.get(..7).unwrap_or(day);
        let today = days.get(day).copied().unwrap_or(0);
        let this_month = days
            .iter()
            .filter(|(d, _)| d.starts_with(month))
            .map(|(_, v)| *v)
            .sum();
        (today, this_month)
    }

    /// Every tenant with spend.
    pub fn tenants(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str, cost: Picousd, state: CallState) -> CallRecord {
        let at = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
        let mut r = CallRecord::started("t", id.into(), tenant, "m", 2, at, 100);
        r.state = state;
        r.usage = Usage {
            input_tokens: 10,
            cached_input_tokens: 4,
            output_tokens: 3,
            ..Usage::default()
        };
        r.cost_picousd = cost;
        r
    }

    #[test]
    fn a_record_seen_again_is_not_counted_twice() {
        let mut d = DayTotals::new("2026-12-01", "acme");
        let a = (record("a", "acme", 7, CallState::Finished), 10);
        let b = (record("b", "acme", 5, CallState::Estimated), 11);
        assert_eq!(d.apply(&[a.clone(), b.clone()]), 12);
        assert_eq!(d.apply(&[a, b]), 0, "replayed records are skipped");
        assert_eq!(d.spend(), 12);
        assert_eq!(d.rows.len(), 2, "exact and estimated rows apart");
        assert_eq!(d.applied_through, 11);
    }

    #[test]
    fn the_records_of_one_sheet_are_counted_together_and_once() {
        let mut d = DayTotals::new("2026-12-01", "acme");
        let sheet = [
            (record("a", "acme", 7, CallState::Finished), 10),
            (record("b", "acme", 5, CallState::Finished), 10),
        ];
        assert_eq!(d.apply(&sheet), 12, "both records of the sheet count");
        assert_eq!(d.apply(&sheet), 0, "the sheet seen again is skipped");
        assert_eq!(d.rows[0].totals.calls, 2);
    }

    #[test]
    fn started_and_refused_records_are_not_counted() {
        let mut d = DayTotals::new("2026-12-01", "acme");
        assert_eq!(
            d.apply(&[(record("b", "acme", 7, CallState::Refused), 2)]),
            0
        );
        assert_eq!(
            d.apply(&[(record("a", "acme", 7, CallState::Started), 3)]),
            0
        );
        assert!(d.rows.is_empty());
    }

    #[test]
    fn an_estimated_record_costs_its_estimate_on_the_day_it_started() {
        let mut r = record("a", "acme", 0, CallState::Started);
        r.day = "2026-12-02".into();
        r.estimate();
        assert_eq!(r.cost_picousd, 100);
        assert_eq!(r.day, "2026-12-01");
    }

    #[test]
    fn days_and_months_read_as_chrono_writes_them() {
        let mut t = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
        for _ in 0..400 {
            assert_eq!(day_of(t), t.format("%Y-%m-%d").to_string());
            assert_eq!(month_of(t), t.format("%Y-%m").to_string());
            t += Span::hours(77);
        }
    }

    #[test]
    fn day_keys_are_valid_kv_keys_for_any_tenant() {
        let k = day_key("2026-12-01", "acme corp/ü*>");
        assert!(k.starts_with("day.2026-12-01."));
        assert!(k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.=/".contains(&b)));
    }

    #[test]
    fn spend_adds_up_by_day_and_month() {
        let s = Spend::default();
        s.add("acme", "2026-11-30", 5);
        s.add("acme", "2026-12-01", 7);
        s.add("acme", "2026-12-02", 11);
        assert_eq!(s.of("acme", "2026-12-02"), (11, 18));
        assert_eq!(s.of("other", "2026-12-02"), (0, 0));
    }

    #[test]
    fn periods_end_at_utc_midnight_and_at_the_first_of_the_month() {
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(
            next_day(t),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            next_month(t),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        let t = Utc.with_ymd_and_hms(2026, 2, 10, 5, 0, 0).unwrap();
        assert_eq!(
            next_month(t),
            Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn a_shared_answer_counts_its_saving_and_no_call_or_spend() {
        let at = Utc::now();
        let mut call = record("c1", "acme", 5, CallState::Started);
        call.finish(Usage::default(), 5, at);
        call.tiering_saved_picousd = 7;
        let shared = CallRecord::started("t2", "c2".into(), "acme", "m", 2, at, 9).shared(5, at);
        assert!(shared.is_final());
        let mut d = DayTotals::new(&call.day, "acme");
        let added = d.apply(&[(call, 1), (shared, 2)]);
        assert_eq!(added, 5, "only the call is spend");
        let t = d.rows.iter().fold(Totals::default(), |mut t, r| {
            t.merge(&r.totals);
            t
        });
        assert_eq!((t.calls, t.cost_picousd), (1, 5));
        assert_eq!(t.tiering_saved_picousd, 7);
        assert_eq!((t.shared_tasks, t.dedupe_saved_picousd), (1, 5));
    }
}
