//! Collecting outcomes: a subscription to the results subjects (opened before
//! anything is published, so no outcome slips by), direct gets for outcomes
//! that already existed (a rerun) or that the subscription missed, and the
//! wait until every published line has one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use batchd_actors::task::Outcome;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::lines::Line;
use crate::client::read::last_on;
use crate::client::{DecodeError, OutcomeSubscription, Subjects};
use crate::cmd::progress_bar;

/// Direct gets in flight while looking up existing outcomes.
const LOOKUP_CONCURRENCY: usize = 64;
/// First pause without any new outcome before missing ones are looked up again.
const FIRST_IDLE_SWEEP: Duration = Duration::from_secs(2);
const MAX_IDLE_SWEEP: Duration = Duration::from_secs(30);

/// What came back for one published task.
#[derive(Debug, Clone, PartialEq)]
pub enum Collected {
    /// Its outcome.
    Outcome(Box<Outcome>),
    /// Something was published on its results subject but could not be read.
    Unreadable(String),
}

impl From<Result<Outcome, DecodeError>> for Collected {
    fn from(decoded: Result<Outcome, DecodeError>) -> Collected {
        match decoded {
            Ok(o) => Collected::Outcome(Box::new(o)),
            Err(e) => Collected::Unreadable(format!("the outcome could not be decoded: {e}")),
        }
    }
}

/// The outcomes collected so far, one slot per line.
pub struct Collector {
    ids: HashMap<String, usize>,
    slots: Mutex<Vec<Option<Collected>>>,
    found: AtomicUsize,
    expected: usize,
    notify: Notify,
}

impl Collector {
    /// Empty slots for the lines that are published.
    pub fn new(lines: &[Line]) -> Collector {
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

    /// The slots, one per line (`None`: no outcome yet).
    pub fn take(&self) -> Vec<Option<Collected>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *slots)
    }
}

/// Records every outcome the subscription delivers.
pub async fn listen(mut sub: OutcomeSubscription, collector: Arc<Collector>) {
    while let Some((id, decoded)) = sub.next().await {
        collector.record(&id, decoded.into());
    }
}

/// Looks up, with a direct get of the last message on each results subject,
/// the outcomes not collected yet.
pub async fn lookup_missing(
    results: jetstream::stream::Stream,
    collector: Arc<Collector>,
    subjects: Subjects,
) {
    let missing = collector.missing();
    let mut lookups = futures::stream::iter(missing)
        .map(|id| {
            let results = &results;
            let subject = subjects.result(&id);
            async move { (id, last_on::<Outcome>(results, &subject).await) }
        })
        .buffer_unordered(LOOKUP_CONCURRENCY);
    let mut warned = false;
    while let Some((id, r)) = lookups.next().await {
        match r {
            Ok(Some(decoded)) => collector.record(&id, decoded.into()),
            Ok(None) => {}
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "looking up existing outcomes failed; relying on the subscription");
                    warned = true;
                }
            }
        }
    }
}

/// How the wait ended.
pub struct Waited {
    /// Time spent waiting.
    pub elapsed: Duration,
    /// Ended by ctrl-c.
    pub interrupted: bool,
}

/// Waits until every published line has an outcome, `timeout` passes or
/// ctrl-c; looks missing outcomes up whenever none arrive for a while.
pub async fn wait_for_outcomes(
    collector: &Arc<Collector>,
    results: &jetstream::stream::Stream,
    subjects: &Subjects,
    timeout: Duration,
) -> Waited {
    let started = Instant::now();
    let deadline = started + timeout;
    let pb = progress_bar(collector.expected, "outcomes");
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
                lookup_missing(results.clone(), collector.clone(), subjects.clone()).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::decode;
    use crate::client::fixtures::outcome;
    use batchd_actors::task::Status;

    fn decode_outcome(content_type: Option<&str>, payload: &[u8]) -> Collected {
        decode::<Outcome>(content_type, payload).into()
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
}
