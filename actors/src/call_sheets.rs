//! Call records written in groups. Every provider call is recorded twice
//! (before it goes out, and when it ends); one write per record would cost
//! a store round trip each. [`CallSheets`] groups them: a caller queues its
//! record and waits; whoever finds no write in progress takes everything
//! queued (up to [`MAX_SHEET`] records) and writes it as one sheet. While a
//! sheet is being written the next one fills, so under load a write carries
//! many records, and a lone call still waits only for its own write.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::ledger::CallRecord;
use crate::ports::{LedgerError, LedgerStore};

/// The most records one sheet holds (a sheet stays far below a KV value's
/// size limit: a record is a few hundred bytes).
pub const MAX_SHEET: usize = 256;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Writes call records to the ledger store in sheets.
pub struct CallSheets {
    store: Arc<dyn LedgerStore>,
    queue: Mutex<Vec<(CallRecord, Waiter)>>,
    writing: tokio::sync::Mutex<()>,
}

impl CallSheets {
    /// Over a store.
    pub fn new(store: Arc<dyn LedgerStore>) -> CallSheets {
        CallSheets {
            store,
            queue: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Records `record`; resolves once the sheet holding it is stored.
    pub async fn record(&self, record: CallRecord) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.lock_queue().push((record, tx));
        {
            let _writer = self.writing.lock().await;
            // Another caller may have written this record meanwhile; then
            // this writes what queued since, or nothing.
            self.write_queued().await;
        }
        match rx.await {
            Ok(result) => result.map_err(LedgerError::Store),
            Err(_) => Err(LedgerError::Store(
                "the write of its call sheet was abandoned".into(),
            )),
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<(CallRecord, Waiter)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn write_queued(&self) {
        let taken: Vec<(CallRecord, Waiter)> = {
            let mut q = self.lock_queue();
            let n = q.len().min(MAX_SHEET);
            q.drain(..n).collect()
        };
        if taken.is_empty() {
            return;
        }
        let (records, waiters): (Vec<CallRecord>, Vec<Waiter>) = taken.into_iter().unzip();
        let result = self
            .store
            .write_sheet(&records)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_ledger::MemoryLedger;

    fn record(id: &str) -> CallRecord {
        CallRecord::started(id, id.into(), "acme", "m", 3, chrono::Utc::now(), 1)
    }

    #[tokio::test]
    async fn concurrent_records_share_sheets_and_each_is_stored_once() {
        let store = Arc::new(MemoryLedger::default());
        let sheets = Arc::new(CallSheets::new(store.clone()));
        let calls: Vec<_> = (0..600)
            .map(|i| {
                let sheets = sheets.clone();
                tokio::spawn(async move { sheets.record(record(&format!("c{i}"))).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert_eq!(store.calls().len(), 600, "every record stored once");
        let n = store.sheet_count();
        assert!(
            (3..600).contains(&n),
            "600 concurrent records in fewer sheets, none over {MAX_SHEET}: {n}"
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
