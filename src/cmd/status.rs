//! `batchd status`: the state of a batchd deployment read from NATS alone
//! (see [`crate::client::status`]), as a table, as JSON, or refreshed live.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use chrono::{DateTime, Utc};

use crate::client::status::{self, Status, CHECKPOINTS_LISTED};
use crate::report::table::{group, section, usd, Table};

/// Arguments of `batchd status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Config file (for stream, consumer and bucket names).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NATS server URL.
    #[arg(long, env = "BATCHD_NATS_URL")]
    pub nats_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Refresh every `--interval` seconds until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with `--watch`.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
}

/// Runs `batchd status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let config = super::load_config(args.config.as_deref(), args.nats_url.as_deref())?;
    let client = crate::nats::connect(&config.nats).await?;
    loop {
        let s = status::read(&client, &config).await;
        let text = if args.json {
            serde_json::to_string(&s).context("status as JSON")?
        } else {
            render(&s)
        };
        if args.watch && !args.json {
            // Clear the screen and go home: a live view.
            print!("\x1b[2J\x1b[H");
        }
        println!("{text}");
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `at` as a time of day, and how far from `now` it is.
fn when(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (at - now).num_milliseconds() as f64 / 1000.0;
    if secs > 0.0 {
        format!("{} (in {secs:.1} s)", at.format("%H:%M:%S"))
    } else {
        format!("{} ({:.1} s ago)", at.format("%H:%M:%S"), -secs)
    }
}

/// Routes paused or down, then the replicas that publish routes.
fn routes(out: &mut String, s: &Status) {
    section(out, "Routes paused or down");
    match &s.routes {
        None => {
            let why = s.routes_error.as_deref().unwrap_or("not read");
            let _ = writeln!(out, "  unknown: {why}");
        }
        Some(_) if s.routes_down().next().is_none() => out.push_str("  none\n"),
        Some(_) => {
            let mut t =
                Table::new(&["route", "replica", "state", "reason", "until"]).text_columns(5);
            for r in s.routes_down() {
                t.row(vec![
                    r.route.clone(),
                    r.replica.clone(),
                    r.state.as_str().to_owned(),
                    r.reason.map(|c| c.as_str()).unwrap_or_default().to_owned(),
                    r.until()
                        .map_or_else(|| "probing".to_owned(), |u| when(u, s.at)),
                ]);
            }
            out.push_str(&t.render());
        }
    }
    section(out, "Replicas");
    if s.replicas.is_empty() {
        out.push_str("  none is running (no heartbeat and no route in the routes bucket)\n");
        return;
    }
    let mut t = Table::new(&[
        "replica",
        "messages held",
        "calls in flight",
        "waiting",
        "batches",
        "routes",
        "paused or down",
        "last update",
    ])
    .text_column(7);
    let count = |n: Option<usize>| n.map_or_else(|| "-".to_owned(), |n| group(n as u64));
    for r in &s.replicas {
        let h = r.holds.as_ref();
        t.row(vec![
            r.replica.clone(),
            count(h.map(|h| h.messages_held)),
            count(h.map(|h| h.calls_in_flight)),
            count(h.map(|h| h.calls_waiting)),
            count(h.map(|h| h.batches)),
            group(r.routes as u64),
            group(r.routes_down as u64),
            when(r.updated_at, s.at),
        ]);
    }
    out.push_str(&t.render());
}

/// Preempted batches waiting in the checkpoints bucket.
fn checkpoints(out: &mut String, s: &Status) {
    section(out, "Preempted batches (checkpoints)");
    let Some(c) = &s.checkpoints else {
        out.push_str("  unknown: the checkpoints bucket could not be read\n");
        return;
    };
    if c.count == 0 {
        out.push_str("  none\n");
        return;
    }
    let mut t = Table::new(&["batch", "route", "priority", "progress", "age"]);
    for e in &c.entries {
        let (route, priority, progress) = match &e.batch {
            Some(b) => (
                b.route.clone(),
                b.priority.to_string(),
                format!("{}/{} done", b.finished, b.tasks),
            ),
            None => ("?".into(), "?".into(), "unreadable".into()),
        };
        t.row(vec![
            e.key.clone(),
            route,
            priority,
            progress,
            format!("{:.1} s", e.age_secs),
        ]);
    }
    out.push_str(&t.render());
    if c.count > c.entries.len() as u64 {
        let _ = writeln!(
            out,
            "  {} in all; the {CHECKPOINTS_LISTED} oldest shown",
            group(c.count)
        );
    }
}

/// Provider batch jobs in progress, from the jobs bucket.
fn provider_jobs(out: &mut String, s: &Status) {
    section(out, "Provider batch jobs in progress");
    let Some(jobs) = &s.provider_jobs else {
        out.push_str("  unknown: the jobs bucket could not be read\n");
        return;
    };
    if jobs.is_empty() {
        out.push_str("  none\n");
        return;
    }
    let mut t = Table::new(&["job", "route", "step", "provider batch", "tasks", "age"]);
    for j in jobs {
        t.row(vec![
            j.id.clone(),
            j.route.clone(),
            j.step.clone(),
            j.provider_batch_id.clone().unwrap_or_else(|| "-".into()),
            group(j.tasks as u64),
            format!("{:.1} s", j.age_secs),
        ]);
    }
    out.push_str(&t.render());
}

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), group)
}

/// The status as tables.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "batchd status at {} from {}",
        s.at.format("%Y-%m-%d %H:%M:%S UTC"),
        s.nats_url
    );
    section(&mut out, "Queues");
    let mut t =
        Table::new(&["priority", "waiting", "in flight", "oldest age", "note"]).text_column(4);
    for p in &s.priorities {
        t.row(vec![
            format!("p{}", p.priority),
            group(p.waiting),
            group(p.in_flight),
            p.oldest_age_secs
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.1} s")),
            p.error.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&t.render());
    section(&mut out, "Streams and buckets");
    let mut t = Table::new(&["what", "count"]);
    t.row(vec![
        "dead letters, last hour".into(),
        opt(s.dead_letters_last_hour),
    ]);
    t.row(vec!["dead letters kept".into(), opt(s.dead_letters_total)]);
    t.row(vec!["outcomes kept".into(), opt(s.outcomes_total)]);
    t.row(vec![
        "tasks with attempts spent".into(),
        opt(s.tasks_with_attempts),
    ]);
    out.push_str(&t.render());
    routes(&mut out, s);
    checkpoints(&mut out, s);
    provider_jobs(&mut out, s);
    section(&mut out, "Spend today");
    match s.spend_today_usd {
        Some((exact, estimated)) => {
            let _ = writeln!(out, "  {} (+ {} estimated)", usd(exact), usd(estimated));
        }
        None => out.push_str("  unknown (the ledger bucket cannot be read)\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::status::{
        replicas, CheckpointEntry, CheckpointSummary, Checkpoints, JobSummary,
    };
    use batchd_actors::route::{CircuitReason, RouteState, RouteStatus};
    use chrono::{TimeDelta, TimeZone as _};

    fn status(routes: Vec<RouteState>, checkpoints: Vec<CheckpointEntry>) -> Status {
        Status {
            at: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
            nats_url: "nats://n:4222".into(),
            priorities: Vec::new(),
            dead_letters_last_hour: Some(0),
            dead_letters_total: Some(0),
            outcomes_total: Some(0),
            checkpoints: Some(Checkpoints {
                count: checkpoints.len() as u64,
                entries: checkpoints,
            }),
            provider_jobs: Some(vec![JobSummary {
                id: "j_01".into(),
                route: "openai/gpt-4.1-nano".into(),
                step: "created".into(),
                provider_batch_id: Some("batch_abc".into()),
                tasks: 5000,
                age_secs: 61.0,
            }]),
            tasks_with_attempts: Some(0),
            replicas: replicas(&routes, Vec::new()),
            routes: Some(routes),
            routes_error: None,
            spend_today_usd: Some((1.25, 0.0)),
        }
    }

    fn route(model: &str, circuit_in: Option<i64>) -> RouteState {
        let at = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let status = RouteStatus {
            circuit: circuit_in.map(|_| CircuitReason::Unavailable),
            circuit_until: circuit_in.map(|s| at + TimeDelta::seconds(s)),
            waiting: [0, 3, 0],
            ..RouteStatus::open(at, 4)
        };
        RouteState::new("replica-a", "openai", model, &status)
    }

    #[test]
    fn routes_down_show_with_their_replica_reason_and_until_when() {
        let text = render(&status(
            vec![route("gpt-4.1", Some(3)), route("gpt-4.1-mini", None)],
            Vec::new(),
        ));
        let line = text
            .lines()
            .find(|l| l.contains("openai/gpt-4.1 "))
            .unwrap_or_else(|| panic!("no route line in:\n{text}"));
        for part in ["replica-a", "circuit_open", "unavailable", "(in 3.0 s)"] {
            assert!(line.contains(part), "{part:?} not in {line:?}");
        }
        assert!(
            !text.contains("openai/gpt-4.1-mini"),
            "an open route is not listed:\n{text}"
        );
        assert!(
            text.contains("Replicas")
                && text
                    .lines()
                    .any(|l| l.contains("replica-a") && l.contains(" 2 ")),
            "{text}"
        );
        assert!(text.contains("Preempted batches (checkpoints)\n"), "{text}");
        let job = text
            .lines()
            .find(|l| l.contains("j_01"))
            .unwrap_or_else(|| panic!("no job line in:\n{text}"));
        for part in [
            "openai/gpt-4.1-nano",
            "created",
            "batch_abc",
            "5,000",
            "61.0 s",
        ] {
            assert!(job.contains(part), "{part:?} not in {job:?}");
        }
    }

    #[test]
    fn nothing_down_and_no_checkpoints_read_none() {
        let text = render(&status(vec![route("m", None)], Vec::new()));
        let after = |title: &str| {
            let rest = &text[text
                .find(title)
                .unwrap_or_else(|| panic!("{title}:\n{text}"))..];
            rest.lines().nth(1).unwrap_or_default().trim().to_owned()
        };
        assert_eq!(after("Routes paused or down"), "none", "{text}");
        assert_eq!(after("Preempted batches"), "none", "{text}");
        let text = render(&status(
            Vec::new(),
            vec![CheckpointEntry {
                key: "batch-01".into(),
                age_secs: 12.34,
                batch: Some(CheckpointSummary {
                    route: "openai/gpt-4.1-mini".into(),
                    priority: 3,
                    finished: 2,
                    tasks: 20,
                }),
            }],
        ));
        assert!(
            text.lines().any(|l| l.contains("batch-01")
                && l.contains("openai/gpt-4.1-mini")
                && l.contains("2/20 done")
                && l.contains("12.3 s")),
            "{text}"
        );
        assert!(text.contains("none is running (no heartbeat"), "{text}");
    }
}
