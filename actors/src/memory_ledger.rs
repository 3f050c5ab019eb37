//! A [`LedgerStore`] in memory, with the semantics of a JetStream KV bucket
//! that matter to the ledger: one revision counter for every write,
//! revision-checked updates, a watch that replays what is stored and then
//! follows. For engine tests and single-process tools.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::ledger::{CallRecord, CallSheet, CallState, DayTotals};
use crate::ports::{LedgerError, LedgerStore, SheetStream};

type Watcher = mpsc::UnboundedSender<Result<CallSheet, LedgerError>>;

#[derive(Default)]
struct State {
    revision: u64,
    sheets: Vec<CallSheet>,
    keys: std::collections::HashSet<String>,
    days: HashMap<String, (DayTotals, u64)>,
    watchers: Vec<Watcher>,
    fail_writes: bool,
    write_delay: std::time::Duration,
    in_flight: usize,
    most_in_flight: usize,
}

impl State {
    fn next(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }
}

/// The ledger in memory.
#[derive(Default)]
pub struct MemoryLedger(Mutex<State>);

impl MemoryLedger {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call the ledger counts or may count, as last recorded, by call
    /// id (calls the provider refused, and shared answers, are left out).
    pub fn calls(&self) -> Vec<CallRecord> {
        let mut last: BTreeMap<String, CallRecord> = BTreeMap::new();
        for sheet in &self.state().sheets {
            for r in &sheet.records {
                last.insert(r.call_id.clone(), r.clone());
            }
        }
        last.into_values()
            .filter(|r| !matches!(r.state, CallState::Refused | CallState::Shared))
            .collect()
    }

    /// How many sheets were written.
    pub fn sheet_count(&self) -> usize {
        self.state().sheets.len()
    }

    /// Every daily total stored.
    pub fn all_days(&self) -> Vec<DayTotals> {
        self.state().days.values().map(|(d, _)| d.clone()).collect()
    }

    /// Makes every sheet write fail (a store that is down).
    pub fn fail_writes(&self, fail: bool) {
        self.state().fail_writes = fail;
    }

    /// Makes every sheet write take `delay` (a store across a network).
    pub fn delay_writes(&self, delay: std::time::Duration) {
        self.state().write_delay = delay;
    }

    /// The most sheet writes that were in progress at once.
    pub fn most_writes_in_flight(&self) -> usize {
        self.state().most_in_flight
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
    async fn write_sheet(&self, records: &[CallRecord]) -> Result<u64, LedgerError> {
        self.create_sheet(&crate::ledger::new_sheet_key(), records)
            .await
    }

    async fn create_sheet(&self, key: &str, records: &[CallRecord]) -> Result<u64, LedgerError> {
        // A write takes a moment, as over the network.
        let delay = {
            let mut s = self.state();
            s.in_flight += 1;
            s.most_in_flight = s.most_in_flight.max(s.in_flight);
            s.write_delay
        };
        if delay.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state();
        s.in_flight -= 1;
        if s.fail_writes {
            return Err(LedgerError::Store("the store is down".into()));
        }
        if !s.keys.insert(key.to_owned()) {
            return Err(LedgerError::Conflict(key.to_owned()));
        }
        let sheet = CallSheet {
            records: records.to_vec(),
            revision: s.next(),
        };
        s.watchers.retain(|w| w.send(Ok(sheet.clone())).is_ok());
        let revision = sheet.revision;
        s.sheets.push(sheet);
        Ok(revision)
    }

    async fn watch_sheets(&self) -> Result<SheetStream, LedgerError> {
        let mut s = self.state();
        let (tx, rx) = mpsc::unbounded_channel();
        for sheet in &s.sheets {
            let _ = tx.send(Ok(sheet.clone()));
        }
        s.watchers.push(tx);
        Ok(stream_of(rx))
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

fn stream_of(mut rx: mpsc::UnboundedReceiver<Result<CallSheet, LedgerError>>) -> SheetStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
