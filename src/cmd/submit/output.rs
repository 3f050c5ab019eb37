//! The OpenAI Batch **output** format: one [`OutputLine`] per input line,
//! with batchd's priority, attempts and cost on every line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use batchd_actors::task::{Outcome, Status, Timings};
use serde::Serialize;
use serde_json::Value;

use super::collect::Collected;
use super::lines::Line;
use crate::client::Subjects;

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

/// The default output path: `<stem>_output.jsonl` next to the input.
pub fn default_output(input: &Path) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "batch".into());
    input.with_file_name(format!("{stem}_output.jsonl"))
}

/// Writes the output file: one line per input line, in input order, through
/// a temporary file so a reader never sees half of it.
pub fn write_output(
    path: &Path,
    lines: &[Line],
    slots: &[Option<Collected>],
    waited: Duration,
    subjects: &Subjects,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("jsonl.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for (line, slot) in lines.iter().zip(slots) {
        let subject = subjects.result(line.custom_id.as_deref().unwrap_or_default());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fixtures::outcome;

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
    fn default_output_sits_next_to_the_input() {
        assert_eq!(
            default_output(Path::new("/data/batch.jsonl")),
            PathBuf::from("/data/batch_output.jsonl")
        );
    }
}
