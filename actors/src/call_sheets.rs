//! Call records written in groups. Every provider call is recorded twice
//! (before it goes out, and when it ends); one write per record would cost
//! a store round trip each. [`CallSheets`] groups them: a caller queues its
//! record and waits; whoever gets one of [`WRITERS`] turns to write takes
//! everything queued (up to [`MAX_SHEET`] records) and writes it as one
//! sheet. While sheets are being written the next one fills, so under load
//! a write carries many records; a lone call waits only for its own write,
//! and a few writes overlap, so the store's round trip never paces the
//! calls one sheet at a time.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::ledger::CallRecord;
use crate::ports::{LedgerError, LedgerStore};

/// The most records one sheet holds (a sheet stays far below a KV value's
/// size limit: a record is a few hundred bytes).
pub const MAX_SHEET: usize = 256;

/// The most sheet writes in progress at once.
pub const WRITERS: usize = 8;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Writes call records to the ledger store in sheets.
pub struct CallSheets {
    store: Arc<dyn LedgerStore>,
    queue: Mutex<Vec<(CallRecord, Waiter)>>,
    writing: tokio::sync::Semaphore,
}

impl CallSheets {
    /// Over a store.
    pub fn new(store: Arc<dyn LedgerStore>) -> CallSheets {
        CallSheets {
            store,
            queue: Mutex::default(),
            writing: tokio::sync::Semaphore::new(WRITERS),
        }
    }

    /// Records `record`; resolves once the sheet holding it is stored.
    ///
    /// A caller waits for its record's result and, meanwhile, for its turn
    /// to write: whichever comes first. A record written by another
    /// caller's sheet releases its caller at once (it does not take a turn
    /// to write nothing).
    pub async fn record(&self, record: CallRecord) -> Result<(), LedgerError> {
        let (tx, mut rx) = oneshot::channel();
        self.lock_queue().push((record, tx));
        loop {
            tokio::select! {
                biased;
                result = &mut rx => return Self::outcome(result),
                turn = self.writing.acquire() => {
                    // Writes what is queued: this record among it, unless
                    // more than a sheet queued ahead of it (then the loop
                    // waits for the next turn). Nothing queued: another
                    // write in progress carries this record.
                    let wrote = self.write_queued().await;
                    drop(turn);
                    if !wrote {
                        return Self::outcome(rx.await);
                    }
                }
            }
        }
    }

    fn outcome(
        result: Result<Result<(), String>, oneshot::error::RecvError>,
    ) -> Result<(), LedgerError> {
        match result {
            Ok(result) => result.map_err(LedgerError::Store),
            Err(_) => Err(LedgerError::Store(
                "the write of its call sheet was abandoned".into(),
            )),
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<(CallRecord, Waiter)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes up to a sheet of what is queued; false when nothing was.
    async fn write_queued(&self) -> bool {
        let taken: Vec<(CallRecord, Waiter)> = {
            let mut q = self.lock_queue();
            let n = q.len().min(MAX_SHEET);
            q.drain(..n).collect()
        };
        if taken.is_empty() {
            return false;
        }
        let (records, waiters): (Vec<CallRecord>, Vec<Waiter>) = taken.into_iter().unzip();
        let result = self
            .store
            .write_owned_sheet(records)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        for w in waiters {
            let _ = w.send(result.clone());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_ledger::MemoryLedger;

    fn record(id: &str) -> CallRecord {
        CallRecord::started(id, id.into(), "acme", "m", 3, chrono::Utc::now(), 1)
    }

    /// Records `n` calls, each from a task of its own, all at once.
    async fn record_at_once(store: &Arc<MemoryLedger>, n: usize) {
        let sheets = Arc::new(CallSheets::new(store.clone()));
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let sheets = sheets.clone();
                tokio::spawn(async move { sheets.record(record(&format!("c{i}"))).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn concurrent_records_share_sheets_and_each_is_stored_once() {
        let store = Arc::new(MemoryLedger::default());
        record_at_once(&store, 600).await;
        assert_eq!(store.calls().len(), 600, "every record stored once");
        let n = store.sheet_count();
        assert!(
            (3..600).contains(&n),
            "600 concurrent records in fewer sheets, none over {MAX_SHEET}: {n}"
        );
    }

    /// A store with a round trip: writes overlap (the round trip does not
    /// pace the calls one sheet at a time), at most [`WRITERS`] at once, and
    /// records queued meanwhile share sheets.
    #[tokio::test(start_paused = true)]
    async fn writes_overlap_up_to_the_writers_and_group_what_queues_meanwhile() {
        let store = Arc::new(MemoryLedger::default());
        store.delay_writes(std::time::Duration::from_millis(5));
        record_at_once(&store, 2000).await;
        assert_eq!(store.calls().len(), 2000, "every record stored once");
        assert_eq!(
            store.most_writes_in_flight(),
            WRITERS,
            "writes overlap up to the limit"
        );
        let n = store.sheet_count();
        assert!(
            n <= 2000 / 100,
            "2000 records queued together fill sheets: {n} sheets"
        );
    }

    #[tokio::test]
    async fn a_store_that_fails_fails_every_record_of_the_sheet() {
        let store = Arc::new(MemoryLedger::default());
        store.fail_writes(true);
        let sheets = CallSheets::new(store.clone());
        let err = sheets.record(record("c")).await.unwrap_err();
        assert!(err.to_string().contains("down"), "{err}");
        store.fail_writes(false);
        sheets.record(record("c")).await.unwrap();
        assert_eq!(store.calls().len(), 1);
    }
}
