//! `batchd dlq`: list, show, replay and purge dead letters, over
//! [`crate::client::DeadLetters`]. Each subcommand reads what it selects,
//! acts on it (or, with `--dry-run`, only says what it would do) and prints
//! one line per task. PROTOCOL.md, "Dead letters and replays", is the rule
//! a replay follows.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use batchd_actors::task::{DeadLetter, ErrorKind, Outcome, Priority};
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use crate::client::dead_letters::{age, plan_replay, priority_of, Filter, Listed};
use crate::client::{Ack, DeadLetters};
use crate::report::table::{truncate, Table};

/// Characters of the error message shown in a `dlq ls` table.
const MESSAGE_WIDTH: usize = 60;

/// Arguments of `batchd dlq`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_long_help = DLQ_HELP)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
    /// Config file (subject prefix, stream and bucket names, NATS URL)
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// NATS server URL
    #[arg(long, env = "BATCHD_NATS_URL", global = true)]
    pub nats_url: Option<String>,
}

/// The subcommands of `batchd dlq`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first
    Ls(LsArgs),
    /// Show one dead letter, the kept outcome of its task and the original task
    Show(ShowArgs),
    /// Publish dead-lettered tasks again, as a new generation
    Replay(ReplayArgs),
    /// Delete dead letters
    Purge(PurgeArgs),
}

/// Arguments of `batchd dlq ls`.
#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    /// Only this error kind (invalid_request, max_retries, budget_exceeded, expired, provider_rejected, cancelled)
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<ErrorKind>,
    /// Only tasks that arrived on this priority (1, 2 or 3)
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub priority: Option<u8>,
    /// Only dead letters at least this old (e.g. 90s, 15m, 2h, 3d)
    #[arg(long, value_name = "DUR", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// Only dead letters at most this old (e.g. 90s, 15m, 2h, 3d)
    #[arg(long, value_name = "DUR", value_parser = parse_age)]
    pub newer_than: Option<Duration>,
    /// Show at most this many
    #[arg(long)]
    pub limit: Option<usize>,
    /// One JSON object per line instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `batchd dlq show`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    /// The task id
    pub id: String,
    /// One JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Which dead letters `replay` and `purge` act on: ids, a kind, or all.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "which", required = true, multiple = false)]
pub struct Selection {
    /// Task ids
    #[arg(group = "which")]
    pub ids: Vec<String>,
    /// Every dead letter of this error kind
    #[arg(long, group = "which", value_parser = parse_kind)]
    pub kind: Option<ErrorKind>,
    /// Every dead letter
    #[arg(long, group = "which")]
    pub all: bool,
}

/// Arguments of `batchd dlq replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub which: Selection,
    /// Say what would be replayed or refused; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// Arguments of `batchd dlq purge`.
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub which: Selection,
    /// Say what would be deleted; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

const DLQ_HELP: &str = "\
A dead letter is the last message on <prefix>.dlq.<id>; the kept outcome of a
task is the last message on <prefix>.results.<id>.

replay publishes the original task (from the dead letter, in its encoding) to
the priority subject it arrived on, as generation N = the kept outcome's
generation + 1, with the headers Batchd-Generation: N and Nats-Msg-Id:
<id>:g<N>; once the PubAck is in, it clears the task's attempts and deletes
the dead letter. The engine then runs the task again and its new outcome
replaces the failed one. Refused, with a line saying why: a task whose kept
outcome succeeded (a succeeded task is never replayed), an id without a dead
letter, and a dead letter without a readable task (an unreadable body, id
invalid~p<N>~<seq>~<ms>: purge those).

The exit status is non-zero when an id named on the command line was refused
or missing, or when anything failed; refusals among --kind or --all are
reported and do not change it.";

/// Runs `batchd dlq`.
pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let config = super::load_config(args.config.as_deref(), args.nats_url.as_deref())?;
    let client = crate::nats::connect(&config.nats).await?;
    let js = jetstream::new(client.clone());
    let dl = DeadLetters::open(&js, &config.nats)
        .await
        .with_context(|| {
            format!(
                "the streams are not on {}: start the engine (`batchd run`) once, it creates them",
                config.nats.url
            )
        })?;
    let result = match args.command {
        DlqCommand::Ls(a) => ls(&dl, a).await,
        DlqCommand::Show(a) => show(&dl, a).await,
        DlqCommand::Replay(a) => replay(&dl, a).await,
        DlqCommand::Purge(a) => purge(&dl, a).await,
    };
    let _ = client.flush().await;
    result
}

/// One line of `dlq ls --json`: the dead letter with its id, priority and age.
#[derive(Serialize)]
struct LsLine<'a> {
    id: &'a str,
    priority: Option<u8>,
    age_secs: Option<f64>,
    #[serde(flatten)]
    letter: &'a DeadLetter,
}

async fn ls(dl: &DeadLetters, a: LsArgs) -> anyhow::Result<()> {
    let filter = Filter {
        kind: a.kind,
        priority: a.priority.and_then(|p| Priority::from_number(i64::from(p))),
        older_than: a.older_than,
        newer_than: a.newer_than,
    };
    let now = Utc::now();
    let listed = readable(dl.list().await?);
    let selected: Vec<&(String, DeadLetter)> = listed
        .iter()
        .filter(|(_, l)| filter.matches(l, now))
        .collect();
    let shown = &selected[..a.limit.unwrap_or(usize::MAX).min(selected.len())];
    if a.json {
        for (id, letter) in shown {
            let line = LsLine {
                id,
                priority: priority_of(&letter.subject).map(Priority::number),
                age_secs: age(letter, now).map(|d| d.as_secs_f64()),
                letter,
            };
            println!("{}", serde_json::to_string(&line)?);
        }
        return Ok(());
    }
    if selected.is_empty() {
        println!("no dead letters match");
        return Ok(());
    }
    let mut table = Table::new(&["ID", "KIND", "PRIORITY", "ATTEMPTS", "AGE", "MESSAGE"])
        .text_columns(2)
        .text_column(5);
    for (id, letter) in shown {
        table.row(vec![
            id.clone(),
            letter.error.kind.as_str().to_owned(),
            priority_of(&letter.subject).map_or("-".into(), |p| p.number().to_string()),
            letter.attempts.to_string(),
            age(letter, now).map_or("-".into(), short_age),
            truncate(&letter.error.message, MESSAGE_WIDTH),
        ]);
    }
    print!("{}", table.render());
    if shown.len() < selected.len() {
        println!(
            "({} of {} shown; raise --limit for more)",
            shown.len(),
            selected.len()
        );
    }
    Ok(())
}

/// The dead letters that decode; the others are named on stderr.
fn readable(listed: Vec<Listed>) -> Vec<(String, DeadLetter)> {
    listed
        .into_iter()
        .filter_map(|l| match l.letter {
            Ok(letter) => Some((l.id, letter)),
            Err(e) => {
                eprintln!(
                    "batchd: the dead letter of {} could not be decoded ({e}); `batchd dlq purge {}` removes it",
                    l.id, l.id
                );
                None
            }
        })
        .collect()
}

/// `dlq show --json`.
#[derive(Serialize)]
struct ShowJson<'a> {
    id: &'a str,
    dead_letter: &'a DeadLetter,
    kept_outcome: Option<&'a Outcome>,
    replay: Value,
}

async fn show(dl: &DeadLetters, a: ShowArgs) -> anyhow::Result<()> {
    let id = a.id.as_str();
    let stored = dl.dead_letter(id).await?;
    let Some(stored) = stored else {
        bail!(
            "no dead letter for {id} (nothing on {})",
            dl.subjects().dead_letter(id)
        );
    };
    let letter = stored
        .letter
        .clone()
        .map_err(|e| anyhow::anyhow!("the dead letter of {id} could not be decoded: {e}"))?;
    let kept = dl.kept_outcome(id).await?;
    let outcome = kept.as_ref().and_then(|k| k.as_ref().ok());
    let plan = plan_replay(id, dl.subjects(), Some(stored), outcome);
    let replay = match &plan {
        Ok(p) => serde_json::json!({"generation": p.generation, "subject": p.message.subject}),
        Err(r) => serde_json::json!({"refused": r.to_string()}),
    };
    if a.json {
        let out = ShowJson {
            id,
            dead_letter: &letter,
            kept_outcome: outcome,
            replay,
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let now = Utc::now();
    let field = |name: &str, value: &str| println!("{name:<14}{value}");
    field("id", id);
    field("kind", letter.error.kind.as_str());
    field("message", &letter.error.message);
    if let Some(code) = letter.error.status_code {
        field("status code", &code.to_string());
    }
    field("attempts", &letter.attempts.to_string());
    field(
        "dead at",
        &format!(
            "{} ({} ago)",
            letter.dead_at,
            age(&letter, now).map_or("?".into(), short_age)
        ),
    );
    field("arrived on", &letter.subject);
    let kept_line = match &kept {
        None => "none".to_owned(),
        Some(Err(e)) => format!("unreadable ({e})"),
        Some(Ok(o)) => format!(
            "{}, generation {}, completed {}",
            o.status.as_str(),
            o.generation,
            o.completed_at
        ),
    };
    field("kept outcome", &kept_line);
    let replay_line = match &plan {
        Ok(p) => format!("as generation {} on {}", p.generation, p.message.subject),
        Err(r) => format!("refused: {r}"),
    };
    field("replay", &replay_line);
    println!("task");
    if letter.task.is_null() {
        println!(
            "  unreadable; raw bytes (base64): {}",
            letter.raw_base64.as_deref().unwrap_or("-")
        );
    } else {
        for line in serde_json::to_string_pretty(&letter.task)?.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

/// The ids a selection names, in order, and whether they were named one by one.
async fn select(dl: &DeadLetters, which: &Selection) -> anyhow::Result<(Vec<String>, bool)> {
    if !which.ids.is_empty() {
        let mut seen = HashSet::new();
        let ids = which
            .ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .cloned()
            .collect();
        return Ok((ids, true));
    }
    let filter = Filter {
        kind: which.kind,
        ..Filter::default()
    };
    let now = Utc::now();
    let ids = dl
        .list()
        .await?
        .into_iter()
        .filter(|l| match &l.letter {
            Ok(letter) => filter.matches(letter, now),
            Err(_) => which.all,
        })
        .map(|l| l.id)
        .collect();
    Ok((ids, false))
}

/// [`select`], or `None` after saying so when nothing matches.
async fn select_some(
    dl: &DeadLetters,
    which: &Selection,
) -> anyhow::Result<Option<(Vec<String>, bool)>> {
    let (ids, named) = select(dl, which).await?;
    if ids.is_empty() {
        println!("no dead letters match");
        return Ok(None);
    }
    Ok(Some((ids, named)))
}

/// What a bulk command did, for its last line and its exit status.
#[derive(Default)]
struct Tally {
    done: usize,
    refused: usize,
    failed: usize,
}

impl Tally {
    /// Prints `line` for a task the command acted on.
    fn done(&mut self, line: String) {
        println!("{line}");
        self.done += 1;
    }

    /// Prints `line` for a task the command would not act on.
    fn refused(&mut self, line: String) {
        println!("{line}");
        self.refused += 1;
    }

    /// Reports `error` on stderr for a task the command could not act on.
    fn failed(&mut self, error: String) {
        eprintln!("batchd: {error}");
        self.failed += 1;
    }

    fn finish(&self, verb: &str, refusal: &str, dry_run: bool, named: bool) -> anyhow::Result<()> {
        let would = if dry_run { "would be " } else { "" };
        println!(
            "{} {would}{verb}, {} {would}{refusal}{}",
            self.done,
            self.refused,
            if self.failed > 0 {
                format!(", {} failed", self.failed)
            } else {
                String::new()
            }
        );
        if self.failed > 0 {
            bail!("{} of the selected dead letters failed", self.failed);
        }
        if named && self.refused > 0 {
            bail!("{} of the named tasks {refusal}", self.refused);
        }
        Ok(())
    }
}

async fn replay(dl: &DeadLetters, a: ReplayArgs) -> anyhow::Result<()> {
    let Some((ids, named)) = select_some(dl, &a.which).await? else {
        return Ok(());
    };
    let mut tally = Tally::default();
    for id in &ids {
        let plan = match dl.plan_replay(id).await {
            Ok(Ok(plan)) => plan,
            Ok(Err(refusal)) => {
                tally.refused(format!("refused {id}: {refusal}"));
                continue;
            }
            Err(e) => {
                tally.failed(format!("{id}: {e}"));
                continue;
            }
        };
        let what = format!(
            "{id} as generation {} on {}",
            plan.generation, plan.message.subject
        );
        if a.dry_run {
            tally.done(format!("would replay {what}"));
            continue;
        }
        match dl.replay(&plan).await {
            Ok(Ack::Stored) => tally.done(format!("replayed {what}")),
            Ok(Ack::Duplicate) => tally.done(format!(
                "replayed {what} (already published: JetStream kept the first copy)"
            )),
            Err(e) => tally.failed(format!("replaying {id}: {e}")),
        }
    }
    tally.finish("replayed", "refused", a.dry_run, named)
}

async fn purge(dl: &DeadLetters, a: PurgeArgs) -> anyhow::Result<()> {
    if a.which.all && !a.dry_run {
        let n = dl.purge_all().await?;
        println!(
            "purged {n} dead letter message{}",
            if n == 1 { "" } else { "s" }
        );
        return Ok(());
    }
    let Some((ids, named)) = select_some(dl, &a.which).await? else {
        return Ok(());
    };
    let mut tally = Tally::default();
    for id in &ids {
        let result = if a.dry_run {
            dl.dead_letter(id).await.map(|d| u64::from(d.is_some()))
        } else {
            dl.purge(id).await
        };
        match result {
            Ok(0) => tally.refused(format!("no dead letter for {id}")),
            Ok(_) if a.dry_run => tally.done(format!("would purge {id}")),
            Ok(_) => tally.done(format!("purged {id}")),
            Err(e) => tally.failed(format!("purging {id}: {e}")),
        }
    }
    tally.finish("purged", "missing", a.dry_run, named)
}

/// An error kind by its wire name.
fn parse_kind(s: &str) -> Result<ErrorKind, String> {
    serde_json::from_value(Value::String(s.trim().to_owned())).map_err(|_| {
        format!(
            "unknown error kind '{s}'; expected one of invalid_request, max_retries, \
             budget_exceeded, expired, provider_rejected, cancelled"
        )
    })
}

/// An age: `<N>d` (days) optionally followed by a Go-style duration
/// (`90s`, `15m`, `2h30m`), or just the latter.
fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (days, rest) = match s.find('d') {
        Some(i) => {
            let days: u64 = s[..i]
                .parse()
                .map_err(|_| format!("'{s}': days are a whole number before 'd' (e.g. 3d)"))?;
            (days, &s[i + 1..])
        }
        None => (0, s),
    };
    let rest = if rest.is_empty() {
        Duration::ZERO
    } else {
        crate::sim::parse_duration(rest).map_err(|e| e.to_string())?
    };
    Ok(Duration::from_secs(days.saturating_mul(86_400)).saturating_add(rest))
}

/// An age in its largest whole unit: `42s`, `5m`, `3h`, `2d`.
fn short_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_take_days_and_go_durations() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("2h30m"), Ok(Duration::from_secs(9000)));
        assert_eq!(parse_age("3d"), Ok(Duration::from_secs(3 * 86_400)));
        assert_eq!(parse_age("1d12h"), Ok(Duration::from_secs(129_600)));
        assert!(parse_age("xd").is_err());
        assert!(parse_age("12").is_err());
    }

    #[test]
    fn kinds_parse_by_wire_name() {
        assert_eq!(
            parse_kind("provider_rejected"),
            Ok(ErrorKind::ProviderRejected)
        );
        assert!(parse_kind("nope").unwrap_err().contains("invalid_request"));
    }

    #[test]
    fn ages_show_their_largest_unit() {
        assert_eq!(short_age(Duration::from_secs(42)), "42s");
        assert_eq!(short_age(Duration::from_secs(300)), "5m");
        assert_eq!(short_age(Duration::from_secs(3 * 3600 + 5)), "3h");
        assert_eq!(short_age(Duration::from_secs(2 * 86_400)), "2d");
    }
}
