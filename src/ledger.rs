//! The engine's [`LedgerStore`] over two JetStream KV buckets: sheets of
//! call records in `nats.calls_bucket` (`sheet.<ULID>`, each written once,
//! kept two days: long enough to be counted after any restart) and daily
//! totals in `nats.ledger_bucket` (`day.<YYYY-MM-DD>.<tenant, base64url>`,
//! kept, every write a revision-checked `create` or `update`). `batchd cost`
//! and `batchd status` read the totals through the same type.
//!
//! A sheet this process writes is kept in memory (a few at most) from just
//! before its write until its own watch reaches it: the watch hands back
//! the records as written instead of decoding them again. The stored value
//! is their encoding, so what the watch yields is the same either way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use batchd_actors::ledger::{
    new_sheet_key, CallRecord, CallSheet, DayTotals, DAY_PREFIX, SHEET_PREFIX,
};
use batchd_actors::ports::{LedgerError, LedgerStore, SheetStream};
use batchd_actors::pricing::Picousd;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::config::Config;

/// How long a call record is kept: it must outlive any stop of batchd
/// after which it is still to be counted.
pub const CALLS_MAX_AGE: Duration = Duration::from_secs(2 * 86_400);

/// The most sheets kept for the watch: a watch that lags further decodes
/// the older ones.
const WRITTEN_MAX: usize = 64;

/// The ledger over JetStream KV.
#[derive(Clone)]
pub struct KvLedger {
    calls: kv::Store,
    days: kv::Store,
    written: Arc<Mutex<Written>>,
}

/// Sheets written here that the watch has not reached yet, by key (a
/// ULID: the oldest first). Kept from before the write, so the watch finds
/// them even when it sees the write before the writer hears it is stored.
#[derive(Default)]
struct Written {
    sheets: BTreeMap<String, Vec<CallRecord>>,
}

impl Written {
    /// Keeps the records about to be stored at `key`; the oldest kept
    /// go when more than [`WRITTEN_MAX`] are.
    fn keep(&mut self, key: String, records: Vec<CallRecord>) {
        self.sheets.insert(key, records);
        while self.sheets.len() > WRITTEN_MAX {
            self.sheets.pop_first();
        }
    }

    /// The records kept for `key`, once.
    fn take(&mut self, key: &str) -> Option<Vec<CallRecord>> {
        self.sheets.remove(key)
    }
}

async fn open_bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, LedgerError> {
    js.get_key_value(name)
        .await
        .map_err(|e| LedgerError::Store(format!("opening KV bucket {name}: {e}")))
}

impl KvLedger {
    /// Over two open buckets.
    pub fn new(calls: kv::Store, days: kv::Store) -> KvLedger {
        KvLedger {
            calls,
            days,
            written: Arc::default(),
        }
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Written> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the buckets the config names (they exist once batchd has run).
    pub async fn open(js: &jetstream::Context, config: &Config) -> Result<KvLedger, LedgerError> {
        Ok(KvLedger::new(
            open_bucket(js, &config.nats.calls_bucket).await?,
            open_bucket(js, &config.nats.ledger_bucket).await?,
        ))
    }

    fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<bytes::Bytes, LedgerError> {
        serde_json::to_vec(value)
            .map(Into::into)
            .map_err(|e| LedgerError::Store(format!("encoding {what}: {e}")))
    }
}

fn decode_day(key: &str, value: &[u8]) -> Result<DayTotals, LedgerError> {
    serde_json::from_slice(value)
        .map_err(|e| LedgerError::Store(format!("reading the totals at {key}: {e}")))
}

/// The sheet a watch entry holds: the records kept when this process wrote
/// it, or else its value decoded. `None` for a delete or an unreadable value.
fn sheet_of(
    written: &Mutex<Written>,
    entry: Result<kv::Entry, kv::WatcherError>,
) -> Option<Result<CallSheet, LedgerError>> {
    let entry = match entry {
        Ok(entry) => entry,
        Err(e) => {
            return Some(Err(LedgerError::Store(format!(
                "watching call sheets: {e}"
            ))))
        }
    };
    let kept = written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(&entry.key);
    if entry.operation != kv::Operation::Put {
        return None;
    }
    let records = match kept {
        Some(records) => records,
        None => match serde_json::from_slice(&entry.value) {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable call sheet skipped");
                return None;
            }
        },
    };
    Some(Ok(CallSheet {
        records,
        revision: entry.revision,
    }))
}

#[async_trait]
impl LedgerStore for KvLedger {
    async fn write_sheet(&self, records: &[CallRecord]) -> Result<u64, LedgerError> {
        let key = new_sheet_key();
        let value = Self::encode(&key, &records)?;
        self.calls
            .put(&key, value)
            .await
            .map_err(|e| LedgerError::Store(format!("writing {key}: {e}")))
    }

    async fn write_owned_sheet(&self, records: Vec<CallRecord>) -> Result<u64, LedgerError> {
        let key = new_sheet_key();
        let value = Self::encode(&key, &records)?;
        self.written().keep(key.clone(), records);
        let stored = self.calls.put(&key, value).await;
        stored.map_err(|e| {
            self.written().take(&key);
            LedgerError::Store(format!("writing {key}: {e}"))
        })
    }

    async fn create_sheet(&self, key: &str, records: &[CallRecord]) -> Result<u64, LedgerError> {
        let value = Self::encode(key, &records)?;
        self.calls.create(key, value).await.map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists {
                LedgerError::Conflict(key.to_owned())
            } else {
                LedgerError::Store(format!("creating {key}: {e}"))
            }
        })
    }

    async fn watch_sheets(&self) -> Result<SheetStream, LedgerError> {
        let watch = self
            .calls
            .watch_with_history(format!("{SHEET_PREFIX}>"))
            .await
            .map_err(|e| LedgerError::Store(format!("watching call sheets: {e}")))?;
        let written = self.written.clone();
        Ok(watch
            .filter_map(move |entry| futures::future::ready(sheet_of(&written, entry)))
            .boxed())
    }

    async fn read_day(&self, key: &str) -> Result<Option<(DayTotals, u64)>, LedgerError> {
        let entry = self
            .days
            .entry(key)
            .await
            .map_err(|e| LedgerError::Store(format!("reading {key}: {e}")))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode_day(key, &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn write_day(
        &self,
        key: &str,
        totals: &DayTotals,
        revision: Option<u64>,
    ) -> Result<u64, LedgerError> {
        let value = Self::encode(key, totals)?;
        match revision {
            Some(r) => self
                .days
                .update(key, value, r)
                .await
                .map_err(|e| update_err(key, &e)),
            None => self.days.create(key, value).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    LedgerError::Conflict(key.to_owned())
                } else {
                    LedgerError::Store(format!("creating {key}: {e}"))
                }
            }),
        }
    }

    async fn days(&self, prefix: &str) -> Result<Vec<(String, DayTotals, u64)>, LedgerError> {
        let wanted = format!("{DAY_PREFIX}{prefix}");
        let keys: Vec<String> = self
            .days
            .keys()
            .await
            .map_err(|e| LedgerError::Store(format!("listing the ledger: {e}")))?
            .try_filter(|k| std::future::ready(k.starts_with(&wanted)))
            .try_collect()
            .await
            .map_err(|e| LedgerError::Store(format!("listing the ledger: {e}")))?;
        let mut days = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((d, r)) = self.read_day(&key).await? {
                days.push((key, d, r));
            }
        }
        Ok(days)
    }
}

impl KvLedger {
    /// Spend on `day` (`YYYY-MM-DD`) over every tenant: (exact, estimated),
    /// in pico-dollars.
    pub async fn spend_on(&self, day: &str) -> Result<(Picousd, Picousd), LedgerError> {
        let mut exact = 0;
        let mut estimated = 0;
        for (_, d, _) in self.days(day).await? {
            for r in &d.rows {
                if r.estimated {
                    estimated += r.totals.cost_picousd;
                } else {
                    exact += r.totals.cost_picousd;
                }
            }
        }
        Ok((exact, estimated))
    }
}

fn update_err(key: &str, e: &kv::UpdateError) -> LedgerError {
    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
        LedgerError::Conflict(key.to_owned())
    } else {
        LedgerError::Store(format!("updating {key}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sheet(id: &str) -> Vec<CallRecord> {
        let at = chrono::DateTime::UNIX_EPOCH;
        vec![CallRecord::started(id, id.into(), "acme", "m", 2, at, 1)]
    }

    #[test]
    fn the_watch_takes_a_kept_sheet_once() {
        let mut w = Written::default();
        w.keep("sheet.01A".into(), sheet("a"));
        w.keep("sheet.01B".into(), sheet("b"));
        assert_eq!(w.take("sheet.01B"), Some(sheet("b")));
        assert_eq!(w.take("sheet.01B"), None, "taken once");
        assert_eq!(w.take("sheet.01C"), None, "another writer's sheet");
        assert_eq!(w.take("sheet.01A"), Some(sheet("a")));
        assert!(w.sheets.is_empty());
    }

    #[test]
    fn with_no_watch_at_most_a_few_sheets_are_kept() {
        let mut w = Written::default();
        for n in 0..(WRITTEN_MAX + 10) {
            w.keep(format!("sheet.{n:04}"), sheet("a"));
        }
        assert_eq!(w.sheets.len(), WRITTEN_MAX);
        assert_eq!(
            w.sheets.keys().next().map(String::as_str),
            Some("sheet.0010"),
            "the oldest dropped"
        );
    }
}
