//! Publishing with a bounded window of PubAcks in flight, and the server's
//! refusals sorted into what a producer can act on.

use std::future::Future;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use batchd_actors::ports::GENERATION_HEADER;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

/// PubAcks awaited at once by default: enough to keep the server busy,
/// bounded so a large input never floods the connection.
pub const PUBLISH_WINDOW: usize = 1024;

/// One message, published with `Nats-Msg-Id` (JetStream's duplicate check)
/// and `Content-Type`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The subject.
    pub subject: String,
    /// `Nats-Msg-Id`: the task id.
    pub msg_id: String,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body, published unchanged.
    pub body: Bytes,
}

/// What JetStream answered for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Stored: a new message.
    Stored,
    /// Dropped: its `Nats-Msg-Id` was already inside the duplicate window.
    Duplicate,
}

/// Why a message was not stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    /// The stream reached its limits and refuses new messages (backpressure).
    #[error("the stream on {subject} is full ({message})")]
    StreamFull {
        /// The subject published to.
        subject: String,
        /// The server's words.
        message: String,
    },
    /// No stream listens on the subject.
    #[error("no JetStream stream listens on {subject}")]
    NoStream {
        /// The subject published to.
        subject: String,
    },
    /// No PubAck in time: the server is overloaded or unreachable.
    #[error("no PubAck for a message on {subject} in time")]
    TimedOut {
        /// The subject published to.
        subject: String,
    },
    /// Anything else.
    #[error("publishing to {subject}: {message}")]
    Other {
        /// The subject published to.
        subject: String,
        /// What went wrong.
        message: String,
    },
}

impl PublishError {
    fn classify(subject: &str, e: jetstream::context::PublishError) -> PublishError {
        let subject = subject.to_owned();
        let message = e.to_string();
        let lower = message.to_ascii_lowercase();
        let full = [
            "maximum messages",
            "maximum bytes",
            "insufficient resources",
            "resource limits exceeded",
        ]
        .iter()
        .any(|s| lower.contains(s));
        match e.kind() {
            PublishErrorKind::StreamNotFound => PublishError::NoStream { subject },
            PublishErrorKind::TimedOut => PublishError::TimedOut { subject },
            _ if full => PublishError::StreamFull { subject, message },
            _ => PublishError::Other { subject, message },
        }
    }
}

/// What a run of publishes achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Messages with a PubAck, duplicates included.
    pub acked: usize,
    /// Of those, ids JetStream already had inside its duplicate window.
    pub duplicates: usize,
}

impl Published {
    /// Messages stored for the first time: each task among them gets one outcome.
    pub fn stored(&self) -> usize {
        self.acked - self.duplicates
    }
}

/// Publishing stopped at a refusal.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error} ({} accepted before)", published.acked)]
pub struct PublishFailure {
    /// The first refusal.
    pub error: PublishError,
    /// What was acked, the messages in flight at the refusal included.
    pub published: Published,
    /// Position, in input order, of the first message refused.
    pub first_refused: usize,
}

/// Publishes messages to JetStream.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    window: usize,
}

impl Publisher {
    /// A publisher with [`PUBLISH_WINDOW`] PubAcks in flight.
    pub fn new(js: jetstream::Context) -> Publisher {
        Publisher {
            js,
            window: PUBLISH_WINDOW,
        }
    }

    /// The same with at most `window` PubAcks in flight (at least one).
    pub fn with_window(mut self, window: usize) -> Publisher {
        self.window = window.max(1);
        self
    }

    /// Publishes one message and waits for its PubAck.
    pub async fn publish(&self, m: Outgoing) -> Result<Ack, PublishError> {
        self.send(m, None).await?.await
    }

    /// Publishes a task again as generation `generation` (≥ 1) and waits for
    /// its PubAck: `Batchd-Generation` is set, and `Nats-Msg-Id` is `m`'s
    /// (see [`batchd_actors::ports::message_id`]).
    pub async fn publish_generation(
        &self,
        m: Outgoing,
        generation: u32,
    ) -> Result<Ack, PublishError> {
        self.send(m, Some(generation)).await?.await
    }

    /// Publishes `messages` in order with up to the window of PubAcks in
    /// flight; `on_ack` sees every answer as it arrives. At the first
    /// refusal nothing more is sent; the answers in flight are awaited and
    /// counted, and the refusal is returned.
    pub async fn publish_all(
        &self,
        messages: impl IntoIterator<Item = Outgoing>,
        mut on_ack: impl FnMut(Ack),
    ) -> Result<Published, PublishFailure> {
        let mut run = Run {
            done: Published::default(),
            refused: None,
        };
        let mut in_flight = FuturesUnordered::new();
        for (i, m) in messages.into_iter().enumerate() {
            while in_flight.len() >= self.window {
                if let Some((i, r)) = in_flight.next().await {
                    run.settle(i, r, &mut on_ack);
                }
            }
            if run.refused.is_some() {
                break;
            }
            match self.send(m, None).await {
                Ok(ack) => in_flight.push(async move { (i, ack.await) }),
                Err(e) => {
                    run.settle(i, Err(e), &mut on_ack);
                    break;
                }
            }
        }
        while let Some((i, r)) = in_flight.next().await {
            run.settle(i, r, &mut on_ack);
        }
        match run.refused {
            None => Ok(run.done),
            Some((first_refused, error)) => Err(PublishFailure {
                error,
                published: run.done,
                first_refused,
            }),
        }
    }

    /// Sends one message, with `Batchd-Generation` when `generation` is
    /// given; the returned future resolves with its PubAck.
    async fn send(
        &self,
        m: Outgoing,
        generation: Option<u32>,
    ) -> Result<impl Future<Output = Result<Ack, PublishError>>, PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, m.msg_id.as_str());
        headers.insert("Content-Type", m.content_type);
        if let Some(n) = generation {
            headers.insert(GENERATION_HEADER, n.to_string().as_str());
        }
        let ack = self
            .js
            .publish_with_headers(m.subject.clone(), headers, m.body)
            .await
            .map_err(|e| PublishError::classify(&m.subject, e))?;
        Ok(async move {
            match ack.await {
                Ok(a) if a.duplicate => Ok(Ack::Duplicate),
                Ok(_) => Ok(Ack::Stored),
                Err(e) => Err(PublishError::classify(&m.subject, e)),
            }
        })
    }
}

/// The state of one [`Publisher::publish_all`].
struct Run {
    done: Published,
    /// The earliest refusal in input order.
    refused: Option<(usize, PublishError)>,
}

impl Run {
    fn settle(&mut self, i: usize, r: Result<Ack, PublishError>, on_ack: &mut impl FnMut(Ack)) {
        match r {
            Ok(ack) => {
                self.done.acked += 1;
                self.done.duplicates += usize::from(ack == Ack::Duplicate);
                on_ack(ack);
            }
            Err(e) => {
                if self.refused.as_ref().is_none_or(|(first, _)| i < *first) {
                    self.refused = Some((i, e));
                }
            }
        }
    }
}
