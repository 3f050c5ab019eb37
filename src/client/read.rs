//! The consumer side: outcomes and dead letters decoded in either encoding
//! (the `Content-Type` header read whatever its case), from a subscription,
//! a direct get of one subject, or a whole stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream::DirectGetErrorKind};
use async_nats::HeaderMap;
use batchd_actors::codec::encoding_for;
use batchd_actors::task::{Encoding, Outcome};
use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::Subjects;

/// How long reading a stream waits for its next message.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

/// Reading from NATS failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {message}")]
pub struct ReadError {
    what: String,
    message: String,
}

impl ReadError {
    fn new(what: impl Into<String>, message: impl ToString) -> ReadError {
        ReadError {
            what: what.into(),
            message: message.to_string(),
        }
    }
}

/// The `Content-Type` header, whatever the case of its name.
pub fn content_type(headers: Option<&HeaderMap>) -> Option<&str> {
    header(headers, "content-type")
}

/// A header's first value, whatever the case of its name.
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|(n, _)| AsRef::<str>::as_ref(n).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str())
}

/// Decodes a body in the encoding its `Content-Type` names (JSON without one).
pub fn decode<T: DeserializeOwned>(
    content_type: Option<&str>,
    payload: &[u8],
) -> Result<T, DecodeError> {
    match encoding_for(content_type) {
        Some(Encoding::Json) => {
            serde_json::from_slice(payload).map_err(|e| DecodeError(e.to_string()))
        }
        Some(Encoding::MessagePack) => {
            rmp_serde::from_slice(payload).map_err(|e| DecodeError(e.to_string()))
        }
        None => Err(DecodeError(format!(
            "unsupported Content-Type {:?}",
            content_type.unwrap_or_default()
        ))),
    }
}

/// Decodes a core NATS or JetStream message.
pub fn decode_message<T: DeserializeOwned>(m: &async_nats::Message) -> Result<T, DecodeError> {
    decode(content_type(m.headers.as_ref()), &m.payload)
}

/// Outcomes as they are published, by task id. Core NATS: a reader that
/// falls behind may miss some; the results stream has them all.
pub struct OutcomeSubscription {
    sub: async_nats::Subscriber,
    subjects: Subjects,
}

impl OutcomeSubscription {
    /// Subscribes to every outcome subject of `subjects`.
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &Subjects,
    ) -> Result<OutcomeSubscription, ReadError> {
        let all = subjects.results();
        let sub = client
            .subscribe(all.clone())
            .await
            .map_err(|e| ReadError::new(format!("subscribing to {all}"), e))?;
        Ok(OutcomeSubscription {
            sub,
            subjects: subjects.clone(),
        })
    }

    /// The next outcome and its task id; `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<(String, Result<Outcome, DecodeError>)> {
        loop {
            let m = self.sub.next().await?;
            if let Some(id) = self.subjects.task_id_of(m.subject.as_str()) {
                return Some((id.to_owned(), decode_message(&m)));
            }
        }
    }
}

/// One message as a stream stores it, not yet decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its `Content-Type` header.
    pub content_type: Option<String>,
    /// The body.
    pub payload: Bytes,
}

impl StoredMessage {
    /// The body decoded in the encoding its `Content-Type` names.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        decode(self.content_type.as_deref(), &self.payload)
    }

    /// The encoding its `Content-Type` names; `None` for an unsupported one.
    pub fn encoding(&self) -> Option<Encoding> {
        encoding_for(self.content_type.as_deref())
    }
}

/// The last message on `subject` of `stream` (a direct get); `Ok(None)`
/// when the subject has none.
pub async fn last_message_on(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<StoredMessage>, ReadError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(Some(StoredMessage {
            sequence: m.sequence,
            content_type: content_type(Some(&m.headers)).map(str::to_owned),
            payload: m.payload,
        })),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReadError::new(format!("reading {subject}"), e)),
    }
}

/// The last message on `subject` of `stream` (a direct get), decoded;
/// `Ok(None)` when the subject has none.
pub async fn last_on<T: DeserializeOwned>(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<Result<T, DecodeError>>, ReadError> {
    Ok(last_message_on(stream, subject).await?.map(|m| m.decode()))
}

/// Messages in `stream` now.
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> Result<u64, ReadError> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| ReadError::new(format!("opening stream {stream}"), e))?;
    let info = s
        .info()
        .await
        .map_err(|e| ReadError::new(format!("reading the state of {stream}"), e))?;
    Ok(info.state.messages)
}

/// Reads every message `stream` holds now, in order, and hands each one to
/// `each` with its subject, decoded. Returns how many were read.
pub async fn read_stream<T: DeserializeOwned>(
    js: &jetstream::Context,
    stream: &str,
    mut each: impl FnMut(&str, Result<T, DecodeError>),
) -> Result<u64, ReadError> {
    let total = stream_len(js, stream).await?;
    if total == 0 {
        return Ok(0);
    }
    let reading = |e: &dyn ToString| ReadError::new(format!("reading {stream}"), e.to_string());
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| ReadError::new(format!("opening stream {stream}"), e))?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| reading(&e))?;
    let mut messages = c.messages().await.map_err(|e| reading(&e))?;
    for _ in 0..total {
        let m = tokio::time::timeout(READ_TIMEOUT, messages.next())
            .await
            .map_err(|_| reading(&"timed out"))?
            .ok_or_else(|| reading(&"the stream ended early"))?
            .map_err(|e| reading(&e))?;
        each(m.subject.as_str(), decode_message(&m));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fixtures::outcome;
    use batchd_actors::task::Status;

    #[test]
    fn both_encodings_decode_and_unknown_types_are_refused() {
        let o = outcome(Status::Succeeded);
        let json = serde_json::to_vec(&o).unwrap();
        let mp = rmp_serde::to_vec_named(&o).unwrap();
        assert_eq!(decode::<Outcome>(None, &json), Ok(o.clone()));
        assert_eq!(
            decode::<Outcome>(Some("Application/MsgPack; charset=binary"), &mp),
            Ok(o)
        );
        let err = decode::<Outcome>(Some("text/plain"), b"x").unwrap_err();
        assert!(
            err.to_string().contains("unsupported Content-Type"),
            "{err}"
        );
    }

    #[test]
    fn the_content_type_header_is_found_whatever_its_case() {
        for name in ["Content-Type", "content-type", "CONTENT-TYPE"] {
            let mut h = HeaderMap::new();
            h.insert(name, "application/msgpack");
            assert_eq!(content_type(Some(&h)), Some("application/msgpack"));
        }
        assert_eq!(content_type(None), None);
        assert_eq!(content_type(Some(&HeaderMap::new())), None);
    }
}
