//! Tenant lanes: fair intake across tenants within one priority.
//!
//! A JetStream consumer delivers in stream order, so a tenant that publishes
//! a million tasks ahead of another's hundred would hold every place in
//! flight until its backlog drains. A producer may therefore publish on a
//! **lane**, `<prefix>.tasks.p<N>.<tenant>`, beside the plain
//! `<prefix>.tasks.p<N>`. The tasks stream holds both; each lane with work
//! gets its own durable consumer (`<consumer_prefix>-p<N>-t-<lane id>`,
//! `intake.lane_max_ack_pending` in flight, deleted by the server after an
//! hour unused), found by listing the stream's lane subjects every
//! `intake.lane_discover_ms`. The plain consumer and every lane feed one
//! queue whose waiting senders are served in turn, so each lane with work
//! gets the same share of the intake: round-robin, whatever their depths.
//!
//! The lane is only a place in the queue: the task's `tenant` field stays
//! what budgets and the ledger read.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use batchd_actors::lease::Acker;
use batchd_actors::ports::{Delivery, SourceError};
use batchd_actors::task::Priority;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// One message from a lane or the plain consumer.
pub type Item = Result<Delivery<Box<dyn Acker>>, SourceError>;

/// How lanes are found and bounded.
#[derive(Debug, Clone)]
pub struct LaneSettings {
    /// Most lanes pulled at once per priority (0: lanes off).
    pub max_lanes: usize,
    /// Messages in flight per lane.
    pub max_ack_pending: i64,
    /// How often the stream's lane subjects are listed.
    pub discover_every: Duration,
    /// Messages per pull request.
    pub fetch_batch: usize,
    /// Redelivery timeout.
    pub ack_wait: Duration,
}

/// The lane id in a consumer name: the tenant token in hex when short, else
/// a 64-bit FNV-1a hash of it (names must stay short and use only letters,
/// digits, `-` and `_`).
pub fn lane_id(token: &str) -> String {
    if token.len() <= 24 {
        return token.bytes().map(|b| format!("{b:02x}")).collect();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in token.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("h{h:016x}")
}

/// The durable consumer name of one lane.
pub fn lane_consumer(consumer_prefix: &str, p: Priority, token: &str) -> String {
    format!("{consumer_prefix}-{}-t-{}", p.token(), lane_id(token))
}

/// Merges the plain consumer's messages with those of every lane of `p`
/// that has work, each served in turn. Ends when the plain consumer's
/// stream ends (the intake then opens it again); lanes and their listing
/// stop when the returned stream is dropped.
pub fn merged(
    tasks: stream::Stream,
    plain: BoxStream<'static, Item>,
    p: Priority,
    subject: String,
    consumer_prefix: String,
    settings: LaneSettings,
    to_delivery: fn(Priority, async_nats::jetstream::Message) -> Item,
) -> BoxStream<'static, Item> {
    // A small queue: each lane waits its turn to put one message in it.
    let (tx, rx) = mpsc::channel::<Item>(1);
    let (plain_done, done) = oneshot::channel::<()>();
    let plain_tx = tx.clone();
    let plain_forwarder = tokio::spawn(async move {
        let mut plain = plain;
        while let Some(m) = plain.next().await {
            if plain_tx.send(m).await.is_err() {
                return;
            }
        }
        let _ = plain_done.send(());
    });
    let forwarders = vec![plain_forwarder];
    if settings.max_lanes > 0 {
        tokio::spawn(discover(
            tasks,
            p,
            subject,
            consumer_prefix,
            settings,
            to_delivery,
            tx,
            forwarders,
        ));
    } else {
        tokio::spawn(async move {
            tx.closed().await;
            for f in forwarders {
                f.abort();
            }
        });
    }
    futures::stream::unfold((rx, done), |(mut rx, mut done)| async move {
        tokio::select! {
            biased;
            m = rx.recv() => m.map(|m| (m, (rx, done))),
            // The plain stream ended (or its forwarder is gone): end too.
            _ = &mut done => None,
        }
    })
    .boxed()
}

fn forward(mut messages: BoxStream<'static, Item>, tx: mpsc::Sender<Item>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    })
}

/// Lists the lane subjects with work every `discover_every` and opens a
/// consumer for each new one (up to `max_lanes`); closes lanes that stayed
/// empty for three rounds.
#[allow(clippy::too_many_arguments)]
async fn discover(
    tasks: stream::Stream,
    p: Priority,
    subject: String,
    consumer_prefix: String,
    settings: LaneSettings,
    to_delivery: fn(Priority, async_nats::jetstream::Message) -> Item,
    tx: mpsc::Sender<Item>,
    plain: Vec<JoinHandle<()>>,
) {
    let mut lanes: HashMap<String, (JoinHandle<()>, u32)> = HashMap::new();
    let filter = format!("{subject}.*");
    let mut tick = tokio::time::interval(settings.discover_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tx.closed() => break,
        }
        let with_work: HashMap<String, usize> = match tasks.info_with_subjects(&filter).await {
            Ok(info) => match info.try_collect().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "listing lane subjects");
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "listing lane subjects");
                continue;
            }
        };
        // Lanes with nothing stored for three rounds close (their
        // messages in flight keep their acks).
        lanes.retain(|s, (handle, idle)| {
            if with_work.get(s).copied().unwrap_or(0) > 0 {
                *idle = 0;
            } else {
                *idle += 1;
            }
            let keep = *idle < 3 && !handle.is_finished();
            if !keep {
                handle.abort();
            }
            keep
        });
        let mut new: Vec<&String> = with_work
            .iter()
            .filter(|(s, n)| **n > 0 && !lanes.contains_key(*s))
            .map(|(s, _)| s)
            .collect();
        new.sort();
        for lane_subject in new {
            if lanes.len() >= settings.max_lanes {
                tracing::debug!(subject = %lane_subject, "every lane is taken; this one waits for a free one");
                break;
            }
            let token = lane_subject.rsplit('.').next().unwrap_or_default();
            match open_lane(&tasks, p, lane_subject, &consumer_prefix, token, &settings).await {
                Ok(messages) => {
                    let messages = messages
                        .map(move |m| match m {
                            Ok(msg) => to_delivery(p, msg),
                            Err(e) => Err(SourceError(e.to_string())),
                        })
                        .boxed();
                    lanes.insert(lane_subject.clone(), (forward(messages, tx.clone()), 0));
                    tracing::debug!(subject = %lane_subject, "lane opened");
                }
                Err(e) => {
                    tracing::warn!(subject = %lane_subject, error = %e, "could not open a tenant lane; trying again");
                }
            }
        }
    }
    for (_, (h, _)) in lanes {
        h.abort();
    }
    for h in plain {
        h.abort();
    }
}

async fn open_lane(
    tasks: &stream::Stream,
    p: Priority,
    lane_subject: &str,
    consumer_prefix: &str,
    token: &str,
    s: &LaneSettings,
) -> Result<consumer::pull::Stream, String> {
    let name = lane_consumer(consumer_prefix, p, token);
    let c: consumer::PullConsumer = tasks
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: lane_subject.to_owned(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: s.ack_wait,
                max_deliver: -1,
                max_ack_pending: s.max_ack_pending,
                inactive_threshold: Duration::from_secs(3600),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {name}: {e}"))?;
    c.stream()
        .max_messages_per_batch(s.fetch_batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| format!("consumer {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_consumer_names_are_valid_and_distinct() {
        let a = lane_consumer("batchd", Priority::P3, "acme");
        assert_eq!(a, "batchd-p3-t-61636d65");
        let long = "x".repeat(200);
        let l = lane_consumer("batchd", Priority::P3, &long);
        assert!(l.len() < 40, "{l}");
        assert_ne!(l, lane_consumer("batchd", Priority::P3, &"y".repeat(200)));
        for name in [a, l, lane_consumer("batchd", Priority::P1, "ü é/+")] {
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{name}"
            );
        }
    }
}
