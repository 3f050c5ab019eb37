//! The dead-letter stream from the operator's side (PROTOCOL.md, "Dead
//! letters and replays"): listing dead letters, reading one with the kept
//! outcome of its task, replaying a task as a new generation and purging.
//!
//! Whether a task may be replayed, and how, is decided by [`plan_replay`],
//! a pure function over what was read; [`DeadLetters::replay`] then carries
//! the plan out: clear the attempts, publish with a PubAck, purge the dead
//! letter that was read (and nothing newer).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use batchd_actors::codec::encode;
use batchd_actors::ports::message_id;
use batchd_actors::task::{DeadLetter, Encoding, ErrorKind, Outcome, Priority, Status};
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::read::{last_message_on, read_stream, StoredMessage};
use super::{Ack, DecodeError, Outgoing, PublishError, Publisher, ReadError, Subjects};
use crate::config::NatsConfig;

/// A dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Reading a stream failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Publishing the replay failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A stream or bucket is missing or unreachable.
    #[error("opening {what}: {message}")]
    Open {
        /// Which stream or bucket.
        what: String,
        /// Why.
        message: String,
    },
    /// Clearing the attempts of a task failed.
    #[error("clearing the attempts of {task_id} in {bucket}: {message}")]
    Attempts {
        /// The task.
        task_id: String,
        /// The bucket.
        bucket: String,
        /// Why.
        message: String,
    },
    /// Purging dead letters failed.
    #[error("purging {subject} from {stream}: {message}")]
    Purge {
        /// The subject (or filter) purged.
        subject: String,
        /// The stream.
        stream: String,
        /// Why.
        message: String,
    },
}

/// One dead letter as listed: the last on its subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// The task id (or the synthetic `invalid~p<N>~<seq>~<ms>`).
    pub id: String,
    /// The dead letter.
    pub letter: Result<DeadLetter, DecodeError>,
}

/// A dead letter read for a replay: its stream sequence, encoding and body.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    /// Its stream sequence (what a replay purges, and nothing newer).
    pub sequence: u64,
    /// The encoding its `Content-Type` names: the task's.
    pub encoding: Option<Encoding>,
    /// The dead letter.
    pub letter: Result<DeadLetter, DecodeError>,
}

impl From<&StoredMessage> for StoredDeadLetter {
    fn from(m: &StoredMessage) -> StoredDeadLetter {
        StoredDeadLetter {
            sequence: m.sequence,
            encoding: m.encoding(),
            letter: m.decode(),
        }
    }
}

/// Why a task is not replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its kept outcome succeeded.
    #[error(
        "its kept outcome succeeded (generation {generation}): a succeeded task is never replayed"
    )]
    Succeeded {
        /// The kept outcome's generation.
        generation: u32,
    },
    /// It has no dead letter.
    #[error("no dead letter")]
    NoDeadLetter,
    /// Its dead letter holds no readable task (`task: null`).
    #[error("its dead letter holds no readable task (only the raw bytes): nothing to replay")]
    NoTask,
    /// Its dead letter could not be decoded.
    #[error("its dead letter could not be decoded: {0}")]
    Unreadable(String),
    /// It arrived on a subject that is not a task subject.
    #[error("it arrived on {0}, which is not a task subject")]
    NotATaskSubject(String),
    /// Its task could not be encoded again.
    #[error("its task could not be encoded: {0}")]
    Encode(String),
}

/// What a replay publishes, and what it removes afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayPlan {
    /// The task id.
    pub task_id: String,
    /// The generation of the replay (≥ 1).
    pub generation: u32,
    /// The task, on the priority subject it arrived on, with `<id>:g<N>`.
    pub message: Outgoing,
    /// The sequence of the dead letter to purge (with every older one).
    pub dead_letter_sequence: u64,
}

/// Decides whether `task_id` may be replayed, from its dead letter and its
/// kept outcome, and builds the replay: generation N = the kept outcome's
/// generation + 1 (1 when there is none), the original task in the dead
/// letter's encoding, published on the subject it arrived on.
pub fn plan_replay(
    task_id: &str,
    subjects: &Subjects,
    dead_letter: Option<StoredDeadLetter>,
    kept: Option<&Outcome>,
) -> Result<ReplayPlan, Refusal> {
    if let Some(k) = kept.filter(|k| k.status == Status::Succeeded) {
        return Err(Refusal::Succeeded {
            generation: k.generation,
        });
    }
    let stored = dead_letter.ok_or(Refusal::NoDeadLetter)?;
    let letter = stored
        .letter
        .map_err(|e| Refusal::Unreadable(e.to_string()))?;
    if letter.task.is_null() {
        return Err(Refusal::NoTask);
    }
    if !subjects.tasks().contains(&letter.subject) {
        return Err(Refusal::NotATaskSubject(letter.subject));
    }
    let encoding = stored.encoding.unwrap_or_default();
    let body = encode(&letter.task, encoding).map_err(|e| Refusal::Encode(e.to_string()))?;
    let generation = kept.map_or(0, |k| k.generation).saturating_add(1);
    Ok(ReplayPlan {
        task_id: task_id.to_owned(),
        generation,
        message: Outgoing {
            subject: letter.subject,
            msg_id: message_id(task_id, generation),
            content_type: encoding.content_type(),
            body: Bytes::from(body),
        },
        dead_letter_sequence: stored.sequence,
    })
}

/// Which dead letters a listing or a bulk operation selects; every field
/// left `None` selects all.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Filter {
    /// Only this `error.kind`.
    pub kind: Option<ErrorKind>,
    /// Only tasks that arrived on this priority.
    pub priority: Option<Priority>,
    /// Only dead letters at least this old.
    pub older_than: Option<Duration>,
    /// Only dead letters at most this old.
    pub newer_than: Option<Duration>,
}

impl Filter {
    /// Whether `letter` is selected at `now`. A dead letter whose age can't
    /// be read matches no age bound.
    pub fn matches(&self, letter: &DeadLetter, now: DateTime<Utc>) -> bool {
        let age = age(letter, now);
        self.kind.is_none_or(|k| letter.error.kind == k)
            && self
                .priority
                .is_none_or(|p| priority_of(&letter.subject) == Some(p))
            && self
                .older_than
                .is_none_or(|d| age.is_some_and(|age| age >= d))
            && self
                .newer_than
                .is_none_or(|d| age.is_some_and(|age| age <= d))
    }
}

/// How long ago `letter` died (its `dead_at`); `None` when unreadable.
pub fn age(letter: &DeadLetter, now: DateTime<Utc>) -> Option<Duration> {
    let dead_at = DateTime::parse_from_rfc3339(&letter.dead_at).ok()?;
    (now - dead_at.with_timezone(&Utc)).to_std().ok()
}

/// The priority of a task subject (`<prefix>.tasks.p<N>`).
pub fn priority_of(subject: &str) -> Option<Priority> {
    Priority::from_token(subject.rsplit('.').next()?)
}

/// The dead-letter and results streams and the attempts bucket of one config.
pub struct DeadLetters {
    js: jetstream::Context,
    dlq: Stream,
    results: Stream,
    dlq_stream: String,
    attempts_bucket: String,
    subjects: Subjects,
}

impl DeadLetters {
    /// Opens the streams `nats` names.
    pub async fn open(
        js: &jetstream::Context,
        nats: &NatsConfig,
    ) -> Result<DeadLetters, DeadLetterError> {
        let open = |name: &str| {
            let name = name.to_owned();
            async move {
                js.get_stream(&name)
                    .await
                    .map_err(|e| DeadLetterError::Open {
                        what: format!("stream {name}"),
                        message: e.to_string(),
                    })
            }
        };
        Ok(DeadLetters {
            js: js.clone(),
            dlq: open(&nats.dlq_stream).await?,
            results: open(&nats.results_stream).await?,
            dlq_stream: nats.dlq_stream.clone(),
            attempts_bucket: nats.attempts_bucket.clone(),
            subjects: Subjects::of(nats),
        })
    }

    /// The subjects.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Every dead letter (the last message on each subject), in stream order.
    pub async fn list(&self) -> Result<Vec<Listed>, DeadLetterError> {
        let prefix = format!("{}.dlq.", self.subjects.prefix());
        let mut all: Vec<Listed> = Vec::new();
        read_stream(&self.js, &self.dlq_stream, |subject, letter| {
            if let Some(id) = subject.strip_prefix(prefix.as_str()) {
                all.push(Listed {
                    id: id.to_owned(),
                    letter,
                });
            }
        })
        .await?;
        let last: HashMap<String, usize> = all
            .iter()
            .enumerate()
            .map(|(i, l)| (l.id.clone(), i))
            .collect();
        Ok(all
            .into_iter()
            .enumerate()
            .filter(|(i, l)| last.get(&l.id) == Some(i))
            .map(|(_, l)| l)
            .collect())
    }

    /// The dead letter of `task_id`.
    pub async fn dead_letter(
        &self,
        task_id: &str,
    ) -> Result<Option<StoredDeadLetter>, DeadLetterError> {
        let m = last_message_on(&self.dlq, &self.subjects.dead_letter(task_id)).await?;
        Ok(m.as_ref().map(StoredDeadLetter::from))
    }

    /// The kept outcome of `task_id`.
    pub async fn kept_outcome(
        &self,
        task_id: &str,
    ) -> Result<Option<Result<Outcome, DecodeError>>, DeadLetterError> {
        let m = last_message_on(&self.results, &self.subjects.result(task_id)).await?;
        Ok(m.map(|m| m.decode()))
    }

    /// Reads what [`plan_replay`] needs for `task_id` and asks it.
    pub async fn plan_replay(
        &self,
        task_id: &str,
    ) -> Result<Result<ReplayPlan, Refusal>, DeadLetterError> {
        let dead_letter = self.dead_letter(task_id).await?;
        let kept = match self.kept_outcome(task_id).await? {
            Some(Ok(k)) => Some(k),
            // An unreadable outcome neither succeeded nor counts as a generation.
            Some(Err(_)) | None => None,
        };
        Ok(plan_replay(
            task_id,
            &self.subjects,
            dead_letter,
            kept.as_ref(),
        ))
    }

    /// Carries out a replay: clears its attempts (first, so the replay never
    /// sees the old count), publishes the task and waits for its PubAck, then
    /// purges the dead letter that was read (a newer one, from the replay
    /// itself, stays).
    pub async fn replay(&self, plan: &ReplayPlan) -> Result<Ack, DeadLetterError> {
        self.clear_attempts(&plan.task_id).await?;
        let ack = Publisher::new(self.js.clone())
            .publish_generation(plan.message.clone(), plan.generation)
            .await?;
        let subject = self.subjects.dead_letter(&plan.task_id);
        self.dlq
            .purge()
            .filter(subject.clone())
            .sequence(plan.dead_letter_sequence.saturating_add(1))
            .await
            .map_err(|e| self.purge_error(&subject, e))?;
        Ok(ack)
    }

    /// Purges the dead letter of `task_id`; returns how many messages went.
    pub async fn purge(&self, task_id: &str) -> Result<u64, DeadLetterError> {
        self.purge_subject(self.subjects.dead_letter(task_id)).await
    }

    /// Purges every dead letter; returns how many messages went.
    pub async fn purge_all(&self) -> Result<u64, DeadLetterError> {
        self.purge_subject(self.subjects.dead_letters()).await
    }

    async fn purge_subject(&self, subject: String) -> Result<u64, DeadLetterError> {
        let r = self
            .dlq
            .purge()
            .filter(subject.clone())
            .await
            .map_err(|e| self.purge_error(&subject, e))?;
        Ok(r.purged)
    }

    async fn clear_attempts(&self, task_id: &str) -> Result<(), DeadLetterError> {
        let error = |message: String| DeadLetterError::Attempts {
            task_id: task_id.to_owned(),
            bucket: self.attempts_bucket.clone(),
            message,
        };
        let kv = self
            .js
            .get_key_value(self.attempts_bucket.as_str())
            .await
            .map_err(|e| error(e.to_string()))?;
        kv.purge(task_id).await.map_err(|e| error(e.to_string()))
    }

    fn purge_error(&self, subject: &str, e: impl ToString) -> DeadLetterError {
        DeadLetterError::Purge {
            subject: subject.to_owned(),
            stream: self.dlq_stream.clone(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fixtures::outcome;
    use batchd_actors::task::TaskError;
    use serde_json::{json, Value};

    fn letter(task: Value) -> DeadLetter {
        DeadLetter {
            task,
            error: TaskError::new(ErrorKind::ProviderRejected, "refused"),
            attempts: 1,
            dead_at: "2026-01-01T00:00:00.000Z".into(),
            subject: "batchd.tasks.p3".into(),
            raw_base64: None,
        }
    }

    fn stored(letter: DeadLetter, encoding: Encoding) -> StoredDeadLetter {
        StoredDeadLetter {
            sequence: 7,
            encoding: Some(encoding),
            letter: Ok(letter),
        }
    }

    fn kept(status: Status, generation: u32) -> Outcome {
        Outcome {
            generation,
            ..outcome(status)
        }
    }

    fn plan(
        dead_letter: Option<StoredDeadLetter>,
        kept: Option<&Outcome>,
    ) -> Result<ReplayPlan, Refusal> {
        plan_replay("a", &Subjects::new("batchd"), dead_letter, kept)
    }

    #[test]
    fn a_replay_is_the_next_generation_on_the_subject_it_arrived_on() {
        let task = json!({"task_id": "a", "payload": {"text": "hi"}});
        let first = plan(Some(stored(letter(task.clone()), Encoding::Json)), None).unwrap();
        assert_eq!(first.generation, 1);
        assert_eq!(first.message.msg_id, "a:g1");
        assert_eq!(first.message.subject, "batchd.tasks.p3");
        assert_eq!(first.message.content_type, "application/json");
        assert_eq!(
            serde_json::from_slice::<Value>(&first.message.body).unwrap(),
            task
        );
        assert_eq!(first.dead_letter_sequence, 7);

        let failed = kept(Status::Failed, 2);
        let third = plan(
            Some(stored(letter(task.clone()), Encoding::Json)),
            Some(&failed),
        )
        .unwrap();
        assert_eq!(
            (third.generation, third.message.msg_id.as_str()),
            (3, "a:g3")
        );
    }

    #[test]
    fn a_messagepack_task_is_replayed_in_messagepack() {
        let task = json!({"task_id": "a", "payload": {"text": "hi"}});
        let p = plan(
            Some(stored(letter(task.clone()), Encoding::MessagePack)),
            None,
        )
        .unwrap();
        assert_eq!(p.message.content_type, "application/msgpack");
        assert_eq!(
            rmp_serde::from_slice::<Value>(&p.message.body).unwrap(),
            task
        );
    }

    #[test]
    fn succeeded_missing_and_taskless_dead_letters_are_refused() {
        let task = json!({"task_id": "a"});
        let ok = kept(Status::Succeeded, 1);
        assert_eq!(
            plan(
                Some(stored(letter(task.clone()), Encoding::Json)),
                Some(&ok)
            ),
            Err(Refusal::Succeeded { generation: 1 })
        );
        assert_eq!(plan(None, None), Err(Refusal::NoDeadLetter));
        let mut raw = letter(Value::Null);
        raw.raw_base64 = Some("AAE=".into());
        assert_eq!(
            plan(Some(stored(raw, Encoding::Json)), None),
            Err(Refusal::NoTask)
        );
        let mut elsewhere = letter(task);
        elsewhere.subject = "other.tasks.p1".into();
        assert_eq!(
            plan(Some(stored(elsewhere, Encoding::Json)), None),
            Err(Refusal::NotATaskSubject("other.tasks.p1".into()))
        );
    }

    #[test]
    fn filters_select_by_kind_priority_and_age() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let l = letter(json!({}));
        let hour = Duration::from_secs(3600);
        assert!(Filter::default().matches(&l, now));
        let with = |f: Filter| f.matches(&l, now);
        assert!(with(Filter {
            kind: Some(ErrorKind::ProviderRejected),
            priority: Some(Priority::P3),
            older_than: Some(hour),
            newer_than: Some(hour),
        }));
        assert!(!with(Filter {
            kind: Some(ErrorKind::InvalidRequest),
            ..Filter::default()
        }));
        assert!(!with(Filter {
            priority: Some(Priority::P1),
            ..Filter::default()
        }));
        assert!(!with(Filter {
            older_than: Some(hour * 2),
            ..Filter::default()
        }));
        assert!(!with(Filter {
            newer_than: Some(hour / 2),
            ..Filter::default()
        }));
        let mut undated = l.clone();
        undated.dead_at = "yesterday".into();
        assert!(!Filter {
            newer_than: Some(hour),
            ..Filter::default()
        }
        .matches(&undated, now));
    }

    #[test]
    fn the_priority_is_the_last_token_of_the_task_subject() {
        assert_eq!(priority_of("batchd.tasks.p2"), Some(Priority::P2));
        assert_eq!(priority_of("batchd.tasks.x"), None);
    }
}
