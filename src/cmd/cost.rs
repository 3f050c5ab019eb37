//! `batchd cost`: spend from the ledger (see [`crate::ledger`]) by day,
//! tenant, model, priority and route, with the cost per task and the change
//! week over week; spend of calls whose answer was never seen (in flight at
//! a crash, timed out) is shown apart, as estimated. A table or `--json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use batchd_actors::ledger::{day_of, DayTotals, Totals};
use batchd_actors::ports::LedgerStore as _;
use batchd_actors::pricing::{scale, usd as to_usd, Picousd, PriceTable};
use batchd_actors::task::{RouteKind, Usage};
use chrono::{Duration as Span, NaiveDate, Utc};
use serde::Serialize;

use crate::ledger::KvLedger;
use crate::report::table::{group, section, usd, Table};

/// Arguments of `batchd cost`.
#[derive(Debug, Clone, clap::Args)]
pub struct CostArgs {
    /// Config file (for the bucket names).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NATS server URL.
    #[arg(long, env = "BATCHD_NATS_URL")]
    pub nats_url: Option<String>,
    /// Days to show, ending today (UTC).
    #[arg(long, default_value_t = 14)]
    pub days: u32,
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One line of the report: a day, tenant, model, priority and route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostRow {
    /// UTC day.
    pub day: String,
    /// Tenant.
    pub tenant: String,
    /// Model.
    pub model: String,
    /// Priority 1–3.
    pub priority: u8,
    /// `realtime` or `batch_api`.
    pub route: String,
    /// Billed calls.
    pub calls: u64,
    /// Prompt tokens, cached included.
    pub input_tokens: u64,
    /// Cached prompt tokens.
    pub cached_input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Exact spend, USD.
    pub cost_usd: f64,
    /// Estimated spend, USD (calls whose answer was never seen).
    pub estimated_usd: f64,
    /// Exact spend in pico-dollars (10⁻¹² USD), for exact sums.
    pub cost_picousd: Picousd,
    /// Estimated spend in pico-dollars.
    pub estimated_picousd: Picousd,
    /// What tiering saved: these calls' usage at the complex tier's model,
    /// less their cost, pico-dollars.
    pub tiering_saved_picousd: Picousd,
    /// Tasks answered from another task's call (dedupe), not calls.
    pub shared_tasks: u64,
    /// What those shared answers saved, pico-dollars.
    pub dedupe_saved_picousd: Picousd,
}

/// Spend of one day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DaySpend {
    /// UTC day.
    pub day: String,
    /// Billed calls.
    pub calls: u64,
    /// Exact spend, USD.
    pub cost_usd: f64,
    /// Estimated spend, USD.
    pub estimated_usd: f64,
}

/// The last seven days against the seven before.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeekOverWeek {
    /// Spend of the seven days ending today, USD (estimated included).
    pub this_week_usd: f64,
    /// Spend of the seven days before, USD.
    pub last_week_usd: f64,
    /// Change in percent; `None` when last week spent nothing.
    pub change_pct: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostReport {
    /// First day shown.
    pub from: String,
    /// Last day shown (today, UTC).
    pub to: String,
    /// Exact spend, USD.
    pub total_usd: f64,
    /// Estimated spend, USD.
    pub estimated_usd: f64,
    /// Exact spend in pico-dollars.
    pub total_picousd: Picousd,
    /// Estimated spend in pico-dollars.
    pub estimated_picousd: Picousd,
    /// Billed calls.
    pub calls: u64,
    /// Spend (estimated included) per billed call: each task is billed once
    /// unless a crash made it call again.
    pub cost_per_task_usd: Option<f64>,
    /// Week over week.
    pub week_over_week: WeekOverWeek,
    /// Per day, oldest first.
    pub days: Vec<DaySpend>,
    /// Every row, by day, tenant, model, priority, route.
    pub rows: Vec<CostRow>,
    /// What the levers the ledger can see saved over the days shown.
    pub saved: LeverSavings,
}

/// Savings read from the ledger's own rows, at today's price table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LeverSavings {
    /// Cached prompt tokens at the input price less the cached price, USD.
    pub caching_usd: f64,
    /// The Batch API discount on the spend of batch jobs, USD.
    pub batch_api_usd: f64,
    /// Tiering: each call's usage at the complex tier's model, less its
    /// cost (recorded with the call), USD.
    pub tiering_usd: f64,
    /// Dedupe: what the calls that shared answers were answered from cost, USD.
    pub dedupe_usd: f64,
    /// Tasks answered from a shared call.
    pub shared_tasks: u64,
}

/// Runs `batchd cost`.
pub async fn run(args: CostArgs) -> anyhow::Result<()> {
    let config = super::load_config(args.config.as_deref(), args.nats_url.as_deref())?;
    let client = crate::nats::connect(&config.nats).await?;
    let js = async_nats::jetstream::new(client);
    let ledger = KvLedger::open(&js, &config)
        .await
        .context("the ledger (has batchd run against this server?)")?;
    let today = Utc::now().date_naive();
    // Week over week needs fourteen days whatever is shown.
    let all = ledger.days("").await.context("reading the ledger")?;
    let totals: Vec<DayTotals> = all
        .into_iter()
        .map(|(_, d, _)| d)
        .filter(|d| args.tenant.as_ref().is_none_or(|t| *t == d.tenant))
        .collect();
    let report = build(&totals, today, args.days.max(1), &config.prices);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("the report as JSON")?
        );
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn within(day: &str, from: NaiveDate, to: NaiveDate) -> bool {
    NaiveDate::parse_from_str(day, "%Y-%m-%d").is_ok_and(|d| d >= from && d <= to)
}

fn spend(t: &Totals) -> Picousd {
    t.cost_picousd
}

/// What the caching and Batch API levers saved on the rows shown.
fn lever_savings(rows: &[CostRow], prices: &PriceTable) -> LeverSavings {
    let (mut caching, mut batch_api): (Picousd, Picousd) = (0, 0);
    let (mut tiering, mut dedupe, mut shared) = (0, 0, 0);
    for r in rows {
        tiering += r.tiering_saved_picousd;
        dedupe += r.dedupe_saved_picousd;
        shared += r.shared_tasks;
        let route = if r.route == RouteKind::BatchApi.as_str() {
            RouteKind::BatchApi
        } else {
            RouteKind::Realtime
        };
        let usage = Usage {
            input_tokens: r.input_tokens,
            cached_input_tokens: r.cached_input_tokens,
            ..Usage::default()
        };
        caching += prices.cache_saving_picousd(&r.model, &usage, route);
        if route == RouteKind::BatchApi && prices.batch_discount < 1.0 {
            // Spend at (1 - d) of list price: the discount is d / (1 - d) of it.
            let d = prices.batch_discount;
            batch_api += scale(r.cost_picousd + r.estimated_picousd, d / (1.0 - d));
        }
    }
    LeverSavings {
        caching_usd: to_usd(caching),
        batch_api_usd: to_usd(batch_api),
        tiering_usd: to_usd(tiering),
        dedupe_usd: to_usd(dedupe),
        shared_tasks: shared,
    }
}

/// Builds the report of `days` days ending `today` from the daily totals,
/// savings priced with `prices`.
pub fn build(totals: &[DayTotals], today: NaiveDate, days: u32, prices: &PriceTable) -> CostReport {
    let from = today - Span::days(i64::from(days) - 1);
    let mut rows: BTreeMap<(String, String, String, u8, String), CostRow> = BTreeMap::new();
    let (mut this_week, mut last_week) = (0u64, 0u64);
    for d in totals {
        let week_spend: Picousd = d.rows.iter().map(|r| spend(&r.totals)).sum();
        if within(&d.day, today - Span::days(6), today) {
            this_week += week_spend;
        } else if within(&d.day, today - Span::days(13), today - Span::days(7)) {
            last_week += week_spend;
        }
        if !within(&d.day, from, today) {
            continue;
        }
        for r in &d.rows {
            let route = r.route.as_str().to_owned();
            let key = (
                d.day.clone(),
                d.tenant.clone(),
                r.model.clone(),
                r.priority,
                route.clone(),
            );
            let row = rows.entry(key).or_insert_with(|| CostRow {
                day: d.day.clone(),
                tenant: d.tenant.clone(),
                model: r.model.clone(),
                priority: r.priority,
                route,
                calls: 0,
                input_tokens: 0,
                cached_input_tokens: 0,
                output_tokens: 0,
                cost_usd: 0.0,
                estimated_usd: 0.0,
                cost_picousd: 0,
                estimated_picousd: 0,
                tiering_saved_picousd: 0,
                shared_tasks: 0,
                dedupe_saved_picousd: 0,
            });
            row.calls += r.totals.calls;
            row.input_tokens += r.totals.input_tokens;
            row.cached_input_tokens += r.totals.cached_input_tokens;
            row.output_tokens += r.totals.output_tokens;
            row.tiering_saved_picousd += r.totals.tiering_saved_picousd;
            row.shared_tasks += r.totals.shared_tasks;
            row.dedupe_saved_picousd += r.totals.dedupe_saved_picousd;
            if r.estimated {
                row.estimated_picousd += r.totals.cost_picousd;
            } else {
                row.cost_picousd += r.totals.cost_picousd;
            }
            row.cost_usd = to_usd(row.cost_picousd);
            row.estimated_usd = to_usd(row.estimated_picousd);
        }
    }
    let rows: Vec<CostRow> = rows.into_values().collect();
    let mut by_day: BTreeMap<String, (u64, Picousd, Picousd)> = BTreeMap::new();
    for r in &rows {
        let e = by_day.entry(r.day.clone()).or_default();
        e.0 += r.calls;
        e.1 += r.cost_picousd;
        e.2 += r.estimated_picousd;
    }
    let total: Picousd = rows.iter().map(|r| r.cost_picousd).sum();
    let estimated: Picousd = rows.iter().map(|r| r.estimated_picousd).sum();
    let calls: u64 = rows.iter().map(|r| r.calls).sum();
    let saved = lever_savings(&rows, prices);
    CostReport {
        from: from.format("%Y-%m-%d").to_string(),
        to: day_of(today.and_time(chrono::NaiveTime::MIN).and_utc()),
        total_usd: to_usd(total),
        estimated_usd: to_usd(estimated),
        total_picousd: total,
        estimated_picousd: estimated,
        calls,
        cost_per_task_usd: (calls > 0).then(|| to_usd(total + estimated) / calls as f64),
        week_over_week: WeekOverWeek {
            this_week_usd: to_usd(this_week),
            last_week_usd: to_usd(last_week),
            change_pct: (last_week > 0)
                .then(|| (this_week as f64 - last_week as f64) / last_week as f64 * 100.0),
        },
        days: by_day
            .into_iter()
            .map(|(day, (calls, c, e))| DaySpend {
                day,
                calls,
                cost_usd: to_usd(c),
                estimated_usd: to_usd(e),
            })
            .collect(),
        rows,
        saved,
    }
}

/// The report as tables.
pub fn render(r: &CostReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "batchd spend from {} to {} (UTC)", r.from, r.to);
    section(&mut out, "Total");
    let mut t = Table::new(&["what", "value"]);
    t.row(vec!["spend (exact)".into(), usd(r.total_usd)]);
    t.row(vec![
        "spend (estimated: calls in flight at a crash or timed out)".into(),
        usd(r.estimated_usd),
    ]);
    t.row(vec!["billed calls".into(), group(r.calls)]);
    t.row(vec![
        "cost per task".into(),
        r.cost_per_task_usd.map_or_else(|| "-".into(), usd),
    ]);
    let w = &r.week_over_week;
    t.row(vec![
        "last 7 days / the 7 before".into(),
        format!("{} / {}", usd(w.this_week_usd), usd(w.last_week_usd)),
    ]);
    t.row(vec![
        "week over week".into(),
        w.change_pct
            .map_or_else(|| "-".into(), |p| format!("{p:+.1}%")),
    ]);
    out.push_str(&t.render());
    section(&mut out, "Saved by levers (from the ledger)");
    let mut t = Table::new(&["lever", "saved"]);
    t.row(vec![
        "prompt caching (cached tokens at input less cached price)".into(),
        usd(r.saved.caching_usd),
    ]);
    t.row(vec![
        "Batch API (the discount on batch job spend)".into(),
        usd(r.saved.batch_api_usd),
    ]);
    t.row(vec![
        "tiering (each call's tokens at the complex tier's model, less its cost)".into(),
        usd(r.saved.tiering_usd),
    ]);
    t.row(vec![
        format!(
            "dedupe ({} tasks answered from a shared call)",
            group(r.saved.shared_tasks)
        ),
        usd(r.saved.dedupe_usd),
    ]);
    out.push_str(&t.render());
    section(&mut out, "By day");
    let mut t = Table::new(&["day", "calls", "spend", "estimated"]).text_column(0);
    for d in &r.days {
        t.row(vec![
            d.day.clone(),
            group(d.calls),
            usd(d.cost_usd),
            usd(d.estimated_usd),
        ]);
    }
    out.push_str(&t.render());
    section(&mut out, "By day, tenant, model, priority and route");
    let mut t = Table::new(&[
        "day",
        "tenant",
        "model",
        "priority",
        "route",
        "calls",
        "input",
        "cached",
        "output",
        "spend",
        "estimated",
        "per task",
    ])
    .text_columns(5);
    for row in &r.rows {
        let per_task = (row.calls > 0)
            .then(|| to_usd(row.cost_picousd + row.estimated_picousd) / row.calls as f64);
        t.row(vec![
            row.day.clone(),
            row.tenant.clone(),
            row.model.clone(),
            format!("p{}", row.priority),
            row.route.clone(),
            group(row.calls),
            group(row.input_tokens),
            group(row.cached_input_tokens),
            group(row.output_tokens),
            usd(row.cost_usd),
            usd(row.estimated_usd),
            per_task.map_or_else(|| "-".into(), usd),
        ]);
    }
    out.push_str(&t.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchd_actors::ledger::Row;

    fn prices() -> PriceTable {
        toml::from_str(
            "as_of = \"2026-01-01\"\n[models.m]\ninput = 2.0\ncached_input = 0.5\noutput = 8.0\n",
        )
        .expect("a price table")
    }

    fn day(day: &str, tenant: &str, cost: Picousd, estimated: bool) -> DayTotals {
        DayTotals {
            day: day.into(),
            tenant: tenant.into(),
            rows: vec![Row {
                model: "m".into(),
                priority: 2,
                route: RouteKind::Realtime,
                estimated,
                totals: Totals {
                    calls: 2,
                    cost_picousd: cost,
                    ..Totals::default()
                },
            }],
            applied_through: 1,
        }
    }

    #[test]
    fn estimated_spend_is_apart_and_weeks_are_compared() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 14).unwrap();
        let totals = [
            day("2026-12-14", "acme", 3_000_000_000_000, false),
            day("2026-12-14", "acme", 1_000_000_000_000, true),
            day("2026-12-05", "acme", 2_000_000_000_000, false),
            day("2026-11-01", "acme", 9_000_000_000_000, false),
        ];
        let r = build(&totals, today, 14, &prices());
        assert_eq!(r.total_usd, 5.0);
        assert_eq!(r.estimated_usd, 1.0);
        assert_eq!(r.calls, 6);
        assert_eq!(
            r.rows.len(),
            2,
            "one row per day: exact and estimated merged"
        );
        assert_eq!(r.week_over_week.this_week_usd, 4.0);
        assert_eq!(r.week_over_week.last_week_usd, 2.0);
        assert_eq!(r.week_over_week.change_pct, Some(100.0));
        assert_eq!(r.cost_per_task_usd, Some(1.0));
        let text = render(&r);
        assert!(text.contains("+100.0%"), "{text}");
    }

    #[test]
    fn caching_and_batch_api_savings_are_read_from_the_ledger_rows() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 14).unwrap();
        let mut realtime = day("2026-12-14", "acme", 1_000_000_000_000, false);
        realtime.rows[0].totals.input_tokens = 3_000_000;
        realtime.rows[0].totals.cached_input_tokens = 2_000_000;
        let mut batch = day("2026-12-14", "beta", 4_000_000_000_000, false);
        batch.rows[0].route = RouteKind::BatchApi;
        let r = build(&[realtime, batch], today, 14, &prices());
        // 2M cached tokens at 2.0 - 0.5 USD per million.
        assert_eq!(r.saved.caching_usd, 3.0);
        // 4 USD at half price: 4 USD off.
        assert_eq!(r.saved.batch_api_usd, 4.0);
        let text = render(&r);
        assert!(text.contains("prompt caching"), "{text}");
    }

    #[test]
    fn tiering_and_dedupe_savings_are_summed_from_the_ledger_rows() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 14).unwrap();
        let mut a = day("2026-12-14", "acme", 1_000_000_000_000, false);
        a.rows[0].totals.tiering_saved_picousd = 3_000_000_000_000;
        a.rows[0].totals.shared_tasks = 2;
        a.rows[0].totals.dedupe_saved_picousd = 500_000_000_000;
        let mut b = day("2026-12-13", "beta", 1_000_000_000_000, false);
        b.rows[0].totals.tiering_saved_picousd = 1_000_000_000_000;
        b.rows[0].totals.shared_tasks = 1;
        b.rows[0].totals.dedupe_saved_picousd = 250_000_000_000;
        let r = build(&[a, b], today, 14, &prices());
        assert_eq!(r.saved.tiering_usd, 4.0);
        assert_eq!(r.saved.dedupe_usd, 0.75);
        assert_eq!(r.saved.shared_tasks, 3);
        assert_eq!(r.calls, 4, "shared answers are not calls");
        let text = render(&r);
        assert!(
            text.contains("dedupe (3 tasks answered from a shared call)"),
            "{text}"
        );
    }
}
