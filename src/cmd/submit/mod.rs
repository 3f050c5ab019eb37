//! `batchd submit`: publish a JSONL file of tasks (or OpenAI Batch API input
//! lines) and, with `--wait`, collect every outcome into an OpenAI Batch
//! **output** file, in input order, with batchd's priority, attempts and cost
//! on every line.
//!
//! The steps, one module each: read and check the file locally ([`lines`]),
//! connect, subscribe to the results before publishing and look up outcomes
//! that already existed ([`collect`]), publish with a window of PubAcks in
//! flight (here, over [`crate::client::Publisher`]), wait, write the output
//! ([`output`]) and a [`summary`].
//!
//! Running the same command again is safe: a task id already accepted is
//! dropped by JetStream's duplicate window, and one whose outcome exists is
//! acked and skipped by the engine, so nothing is billed twice; its outcome is
//! found by the direct get. A rerun is how an interrupted or timed-out wait is
//! resumed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use batchd_actors::task::{Encoding, Priority};
use bytes::Bytes;

use crate::client::{OutcomeSubscription, Outgoing, PublishError, Published, Publisher};
use crate::config::Config;

pub mod collect;
pub mod lines;
pub mod output;
pub mod summary;

use collect::{listen, lookup_missing, wait_for_outcomes, Collector};
use lines::{check_lines, Line, Verdict};
use output::{default_output, write_output};
use summary::Summary;

/// Arguments of `batchd submit`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_long_help = SUBMIT_HELP)]
pub struct SubmitArgs {
    /// JSONL file: one task body or OpenAI Batch input line per line
    pub file: PathBuf,
    /// Priority subject for lines without their own `priority` (1 premium, 2 standard, 3 bulk)
    #[arg(long, short, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub priority: u8,
    /// Wait for every outcome and write an OpenAI Batch output file
    #[arg(long)]
    pub wait: bool,
    /// Output file (with --wait) [default: <input stem>_output.jsonl next to the input]
    #[arg(long, short, requires = "wait")]
    pub out: Option<PathBuf>,
    /// Config file (subject prefix, stream names, NATS URL)
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NATS server URL
    #[arg(long, env = "BATCHD_NATS_URL")]
    pub nats_url: Option<String>,
    /// With --wait: give up waiting after this many seconds
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

const SUBMIT_HELP: &str = "\
Each non-empty line is published to <prefix>.tasks.p<N> with Nats-Msg-Id set to
its `task_id` (task bodies) or `custom_id` (OpenAI Batch input lines). A line
with its own `priority` field goes to that priority's subject.

Lines batchd can't track are refused locally and never published: not a JSON
object, no usable `task_id`/`custom_id` (1-128 characters of A-Z a-z 0-9 _ -),
an id already used on an earlier line, a `priority` other than 1, 2 or 3, or a
line larger than the server's max_payload. Each is reported with its line
number; the other lines are still published, and the command exits non-zero.
Everything else (unknown task type, unserved model, bad payload) is the
engine's to judge: such a task gets a failed `invalid_request` outcome.

With --wait, the output has exactly one line per non-empty input line, in input
order: a `response` with a chat.completion body for successes, an `error`
({code, message}) for failures, and a `batchd` object (status, priority,
attempts, cost_usd, route, batch_id, timings) on every line. Refused lines get
error code `invalid_line`; outcomes still missing at --timeout get `timeout`.
Failed outcomes are results, not command failures: the exit status is 0 when
every line was published and every outcome collected.

When the tasks stream is full the server refuses the publish (backpressure):
submit stops and says how many tasks were accepted. Running the same command
again is safe and resumes: accepted ids are deduplicated and finished tasks
are never billed twice. It is also how a timed-out --wait is resumed.";

/// Runs `batchd submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let config = super::load_config(args.config.as_deref(), args.nats_url.as_deref())?;
    let default_priority =
        Priority::from_number(i64::from(args.priority)).context("--priority must be 1, 2 or 3")?;
    let data = Bytes::from(
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?,
    );
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| default_output(&args.file));

    let client = crate::nats::connect(&config.nats).await?;
    let max_payload = client.server_info().max_payload;
    let lines = check_lines(&data, default_priority, max_payload);
    if lines.is_empty() {
        bail!("{} has no tasks (no non-empty lines)", args.file.display());
    }
    let refused: Vec<&Line> = lines.iter().filter(|l| l.refusal().is_some()).collect();
    for l in &refused {
        eprintln!(
            "{}:{}: refused: {}",
            args.file.display(),
            l.number,
            l.refusal().unwrap_or_default()
        );
    }
    let publishable = lines.len() - refused.len();

    let js = jetstream::new(client.clone());
    let n = &config.nats;
    js.get_stream(&n.tasks_stream).await.with_context(|| {
        format!(
            "the tasks stream {} is not on {}: start the engine (`batchd run`) once, it creates the streams",
            n.tasks_stream, n.url
        )
    })?;
    let subjects = config.subjects();

    // Subscribe before anything is published so no outcome slips by.
    let collector = if args.wait {
        let results = js.get_stream(&n.results_stream).await.with_context(|| {
            format!(
                "the results stream {} is not on {}: start the engine (`batchd run`) once, it creates the streams",
                n.results_stream, n.url
            )
        })?;
        let collector = Arc::new(Collector::new(&lines));
        let sub = OutcomeSubscription::subscribe(&client, &subjects).await?;
        let listener = tokio::spawn(listen(sub, collector.clone()));
        // Outcomes that existed before the subscription (a rerun) are found here.
        let lookup = tokio::spawn(lookup_missing(
            results.clone(),
            collector.clone(),
            subjects.clone(),
        ));
        Some((collector, results, listener, lookup))
    } else {
        None
    };

    let published = publish_all(&js, &config, &lines, publishable).await;
    let published = match published {
        Ok(p) => p,
        Err(e) => {
            if let Some((_, _, listener, lookup)) = &collector {
                listener.abort();
                lookup.abort();
            }
            return Err(e);
        }
    };

    let mut incomplete = None;
    if let Some((collector, results, listener, lookup)) = collector {
        let _ = lookup.await;
        let waited = wait_for_outcomes(
            &collector,
            &results,
            &subjects,
            Duration::from_secs(args.timeout),
        )
        .await;
        listener.abort();
        let slots = collector.take();
        write_output(&out_path, &lines, &slots, waited.elapsed, &subjects)?;
        let summary = Summary::new(&lines, &slots);
        println!("{}", summary.render(&published, &out_path));
        let missing = slots
            .iter()
            .zip(&lines)
            .filter(|(s, l)| s.is_none() && l.refusal().is_none())
            .count();
        if missing > 0 {
            incomplete = Some(format!(
                "{missing} outcome{} still missing after {} ({}): they are marked `timeout` in {}; run the same command again to resume waiting",
                plural(missing),
                if waited.interrupted { "interrupted" } else { "timed out" },
                humantime(waited.elapsed),
                out_path.display()
            ));
        }
    } else {
        println!(
            "published {} task{} from {} ({} already queued or done, deduplicated by id); outcomes appear on {}",
            published.acked,
            plural(published.acked),
            args.file.display(),
            published.duplicates,
            subjects.result("<task_id>")
        );
    }
    let _ = client.flush().await;
    if !refused.is_empty() {
        let numbers: Vec<String> = refused
            .iter()
            .take(10)
            .map(|l| l.number.to_string())
            .collect();
        let more = if refused.len() > 10 { ", ..." } else { "" };
        bail!(
            "{} line{} refused and not submitted (line{} {}{more}); the other {publishable} were submitted{}",
            refused.len(),
            plural(refused.len()),
            plural(refused.len()),
            numbers.join(", "),
            incomplete.map(|m| format!("; {m}")).unwrap_or_default()
        );
    }
    if let Some(m) = incomplete {
        bail!(m);
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 120.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Publishes the lines that passed the check, each on its priority's
/// subject with `Nats-Msg-Id` set to its id.
async fn publish_all(
    js: &jetstream::Context,
    config: &Config,
    lines: &[Line],
    publishable: usize,
) -> anyhow::Result<Published> {
    let subjects = config.subjects();
    let mut numbers = Vec::with_capacity(publishable);
    let outgoing: Vec<Outgoing> = lines
        .iter()
        .filter_map(|line| match (&line.verdict, line.custom_id.as_deref()) {
            (Verdict::Publish { priority, body }, Some(id)) => {
                numbers.push(line.number);
                Some(Outgoing {
                    subject: subjects.task(*priority),
                    msg_id: id.to_owned(),
                    content_type: Encoding::Json.content_type(),
                    body: body.clone(),
                })
            }
            _ => None,
        })
        .collect();
    let pb = super::progress_bar(publishable, "publishing");
    let result = Publisher::new(js.clone())
        .publish_all(outgoing, |_| pb.inc(1))
        .await;
    pb.finish_and_clear();
    let failure = match result {
        Ok(done) => return Ok(done),
        Err(f) => f,
    };
    let accepted = failure.published.acked;
    let error = match failure.error {
        PublishError::StreamFull { message, .. } => bail!(
            "backpressure: the tasks stream {} is full ({message}), so the server refused new tasks. \
             {accepted} of {publishable} tasks were accepted; the first refused is line {}. \
             The refused tasks were not queued: let the engine work off the queue, then run the \
             same command again (tasks already accepted are deduplicated by id and never billed twice)",
            config.nats.tasks_stream,
            numbers.get(failure.first_refused).copied().unwrap_or_default()
        ),
        PublishError::NoStream { subject } => anyhow::anyhow!(
            "no JetStream stream listens on {subject}: is the engine's config (subject prefix) the same as this one?"
        ),
        PublishError::TimedOut { subject } => anyhow::anyhow!(
            "no PubAck for a task on {subject} in time: the server is overloaded or unreachable; run the same command again later (accepted tasks are deduplicated)"
        ),
        e @ PublishError::Other { .. } => anyhow::Error::from(e),
    };
    Err(error.context(format!(
        "{accepted} of {publishable} tasks were accepted before the error"
    )))
}
