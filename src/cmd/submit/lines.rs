//! Reading the input: one [`Line`] per non-empty line, each checked locally
//! and either published as it is or refused with a reason.

use std::collections::HashMap;

use batchd_actors::codec::{is_valid_task_id, json_type_name, MAX_TASK_ID_LEN};
use batchd_actors::task::Priority;
use bytes::Bytes;
use serde_json::Value;

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
    /// Why it was refused, when it was.
    pub fn refusal(&self) -> Option<&str> {
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
                json_type_name(&value)
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
            format!("`{field}` must be a string, got {}", json_type_name(raw_id)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
