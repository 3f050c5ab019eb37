//! `batchd submit`: publish a JSONL file of tasks (or OpenAI Batch API input
//! lines) and, with `--wait`, collect every outcome into an OpenAI Batch
//! **output** file, in input order, with batchd's priority, attempts and cost
//! on every line.
//!
//! The steps: read and check the file locally ([`check_lines`]), connect,
//! subscribe to the results (before publishing, so no outcome is missed),
//! publish with a window of PubAcks in flight, look up outcomes that already
//! existed with a direct get, wait, write the output ([`output_line`]) and a
//! summary.
//!
//! Running the same command again is safe: a task id already accepted is
//! dropped by JetStream's duplicate window, and one whose outcome exists is
//! acked and skipped by the engine, so nothing is billed twice; its outcome is
//! found by the direct get. A rerun is how an interrupted or timed-out wait is
//! resumed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use batchd_actors::codec::{encoding_for, is_valid_task_id, MAX_TASK_ID_LEN};
use batchd_actors::task::{Encoding, Outcome, Priority, Status, Timings};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Config;

/// PubAcks awaited at once while publishing.
const PUBLISH_WINDOW: usize = 1024;
/// Direct gets in flight while looking up existing outcomes.
const LOOKUP_CONCURRENCY: usize = 64;
/// First pause without any new outcome before missing ones are looked up again.
const FIRST_IDLE_SWEEP: Duration = Duration::from_secs(2);
const MAX_IDLE_SWEEP: Duration = Duration::from_secs(30);

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

/// One non-empty line of the input, as checked locally.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    /// The `task_id` or `custom_id`, when it could be read as a string.
    pub custom_id: Option<String>,
    /// Publish it, or why not.
    pub verdict: Verdict,
}

/// What submit does with a line.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish `body` on the priority's subject.
    Publish {
        /// The subject's priority.
        priority: Priority,
        /// The line's bytes, published unchanged.
        body: Bytes,
    },
    /// Refused locally; the reason names the problem.
    Refused(String),
}

impl Line {
    fn refusal(&self) -> Option<&str> {
        match &self.verdict {
            Verdict::Refused(r) => Some(r),
            Verdict::Publish { .. } => None,
        }
    }
}

/// Splits the file into lines and decides for each whether it can be
/// published. `max_payload` is the server's limit on one message.
pub fn check_lines(data: &Bytes, default_priority: Priority, max_payload: usize) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    let mut start = 0;
    let mut number = 0;
    while start < data.len() {
        let end = data[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |i| start + i);
        number += 1;
        let mut from = start;
        if number == 1 && data[from..end].starts_with(b"\xEF\xBB\xBF") {
            from += 3; // UTF-8 byte order mark
        }
        let mut to = end;
        while to > from && data[to - 1].is_ascii_whitespace() {
            to -= 1;
        }
        while from < to && data[from].is_ascii_whitespace() {
            from += 1;
        }
        start = end + 1;
        if from == to {
            continue;
        }
        let body = data.slice(from..to);
        let (custom_id, verdict) = check_line(&body, default_priority, max_payload);
        let verdict = match (&verdict, &custom_id) {
            (Verdict::Publish { .. }, Some(id)) => match first_seen.get(id) {
                Some(first) => Verdict::Refused(format!(
                    "duplicate id {id:?} (first used on line {first}): JetStream would drop it as a duplicate"
                )),
                None => {
                    first_seen.insert(id.clone(), number);
                    verdict
                }
            },
            _ => verdict,
        };
        lines.push(Line {
            number,
            custom_id,
            verdict,
        });
    }
    lines
}

fn check_line(
    body: &Bytes,
    default_priority: Priority,
    max_payload: usize,
) -> (Option<String>, Verdict) {
    let refuse = |id: Option<String>, why: String| (id, Verdict::Refused(why));
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return refuse(None, format!("not valid JSON: {e}")),
    };
    let Value::Object(map) = &value else {
        return refuse(
            None,
            format!(
                "a line must be a JSON object (a task or an OpenAI Batch input line), got {}",
                type_name(&value)
            ),
        );
    };
    // As the engine reads it: a line with a `task_id` key is a task body,
    // otherwise one with `custom_id` is an OpenAI Batch line.
    let (field, raw_id) = match (map.get("task_id"), map.get("custom_id")) {
        (Some(id), _) => ("task_id", id),
        (None, Some(id)) => ("custom_id", id),
        (None, None) => return refuse(None, "no `task_id` or `custom_id`".into()),
    };
    let Some(id) = raw_id.as_str() else {
        return refuse(
            None,
            format!("`{field}` must be a string, got {}", type_name(raw_id)),
        );
    };
    let custom_id = Some(id.to_owned());
    if !is_valid_task_id(id) {
        return refuse(
            custom_id,
            format!(
                "`{field}` {id:?} can't be a task id: it must be 1-{MAX_TASK_ID_LEN} characters of A-Z a-z 0-9 _ -"
            ),
        );
    }
    let priority = match map.get("priority") {
        None | Some(Value::Null) => default_priority,
        Some(v) => match v.as_i64().and_then(Priority::from_number) {
            Some(p) => p,
            None => {
                return refuse(
                    custom_id,
                    format!("field `priority` must be 1, 2 or 3, got {v}"),
                )
            }
        },
    };
    // Headers (the message id, the content type) count against max_payload too.
    let size = body.len() + id.len() + 64;
    if size > max_payload {
        return refuse(
            custom_id,
            format!(
                "the line is {} bytes; the NATS server accepts at most {max_payload} per message",
                body.len()
            ),
        );
    }
    (
        custom_id,
        Verdict::Publish {
            priority,
            body: body.clone(),
        },
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What came back for one published task.
#[derive(Debug, Clone, PartialEq)]
pub enum Collected {
    /// Its outcome.
    Outcome(Box<Outcome>),
    /// Something was published on its results subject but could not be read.
    Unreadable(String),
}

/// What happened to one line, for the output file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LineResult<'a> {
    /// Refused locally.
    Refused(&'a str),
    /// Published; no outcome by the end of the wait.
    Pending {
        /// How long submit waited.
        waited: Duration,
        /// The subject the outcome will be published on.
        subject: &'a str,
    },
    /// Published and answered.
    Done(&'a Collected),
}

/// One line of the OpenAI Batch output file (fields in OpenAI's order).
#[derive(Debug, Clone, Serialize)]
pub struct OutputLine {
    /// `batch_req_<ULID>`.
    pub id: String,
    /// The line's `custom_id` (or `task_id`).
    pub custom_id: Option<String>,
    /// The chat completion, for successes.
    pub response: Option<Response>,
    /// Why there is no response.
    pub error: Option<LineError>,
    /// batchd's own account of the task.
    pub batchd: BatchdInfo,
}

/// The `batchd` object on every line (null where unknown).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchdInfo {
    /// `succeeded`, `failed`, `not_submitted`, `pending` or `unknown`.
    pub status: &'static str,
    /// The priority it ran at.
    pub priority: Option<u8>,
    /// Provider attempts.
    pub attempts: Option<u32>,
    /// What it cost.
    pub cost_usd: Option<f64>,
    /// `realtime` or `batch_api`.
    pub route: Option<&'static str>,
    /// The batch it travelled in.
    pub batch_id: Option<String>,
    /// The provider that served it.
    pub provider: Option<String>,
    /// Its tenant.
    pub tenant: Option<String>,
    /// Time spent.
    pub timings: Option<Timings>,
}

/// `response` of a successful line.
#[derive(Debug, Clone, Serialize)]
pub struct Response {
    /// Always 200.
    pub status_code: u16,
    /// `req_<ULID>`.
    pub request_id: String,
    /// A `chat.completion` object.
    pub body: ChatCompletion,
}

/// The `error` of a line without a response.
#[derive(Debug, Clone, Serialize)]
pub struct LineError {
    /// `error.kind` of the outcome, or `invalid_line`, `timeout`, `unreadable_outcome`.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// An OpenAI `chat.completion` object built from an outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-<ULID>`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds of the outcome.
    pub created: i64,
    /// The model that answered.
    pub model: String,
    /// One choice.
    pub choices: [Choice; 1],
    /// Token counts in OpenAI's names.
    pub usage: CompletionUsage,
}

/// A choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// Always 0.
    pub index: u32,
    /// The assistant's message.
    pub message: Message,
    /// Always null.
    pub logprobs: Option<Value>,
    /// Why generation stopped.
    pub finish_reason: String,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: Option<String>,
    /// Always null.
    pub refusal: Option<String>,
}

/// `usage` in OpenAI's names.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionUsage {
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
    /// Cached prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
}

/// One line of the OpenAI Batch output file.
pub fn output_line(custom_id: Option<&str>, result: LineResult<'_>) -> OutputLine {
    let ulid = ulid::Ulid::new();
    let mut line = OutputLine {
        id: format!("batch_req_{ulid}"),
        custom_id: custom_id.map(str::to_owned),
        response: None,
        error: None,
        batchd: BatchdInfo::default(),
    };
    let error = |code: &str, message: String| {
        Some(LineError {
            code: code.to_owned(),
            message,
        })
    };
    match result {
        LineResult::Refused(why) => {
            line.error = error("invalid_line", why.to_owned());
            line.batchd.status = "not_submitted";
        }
        LineResult::Pending { waited, subject } => {
            line.error = error(
                "timeout",
                format!(
                    "no outcome after waiting {}s; it will be published on {subject} (run the same command again to resume waiting)",
                    waited.as_secs()
                ),
            );
            line.batchd.status = "pending";
        }
        LineResult::Done(Collected::Unreadable(why)) => {
            line.error = error("unreadable_outcome", why.clone());
            line.batchd.status = "unknown";
        }
        LineResult::Done(Collected::Outcome(o)) => {
            line.batchd = BatchdInfo {
                status: o.status.as_str(),
                priority: Some(o.priority),
                attempts: Some(o.attempts),
                cost_usd: Some(o.cost_usd),
                route: o.route.map(|r| r.as_str()),
                batch_id: o.batch_id.clone(),
                provider: o.provider.clone(),
                tenant: Some(o.tenant.clone()),
                timings: Some(o.timings),
            };
            match (o.status, &o.error) {
                (Status::Succeeded, _) => {
                    line.response = Some(Response {
                        status_code: 200,
                        request_id: format!("req_{ulid}"),
                        body: chat_completion(o, &ulid),
                    });
                }
                (Status::Failed, Some(e)) => {
                    line.error = error(e.kind.as_str(), e.message.clone());
                }
                (Status::Failed, None) => {
                    line.error = error("failed", "the task failed without an error".into());
                }
            }
        }
    }
    line
}

/// The `chat.completion` object of a successful outcome.
fn chat_completion(o: &Outcome, ulid: &ulid::Ulid) -> ChatCompletion {
    let created = chrono::DateTime::parse_from_rfc3339(&o.completed_at)
        .map(|t| t.timestamp())
        .unwrap_or_else(|_| chrono::Utc::now().timestamp());
    let u = &o.usage;
    ChatCompletion {
        id: format!("chatcmpl-{ulid}"),
        object: "chat.completion",
        created,
        model: o.model.clone().unwrap_or_default(),
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content: o.output.clone(),
                refusal: None,
            },
            logprobs: None,
            finish_reason: o.finish_reason.clone().unwrap_or_else(|| "stop".into()),
        }],
        usage: CompletionUsage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u.input_tokens + u.output_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_input_tokens,
            },
        },
    }
}

/// Reads an outcome in the encoding its `Content-Type` names.
pub fn decode_outcome(content_type: Option<&str>, payload: &[u8]) -> Collected {
    let decoded = match encoding_for(content_type) {
        Some(Encoding::Json) => {
            serde_json::from_slice::<Outcome>(payload).map_err(|e| e.to_string())
        }
        Some(Encoding::MessagePack) => {
            rmp_serde::from_slice::<Outcome>(payload).map_err(|e| e.to_string())
        }
        None => Err(format!(
            "unsupported Content-Type {:?}",
            content_type.unwrap_or_default()
        )),
    };
    match decoded {
        Ok(o) => Collected::Outcome(Box::new(o)),
        Err(e) => Collected::Unreadable(format!("the outcome could not be decoded: {e}")),
    }
}

/// The default output path: `<stem>_output.jsonl` next to the input.
pub fn default_output(input: &Path) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "batch".into());
    input.with_file_name(format!("{stem}_output.jsonl"))
}

/// Runs `batchd submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::defaults()?,
    };
    if let Some(url) = &args.nats_url {
        config.nats.url = url.clone();
    }
    let default_priority =
        Priority::from_number(i64::from(args.priority)).context("--priority must be 1, 2 or 3")?;
    let data = Bytes::from(
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?,
    );
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| default_output(&args.file));

    let client = crate::nats::connect(&config.nats.url).await?;
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
    let results_prefix = format!("{}.results.", n.subject_prefix);

    // Subscribe before anything is published so no outcome slips by.
    let collector = if args.wait {
        let results = js.get_stream(&n.results_stream).await.with_context(|| {
            format!(
                "the results stream {} is not on {}: start the engine (`batchd run`) once, it creates the streams",
                n.results_stream, n.url
            )
        })?;
        let collector = Arc::new(Collector::new(&lines));
        let sub = client
            .subscribe(format!("{results_prefix}>"))
            .await
            .with_context(|| format!("subscribing to {results_prefix}>"))?;
        let listener = tokio::spawn(listen(sub, collector.clone(), results_prefix.clone()));
        // Outcomes that existed before the subscription (a rerun) are found here.
        let lookup = tokio::spawn(lookup_missing(
            results.clone(),
            collector.clone(),
            results_prefix.clone(),
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
            &results_prefix,
            Duration::from_secs(args.timeout),
        )
        .await;
        listener.abort();
        let slots = collector.take();
        write_output(&out_path, &lines, &slots, waited.elapsed, &results_prefix)?;
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
            "published {} task{} from {} ({} already queued or done, deduplicated by id); outcomes appear on {}<task_id>",
            published.accepted,
            plural(published.accepted),
            args.file.display(),
            published.duplicates,
            results_prefix
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

fn bar(len: usize, prefix: &'static str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:40.cyan/blue}] {human_pos}/{human_len} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::new(len as u64)
        .with_style(style)
        .with_prefix(prefix)
}

/// What publishing achieved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Published {
    /// Tasks with a PubAck.
    pub accepted: usize,
    /// Of those, ids JetStream already had inside its duplicate window.
    pub duplicates: usize,
}

enum AckVerdict {
    Accepted { duplicate: bool },
    Full(String),
    Fatal(anyhow::Error),
}

fn classify(
    subject: &str,
    r: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> AckVerdict {
    match r {
        Ok(ack) => AckVerdict::Accepted {
            duplicate: ack.duplicate,
        },
        Err(e) => {
            let text = e.to_string();
            let lower = text.to_ascii_lowercase();
            let full = lower.contains("maximum messages")
                || lower.contains("maximum bytes")
                || lower.contains("insufficient resources")
                || lower.contains("resource limits exceeded");
            match e.kind() {
                PublishErrorKind::StreamNotFound => AckVerdict::Fatal(anyhow::anyhow!(
                    "no JetStream stream listens on {subject}: is the engine's config (subject prefix) the same as this one?"
                )),
                PublishErrorKind::TimedOut => AckVerdict::Fatal(anyhow::anyhow!(
                    "no PubAck for a task on {subject} in time: the server is overloaded or unreachable; run the same command again later (accepted tasks are deduplicated)"
                )),
                _ if full => AckVerdict::Full(text),
                _ => AckVerdict::Fatal(anyhow::anyhow!("publishing to {subject}: {text}")),
            }
        }
    }
}

async fn publish_all(
    js: &jetstream::Context,
    config: &Config,
    lines: &[Line],
    publishable: usize,
) -> anyhow::Result<Published> {
    let subjects = Priority::ALL.map(|p| config.task_subject(p));
    let pb = bar(publishable, "publishing");
    let mut done = Published::default();
    let mut in_flight = FuturesUnordered::new();
    let mut stop: Option<AckVerdict> = None;
    let mut first_refused: Option<usize> = None;
    let mut handle =
        |number: usize, subject: &str, r, done: &mut Published, stop: &mut Option<AckVerdict>| {
            match classify(subject, r) {
                AckVerdict::Accepted { duplicate } => {
                    done.accepted += 1;
                    done.duplicates += usize::from(duplicate);
                    pb.inc(1);
                }
                other => {
                    first_refused = Some(first_refused.map_or(number, |f: usize| f.min(number)));
                    if stop.is_none() {
                        *stop = Some(other);
                    }
                }
            }
        };
    for line in lines {
        let Verdict::Publish { priority, body } = &line.verdict else {
            continue;
        };
        let Some(id) = line.custom_id.as_deref() else {
            continue;
        };
        while in_flight.len() >= PUBLISH_WINDOW {
            if let Some((number, subject, r)) = in_flight.next().await {
                handle(number, subject, r, &mut done, &mut stop);
            }
        }
        if stop.is_some() {
            break;
        }
        let subject: &str = &subjects[priority.index()];
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        headers.insert("Content-Type", Encoding::Json.content_type());
        let ack = js
            .publish_with_headers(subject.to_owned(), headers, body.clone())
            .await
            .with_context(|| format!("publishing line {} to {subject}", line.number))?;
        let number = line.number;
        in_flight.push(async move { (number, subject, ack.await) });
    }
    while let Some((number, subject, r)) = in_flight.next().await {
        handle(number, subject, r, &mut done, &mut stop);
    }
    pb.finish_and_clear();
    match stop {
        None => Ok(done),
        Some(AckVerdict::Full(why)) => bail!(
            "backpressure: the tasks stream {} is full ({why}), so the server refused new tasks. \
             {} of {publishable} tasks were accepted; the first refused is line {}. \
             The refused tasks were not queued: let the engine work off the queue, then run the \
             same command again (tasks already accepted are deduplicated by id and never billed twice)",
            config.nats.tasks_stream,
            done.accepted,
            first_refused.unwrap_or_default()
        ),
        Some(AckVerdict::Fatal(e)) => Err(e.context(format!(
            "{} of {publishable} tasks were accepted before the error",
            done.accepted
        ))),
        Some(AckVerdict::Accepted { .. }) => Ok(done),
    }
}

/// The outcomes collected so far, one slot per line.
struct Collector {
    ids: HashMap<String, usize>,
    slots: Mutex<Vec<Option<Collected>>>,
    found: AtomicUsize,
    expected: usize,
    notify: Notify,
}

impl Collector {
    fn new(lines: &[Line]) -> Collector {
        let ids: HashMap<String, usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.refusal().is_none())
            .filter_map(|(i, l)| l.custom_id.clone().map(|id| (id, i)))
            .collect();
        Collector {
            expected: ids.len(),
            ids,
            slots: Mutex::new(vec![None; lines.len()]),
            found: AtomicUsize::new(0),
            notify: Notify::new(),
        }
    }

    fn record(&self, id: &str, c: Collected) {
        let Some(&i) = self.ids.get(id) else {
            return;
        };
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots[i].is_none() {
            slots[i] = Some(c);
            self.found.fetch_add(1, Ordering::Release);
            self.notify.notify_one();
        }
    }

    fn missing(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.ids
            .iter()
            .filter(|(_, &i)| slots[i].is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn found(&self) -> usize {
        self.found.load(Ordering::Acquire)
    }

    fn take(&self) -> Vec<Option<Collected>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *slots)
    }
}

async fn listen(mut sub: async_nats::Subscriber, collector: Arc<Collector>, prefix: String) {
    while let Some(msg) = sub.next().await {
        let Some(id) = msg.subject.as_str().strip_prefix(prefix.as_str()) else {
            continue;
        };
        if !collector.ids.contains_key(id) {
            continue;
        }
        let ct = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .map(|v| v.as_str());
        collector.record(id, decode_outcome(ct, &msg.payload));
    }
}

/// Looks up, with a direct get of the last message on each results subject,
/// the outcomes not collected yet.
async fn lookup_missing(
    results: jetstream::stream::Stream,
    collector: Arc<Collector>,
    prefix: String,
) {
    let missing = collector.missing();
    let mut lookups = futures::stream::iter(missing)
        .map(|id| {
            let results = &results;
            let subject = format!("{prefix}{id}");
            async move { (id, results.direct_get_last_for_subject(subject).await) }
        })
        .buffer_unordered(LOOKUP_CONCURRENCY);
    let mut warned = false;
    while let Some((id, r)) = lookups.next().await {
        match r {
            Ok(m) => {
                let ct = m.headers.get("Content-Type").map(|v| v.as_str());
                collector.record(&id, decode_outcome(ct, &m.payload));
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "looking up existing outcomes failed; relying on the subscription");
                    warned = true;
                }
            }
        }
    }
}

struct Waited {
    elapsed: Duration,
    interrupted: bool,
}

async fn wait_for_outcomes(
    collector: &Arc<Collector>,
    results: &jetstream::stream::Stream,
    prefix: &str,
    timeout: Duration,
) -> Waited {
    let started = Instant::now();
    let deadline = started + timeout;
    let pb = bar(collector.expected, "outcomes");
    let mut idle = FIRST_IDLE_SWEEP;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let found = collector.found();
        pb.set_position(found as u64);
        if found >= collector.expected {
            break;
        }
        tokio::select! {
            _ = collector.notify.notified() => {
                idle = FIRST_IDLE_SWEEP;
            }
            _ = tokio::time::sleep(idle) => {
                // Quiet for a while: a message may have been dropped (slow
                // consumer, reconnect); look the missing ones up.
                lookup_missing(results.clone(), collector.clone(), prefix.to_owned()).await;
                idle = (idle * 2).min(MAX_IDLE_SWEEP);
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
    }
    pb.finish_and_clear();
    Waited {
        elapsed: started.elapsed(),
        interrupted,
    }
}

fn write_output(
    path: &Path,
    lines: &[Line],
    slots: &[Option<Collected>],
    waited: Duration,
    results_prefix: &str,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("jsonl.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for (line, slot) in lines.iter().zip(slots) {
        let subject = format!(
            "{results_prefix}{}",
            line.custom_id.as_deref().unwrap_or_default()
        );
        let result = match (line.refusal(), slot) {
            (Some(why), _) => LineResult::Refused(why),
            (None, Some(c)) => LineResult::Done(c),
            (None, None) => LineResult::Pending {
                waited,
                subject: &subject,
            },
        };
        let value = output_line(line.custom_id.as_deref(), result);
        serde_json::to_writer(&mut w, &value)
            .with_context(|| format!("writing {}", tmp.display()))?;
        w.write_all(b"\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(w);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Totals for the closing table.
#[derive(Debug, Default)]
struct Summary {
    succeeded: usize,
    failed: usize,
    refused: usize,
    pending: usize,
    unreadable: usize,
    cost: f64,
    input_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    failures: std::collections::BTreeMap<String, usize>,
    by_priority: [usize; 3],
    retried: usize,
}

impl Summary {
    fn new(lines: &[Line], slots: &[Option<Collected>]) -> Summary {
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

    fn render(&self, published: &Published, out: &Path) -> String {
        let total = self.succeeded + self.failed + self.refused + self.pending + self.unreadable;
        let mut rows = vec![
            ("succeeded".to_owned(), self.succeeded, String::new()),
            (
                "failed".to_owned(),
                self.failed,
                self.failures
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ];
        if self.refused > 0 {
            rows.push(("not submitted".into(), self.refused, "invalid_line".into()));
        }
        if self.pending > 0 {
            rows.push(("no outcome yet".into(), self.pending, "timeout".into()));
        }
        if self.unreadable > 0 {
            rows.push(("unreadable".into(), self.unreadable, String::new()));
        }
        rows.push(("total".into(), total, String::new()));
        let mut out_text = String::new();
        out_text.push_str(&format!("{:<16}{:>9}  {}\n", "outcome", "lines", "detail"));
        for (name, n, detail) in rows {
            let row = format!("{name:<16}{n:>9}  {detail}");
            out_text.push_str(row.trim_end());
            out_text.push('\n');
        }
        out_text.push_str(&format!(
            "cost            ${:.6}  (tokens: {} in, {} of them cached, {} out)\n",
            self.cost, self.input_tokens, self.cached_tokens, self.output_tokens
        ));
        out_text.push_str(&format!(
            "by priority     p1 {}, p2 {}, p3 {}; {} retried; {} already queued or done (deduplicated)\n",
            self.by_priority[0], self.by_priority[1], self.by_priority[2], self.retried, published.duplicates
        ));
        out_text.push_str(&format!("output          {}", out.display()));
        out_text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchd_actors::task::{ErrorKind, RouteKind, TaskError, Usage};

    fn outcome(status: Status) -> Outcome {
        Outcome {
            task_id: "a".into(),
            status,
            output: (status == Status::Succeeded).then(|| "hi".into()),
            finish_reason: Some("stop".into()),
            error: (status == Status::Failed)
                .then(|| TaskError::new(ErrorKind::InvalidRequest, "model \"x\" is not served")),
            model: Some("gpt-4.1-nano".into()),
            provider: Some("openai".into()),
            route: Some(RouteKind::Realtime),
            usage: Usage {
                input_tokens: 10,
                cached_input_tokens: 4,
                output_tokens: 3,
            },
            cost_usd: 0.5,
            attempts: 2,
            batch_id: Some("b_1".into()),
            priority: 3,
            tenant: "default".into(),
            timings: Timings::default(),
            metadata: None,
            completed_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn lines_are_checked_with_numbers_and_reasons() {
        let data = Bytes::from_static(
            b"\xEF\xBB\xBF{\"custom_id\":\"a\",\"body\":{}}\n\n  \nnot json\n[1]\n{\"x\":1}\n{\"task_id\":\"a.b\"}\n{\"task_id\":\"c\",\"priority\":3}\r\n{\"custom_id\":\"a\"}\n{\"task_id\":\"d\",\"priority\":9}\n{\"custom_id\":7}\n{\"task_id\":null,\"custom_id\":\"e\"}",
        );
        let lines = check_lines(&data, Priority::P2, 1 << 20);
        let numbers: Vec<usize> = lines.iter().map(|l| l.number).collect();
        assert_eq!(numbers, vec![1, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(
            lines[0].verdict,
            Verdict::Publish {
                priority: Priority::P2,
                body: Bytes::from_static(b"{\"custom_id\":\"a\",\"body\":{}}")
            }
        );
        assert!(lines[1].refusal().unwrap().starts_with("not valid JSON"));
        assert!(lines[2].refusal().unwrap().contains("got an array"));
        assert!(lines[3]
            .refusal()
            .unwrap()
            .contains("no `task_id` or `custom_id`"));
        assert!(lines[4].refusal().unwrap().contains("can't be a task id"));
        assert_eq!(lines[4].custom_id.as_deref(), Some("a.b"));
        assert!(matches!(
            lines[5].verdict,
            Verdict::Publish {
                priority: Priority::P3,
                ..
            }
        ));
        assert!(lines[6].refusal().unwrap().contains("first used on line 1"));
        assert!(lines[7]
            .refusal()
            .unwrap()
            .contains("`priority` must be 1, 2 or 3"));
        assert!(lines[8].refusal().unwrap().contains("must be a string"));
        assert!(lines[9]
            .refusal()
            .unwrap()
            .contains("`task_id` must be a string, got null"));
    }

    #[test]
    fn oversized_lines_are_refused() {
        let body = format!("{{\"task_id\":\"big\",\"x\":\"{}\"}}", "y".repeat(2000));
        let lines = check_lines(&Bytes::from(body), Priority::P1, 1024);
        assert!(lines[0].refusal().unwrap().contains("at most 1024"));
    }

    #[test]
    fn success_becomes_a_chat_completion_with_usage() {
        let c = Collected::Outcome(Box::new(outcome(Status::Succeeded)));
        let v = serde_json::to_value(output_line(Some("a"), LineResult::Done(&c))).unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(v["custom_id"], "a");
        assert!(v["error"].is_null());
        let r = &v["response"];
        assert_eq!(r["status_code"], 200);
        assert!(r["request_id"].as_str().unwrap().starts_with("req_"));
        let body = &r["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["created"], 1767225600);
        assert_eq!(body["model"], "gpt-4.1-nano");
        assert_eq!(body["choices"][0]["message"]["content"], "hi");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens"], 10);
        assert_eq!(body["usage"]["completion_tokens"], 3);
        assert_eq!(body["usage"]["total_tokens"], 13);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(v["batchd"]["status"], "succeeded");
        assert_eq!(v["batchd"]["priority"], 3);
        assert_eq!(v["batchd"]["attempts"], 2);
        assert_eq!(v["batchd"]["cost_usd"], 0.5);
        assert_eq!(v["batchd"]["route"], "realtime");
        assert_eq!(v["batchd"]["batch_id"], "b_1");
    }

    #[test]
    fn failure_refusal_and_timeout_become_errors() {
        let c = Collected::Outcome(Box::new(outcome(Status::Failed)));
        let v = serde_json::to_value(output_line(Some("a"), LineResult::Done(&c))).unwrap();
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not served"));
        assert_eq!(v["batchd"]["status"], "failed");

        let v =
            serde_json::to_value(output_line(None, LineResult::Refused("not valid JSON"))).unwrap();
        assert!(v["custom_id"].is_null());
        assert_eq!(v["error"]["code"], "invalid_line");
        assert_eq!(v["batchd"]["status"], "not_submitted");

        let v = serde_json::to_value(output_line(
            Some("z"),
            LineResult::Pending {
                waited: Duration::from_secs(5),
                subject: "batchd.results.z",
            },
        ))
        .unwrap();
        assert_eq!(v["error"]["code"], "timeout");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("batchd.results.z"));
        assert_eq!(v["batchd"]["status"], "pending");
    }

    #[test]
    fn outcomes_decode_from_json_and_messagepack() {
        let o = outcome(Status::Succeeded);
        let json = serde_json::to_vec(&o).unwrap();
        let mp = rmp_serde::to_vec_named(&o).unwrap();
        assert_eq!(
            decode_outcome(None, &json),
            Collected::Outcome(Box::new(o.clone()))
        );
        assert_eq!(
            decode_outcome(Some("application/msgpack"), &mp),
            Collected::Outcome(Box::new(o))
        );
        assert!(matches!(
            decode_outcome(Some("text/plain"), b"x"),
            Collected::Unreadable(_)
        ));
    }

    #[test]
    fn default_output_sits_next_to_the_input() {
        assert_eq!(
            default_output(Path::new("/data/batch.jsonl")),
            PathBuf::from("/data/batch_output.jsonl")
        );
    }
}
