//! A [`LedgerStore`] in memory, with the semantics of a JetStream KV bucket
//! that matter to the ledger: one revision counter for every write,
//! revision-checked updates, a watch that replays what is stored and then
//! follows. For engine tests and single-process tools.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::ledger::{CallEvent, CallRecord, DayTotals};
use crate::ports::{CallEvents, LedgerError, LedgerStore};

#[derive(Default)]
struct State {
    revision: u64,
    calls: BTreeMap<String, (CallRecord, u64)>,
    days: HashMap<String, (DayTotals, u64)>,
    watchers: Vec<mpsc::UnboundedSender<Result<CallEvent, LedgerError>>>,
    fail_creates: bool,
}

impl State {
    fn next(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn notify(&mut self, event: CallEvent) {
        self.watchers.retain(|w| w.send(Ok(event.clone())).is_ok());
    }

    fn put_call(&mut self, record: &CallRecord) -> u64 {
        let revision = self.next();
        self.calls
            .insert(record.call_id.clone(), (record.clone(), revision));
        self.notify(CallEvent::Put {
            record: record.clone(),
            revision,
        });
        revision
    }
}

/// The ledger in memory.
#[derive(Default)]
pub struct MemoryLedger(Mutex<State>);

impl MemoryLedger {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call record stored, by call id.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.state()
            .calls
            .values()
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Every daily total stored.
    pub fn all_days(&self) -> Vec<DayTotals> {
        self.state().days.values().map(|(d, _)| d.clone()).collect()
    }

    /// Makes every `create_call` fail (a store that is down).
    pub fn fail_creates(&self, fail: bool) {
        self.state().fail_creates = fail;
    }

    /// Ends every watch with an error (a store connection lost).
    pub fn break_watches(&self) {
        let mut s = self.state();
        for w in s.watchers.drain(..) {
            let _ = w.send(Err(LedgerError::Store("watch lost".into())));
        }
    }
}

#[async_trait]
impl LedgerStore for MemoryLedger {
    async fn create_call(&self, record: &CallRecord) -> Result<u64, LedgerError> {
        let mut s = self.state();
        if s.fail_creates {
            return Err(LedgerError::Store("the store is down".into()));
        }
        if s.calls.contains_key(&record.call_id) {
            return Err(LedgerError::Conflict(record.key()));
        }
        Ok(s.put_call(record))
    }

    async fn update_call(&self, record: &CallRecord, revision: u64) -> Result<u64, LedgerError> {
        let mut s = self.state();
        match s.calls.get(&record.call_id) {
            Some((_, r)) if *r == revision => Ok(s.put_call(record)),
            _ => Err(LedgerError::Conflict(record.key())),
        }
    }

    async fn delete_call(&self, call_id: &str) -> Result<(), LedgerError> {
        let mut s = self.state();
        if s.calls.remove(call_id).is_some() {
            s.next();
            s.notify(CallEvent::Deleted {
                call_id: call_id.to_owned(),
            });
        }
        Ok(())
    }

    async fn watch_calls(&self) -> Result<CallEvents, LedgerError> {
        let mut s = self.state();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stored: Vec<&(CallRecord, u64)> = s.calls.values().collect();
        stored.sort_by_key(|(_, r)| *r);
        for (record, revision) in stored {
            let _ = tx.send(Ok(CallEvent::Put {
                record: record.clone(),
                revision: *revision,
            }));
        }
        s.watchers.push(tx);
        Ok(tokio_stream_of(rx))
    }

    async fn read_day(&self, key: &str) -> Result<Option<(DayTotals, u64)>, LedgerError> {
        Ok(self.state().days.get(key).cloned())
    }

    async fn write_day(
        &self,
        key: &str,
        totals: &DayTotals,
        revision: Option<u64>,
    ) -> Result<u64, LedgerError> {
        let mut s = self.state();
        let current = s.days.get(key).map(|(_, r)| *r);
        if current != revision {
            return Err(LedgerError::Conflict(key.to_owned()));
        }
        let r = s.next();
        s.days.insert(key.to_owned(), (totals.clone(), r));
        Ok(r)
    }

    async fn days(&self, prefix: &str) -> Result<Vec<(String, DayTotals, u64)>, LedgerError> {
        Ok(self
            .state()
            .days
            .iter()
            .filter(|(_, (d, _))| d.day.starts_with(prefix))
            .map(|(k, (d, r))| (k.clone(), d.clone(), *r))
            .collect())
    }
}

fn tokio_stream_of(mut rx: mpsc::UnboundedReceiver<Result<CallEvent, LedgerError>>) -> CallEvents {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
