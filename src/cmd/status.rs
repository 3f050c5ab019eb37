//! `batchd status`: the state of a batchd deployment read from NATS alone
//! (see [`crate::client::status`]), as a table, as JSON, or refreshed live.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::client::status::{self, Status};
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
    /// A batchd `/metrics` URL, for routes paused or down (not in NATS).
    #[arg(long)]
    pub metrics_url: Option<String>,
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
        let s = status::read(&client, &config, args.metrics_url.as_deref()).await;
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
        "checkpoints (preempted batches, provider jobs)".into(),
        opt(s.checkpoints),
    ]);
    t.row(vec![
        "tasks with attempts spent".into(),
        opt(s.tasks_with_attempts),
    ]);
    out.push_str(&t.render());
    section(
        &mut out,
        &format!("Routes paused or down ({})", s.routes_note),
    );
    match &s.routes {
        Some(routes) if routes.is_empty() => out.push_str("  none\n"),
        Some(routes) => {
            let mut t = Table::new(&["provider", "model", "state", "reason"]).text_columns(4);
            for r in routes {
                t.row(vec![
                    r.provider.clone(),
                    r.model.clone(),
                    r.state.clone(),
                    r.reason.clone().unwrap_or_default(),
                ]);
            }
            out.push_str(&t.render());
        }
        None => out.push_str("  unknown\n"),
    }
    section(&mut out, "Spend today");
    match s.spend_today_usd {
        Some((exact, estimated)) => {
            let _ = writeln!(out, "  {} (+ {} estimated)", usd(exact), usd(estimated));
        }
        None => out.push_str("  unknown (the ledger bucket cannot be read)\n"),
    }
    out
}
