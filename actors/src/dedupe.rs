//! Exact-duplicate requests answered by one call (`[dedupe]`, off by
//! default). Two tasks whose rendered requests are identical (model,
//! messages and parameters: the whole body) on the same route share a call:
//! the first to be admitted at its route leads and makes the call; a
//! duplicate that arrives while it is in flight, or within `window` after it
//! was answered, waits for its answer instead of calling. A lead whose call
//! fails (or that leaves to retry later) lets its followers go on to call
//! themselves, one of them leading the next call.
//!
//! The map lives in the engine's shared context, so it outlives a
//! Dispatcher restart; entries are pruned as they age out of the window.
//! Provider batch jobs share lines instead ([`crate::provider_jobs::mark_shared`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ports::Completion;

/// One call's answer, as its followers receive it.
#[derive(Debug, Clone)]
pub struct SharedAnswer {
    /// The ledger id of the call that was made.
    pub call_id: String,
    /// Its answer.
    pub completion: Completion,
}

type Answer = Option<Arc<SharedAnswer>>;

struct Entry {
    answer: watch::Receiver<Answer>,
    /// When it was answered; `None` while in flight.
    answered_at: Option<Instant>,
}

/// The calls in flight or answered within the window, by request body.
pub struct Dedupe {
    window: Option<Duration>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// What a task does about its request.
pub enum Join {
    /// Dedupe is off: call as usual.
    Off,
    /// Make the call and [`Lead::answer`] it.
    Lead(Lead),
    /// Wait for another task's call ([`follow`]).
    Follow(watch::Receiver<Answer>),
}

/// The task whose call others wait for. Dropped unanswered, it lets them go.
pub struct Lead {
    key: String,
    tx: watch::Sender<Answer>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    answered: bool,
}

impl Dedupe {
    /// Shares calls for `window` after their answer; `None` turns dedupe off.
    pub fn new(window: Option<Duration>) -> Dedupe {
        Dedupe {
            window,
            entries: Arc::default(),
        }
    }

    /// The key of a request: its route and the request body, byte for byte.
    pub fn key(provider: &str, request: &serde_json::Value) -> String {
        format!("{provider}\n{request}")
    }

    /// A call to wait for, if one with this key is in flight or answered
    /// within the window; never makes this task a lead.
    pub fn follow_existing(&self, key: &str) -> Option<watch::Receiver<Answer>> {
        let window = self.window?;
        let mut entries = self.lock();
        prune(&mut entries, window);
        entries.get(key).map(|e| e.answer.clone())
    }

    /// Joins the call for `key`: follows one in flight or answered within
    /// the window, or leads a new one.
    pub fn join(&self, key: String) -> Join {
        let Some(window) = self.window else {
            return Join::Off;
        };
        let mut entries = self.lock();
        prune(&mut entries, window);
        if let Some(e) = entries.get(&key) {
            return Join::Follow(e.answer.clone());
        }
        let (tx, rx) = watch::channel(None);
        entries.insert(
            key.clone(),
            Entry {
                answer: rx,
                answered_at: None,
            },
        );
        Join::Lead(Lead {
            key,
            tx,
            entries: self.entries.clone(),
            answered: false,
        })
    }

    /// Calls in flight or remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no call is in flight or remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn prune(entries: &mut HashMap<String, Entry>, window: Duration) {
    let now = Instant::now();
    entries.retain(|_, e| e.answered_at.is_none_or(|at| now < at + window));
}

impl Lead {
    /// Hands the answer to every follower, present and within the window.
    pub fn answer(mut self, answer: SharedAnswer) {
        self.answered = true;
        self.tx.send_replace(Some(Arc::new(answer)));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(&self.key) {
            e.answered_at = Some(Instant::now());
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // No answer: the entry goes, and followers see the channel close.
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(&self.key);
    }
}

/// Waits for the lead's answer; `None` when it went without one.
pub async fn follow(mut rx: watch::Receiver<Answer>) -> Option<Arc<SharedAnswer>> {
    match rx.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RateLimitInfo;
    use crate::task::Usage;

    fn answer(id: &str) -> SharedAnswer {
        SharedAnswer {
            call_id: id.into(),
            completion: Completion {
                output: Some("x".into()),
                finish_reason: Some("stop".into()),
                usage: Usage::default(),
                limits: RateLimitInfo::default(),
                service_tier: None,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_follow_one_lead_within_the_window_only() {
        let d = Dedupe::new(Some(Duration::from_millis(100)));
        let Join::Lead(lead) = d.join("k".into()) else {
            panic!("first joiner leads");
        };
        let Join::Follow(during) = d.join("k".into()) else {
            panic!("second joiner follows");
        };
        assert!(matches!(d.join("other".into()), Join::Lead(_)));
        lead.answer(answer("c1"));
        assert_eq!(follow(during).await.unwrap().call_id, "c1");
        tokio::time::advance(Duration::from_millis(99)).await;
        let after = d.follow_existing("k").expect("still in the window");
        assert_eq!(follow(after).await.unwrap().call_id, "c1");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(d.follow_existing("k").is_none());
        assert!(matches!(d.join("k".into()), Join::Lead(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lead_without_an_answer_releases_its_followers() {
        let d = Dedupe::new(Some(Duration::from_secs(1)));
        let Join::Lead(lead) = d.join("k".into()) else {
            panic!("first joiner leads");
        };
        let Join::Follow(rx) = d.join("k".into()) else {
            panic!("second joiner follows");
        };
        drop(lead);
        assert!(follow(rx).await.is_none());
        assert!(d.is_empty());
        assert!(matches!(d.join("k".into()), Join::Lead(_)));
    }

    #[test]
    fn off_shares_nothing() {
        let d = Dedupe::new(None);
        assert!(matches!(d.join("k".into()), Join::Off));
        assert!(d.follow_existing("k").is_none());
    }
}
