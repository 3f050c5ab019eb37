//! Ownership records: exactly one replica holds a key (a task's call, a
//! checkpoint to resume, a provider job to poll) until its record expires.
//!
//! A record names its owner and the UTC time it expires. It is taken with a
//! create (only one replica's create of a missing key succeeds), renewed and
//! taken over with a revision-checked replace (only one replica's replace of
//! one revision succeeds), and released with a revision-checked delete. An
//! owner that dies stops renewing; once its record has expired any replica
//! takes it over. The store behind it ([`OwnershipStore`]) is a JetStream KV
//! bucket in the daemon and [`MemoryOwnership`] in tests.
//!
//! Expiry is read from the record, not from the bucket's age limit, so one
//! bucket serves records of different lifetimes and a server older than
//! per-message TTLs works; the bucket's `max_age` only sweeps records left by
//! owners that died. Replicas' clocks must agree to well within a TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// Who holds a key, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipRecord {
    /// The owner's name (a replica name).
    pub owner: String,
    /// When the record expires unless renewed (UTC).
    pub expires_at: DateTime<Utc>,
}

impl OwnershipRecord {
    /// True when `me` may take a key held by this record at `now`: it is
    /// mine already, or it has expired.
    pub fn may_be_taken_by(&self, me: &str, now: DateTime<Utc>) -> bool {
        self.owner == me || self.expires_at <= now
    }
}

/// Errors from an ownership store.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// The key exists (create) or its revision moved (replace, delete).
    #[error("ownership of {0}: someone else wrote it first")]
    Conflict(String),
    /// The store failed.
    #[error("ownership store: {0}")]
    Store(String),
}

/// Where ownership records live: create, revision-checked replace and
/// delete, read with the revision.
#[async_trait]
pub trait OwnershipStore: Send + Sync + 'static {
    /// The record at `key` and its revision; `None` when absent or deleted.
    async fn read(&self, key: &str) -> Result<Option<(OwnershipRecord, u64)>, OwnershipError>;
    /// Creates `key`; [`OwnershipError::Conflict`] when it exists.
    async fn create(&self, key: &str, record: &OwnershipRecord) -> Result<u64, OwnershipError>;
    /// Replaces `key` at `revision`; [`OwnershipError::Conflict`] when it moved.
    async fn replace(
        &self,
        key: &str,
        record: &OwnershipRecord,
        revision: u64,
    ) -> Result<u64, OwnershipError>;
    /// Deletes `key` at `revision`; [`OwnershipError::Conflict`] when it moved.
    async fn remove(&self, key: &str, revision: u64) -> Result<(), OwnershipError>;
}

/// A key this replica holds: what renew and release need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The key.
    pub key: String,
    /// The revision written by this replica.
    pub revision: u64,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// What [`Ownership::acquire`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// This replica holds the key now (new, its own, or taken over).
    Taken(Held),
    /// Another owner holds it and its record has not expired.
    HeldBy(OwnershipRecord),
}

/// Takes, renews and releases keys in one store as one owner, with one TTL.
#[derive(Clone)]
pub struct Ownership {
    store: Arc<dyn OwnershipStore>,
    owner: String,
    ttl: Duration,
    clock: Clock,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("owner", &self.owner)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Ownership {
    /// Records in `store` held as `owner` for `ttl` at a time, dated by `clock`.
    pub fn new(
        store: Arc<dyn OwnershipStore>,
        owner: &str,
        ttl: Duration,
        clock: Clock,
    ) -> Ownership {
        Ownership {
            store,
            owner: owner.to_owned(),
            ttl,
            clock,
        }
    }

    /// This owner's name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How long a record lives unless renewed.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn record(&self) -> OwnershipRecord {
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX);
        OwnershipRecord {
            owner: self.owner.clone(),
            expires_at: self.clock.now() + ttl,
        }
    }

    /// Takes `key`: one create when nobody holds it (the usual case, one
    /// round trip); else a read, and a replace when the record is ours or
    /// has expired. Two replicas racing for one key: exactly one wins.
    pub async fn acquire(&self, key: &str) -> Result<Acquired, OwnershipError> {
        let record = self.record();
        match self.store.create(key, &record).await {
            Ok(revision) => return Ok(self.taken(key, revision, &record)),
            Err(OwnershipError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        let Some((current, revision)) = self.store.read(key).await? else {
            // Released in between: one more create decides it.
            return match self.store.create(key, &record).await {
                Ok(revision) => Ok(self.taken(key, revision, &record)),
                Err(OwnershipError::Conflict(_)) => self.holder(key).await,
                Err(e) => Err(e),
            };
        };
        if !current.may_be_taken_by(&self.owner, self.clock.now()) {
            return Ok(Acquired::HeldBy(current));
        }
        match self.store.replace(key, &record, revision).await {
            Ok(revision) => Ok(self.taken(key, revision, &record)),
            Err(OwnershipError::Conflict(_)) => self.holder(key).await,
            Err(e) => Err(e),
        }
    }

    /// Who won a race for `key` this replica lost.
    async fn holder(&self, key: &str) -> Result<Acquired, OwnershipError> {
        match self.store.read(key).await? {
            Some((current, _)) => Ok(Acquired::HeldBy(current)),
            None => Err(OwnershipError::Conflict(key.to_owned())),
        }
    }

    fn taken(&self, key: &str, revision: u64, record: &OwnershipRecord) -> Acquired {
        Acquired::Taken(Held {
            key: key.to_owned(),
            revision,
            expires_at: record.expires_at,
        })
    }

    /// Extends a held key by one TTL. [`OwnershipError::Conflict`]: it was
    /// taken over (this replica stopped renewing for longer than the TTL)
    /// and is no longer ours.
    pub async fn renew(&self, held: &Held) -> Result<Held, OwnershipError> {
        let record = self.record();
        let revision = self
            .store
            .replace(&held.key, &record, held.revision)
            .await?;
        Ok(Held {
            key: held.key.clone(),
            revision,
            expires_at: record.expires_at,
        })
    }

    /// Gives a held key up at once (no wait for its expiry). A record taken
    /// over meanwhile is left to its new owner.
    pub async fn release(&self, held: Held) -> Result<(), OwnershipError> {
        match self.store.remove(&held.key, held.revision).await {
            Ok(()) | Err(OwnershipError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// When a held key should be renewed: a third of the TTL before it
    /// expires, so two renewals can fail before it is lost.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
}

/// Ownership records in memory, with revisions like a KV bucket's.
#[derive(Default)]
pub struct MemoryOwnership {
    inner: Mutex<MemoryRecords>,
}

#[derive(Default)]
struct MemoryRecords {
    next: u64,
    records: HashMap<String, (OwnershipRecord, u64)>,
    writes: u64,
    failing: bool,
}

impl MemoryOwnership {
    /// Writes so far (creates, replaces, deletes that succeeded).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Makes every call fail as a store that cannot be reached (or not).
    pub fn fail(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// The record at `key`, if any.
    pub fn get(&self, key: &str) -> Option<OwnershipRecord> {
        self.lock().records.get(key).map(|(r, _)| r.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryRecords> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The records, unless the store is failing.
    fn reach(&self) -> Result<std::sync::MutexGuard<'_, MemoryRecords>, OwnershipError> {
        let m = self.lock();
        if m.failing {
            return Err(OwnershipError::Store(
                "unreachable (failing on purpose)".into(),
            ));
        }
        Ok(m)
    }
}

impl MemoryRecords {
    fn write(&mut self, key: &str, record: &OwnershipRecord) -> u64 {
        self.next += 1;
        self.writes += 1;
        self.records
            .insert(key.to_owned(), (record.clone(), self.next));
        self.next
    }
}

#[async_trait]
impl OwnershipStore for MemoryOwnership {
    async fn read(&self, key: &str) -> Result<Option<(OwnershipRecord, u64)>, OwnershipError> {
        Ok(self.reach()?.records.get(key).cloned())
    }

    async fn create(&self, key: &str, record: &OwnershipRecord) -> Result<u64, OwnershipError> {
        let mut m = self.reach()?;
        if m.records.contains_key(key) {
            return Err(OwnershipError::Conflict(key.to_owned()));
        }
        Ok(m.write(key, record))
    }

    async fn replace(
        &self,
        key: &str,
        record: &OwnershipRecord,
        revision: u64,
    ) -> Result<u64, OwnershipError> {
        let mut m = self.reach()?;
        match m.records.get(key) {
            Some((_, r)) if *r == revision => Ok(m.write(key, record)),
            _ => Err(OwnershipError::Conflict(key.to_owned())),
        }
    }

    async fn remove(&self, key: &str, revision: u64) -> Result<(), OwnershipError> {
        let mut m = self.reach()?;
        match m.records.get(key) {
            Some((_, r)) if *r == revision => {
                m.records.remove(key);
                m.writes += 1;
                Ok(())
            }
            _ => Err(OwnershipError::Conflict(key.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_owners(ttl: Duration) -> (Arc<MemoryOwnership>, Ownership, Ownership) {
        let store = Arc::new(MemoryOwnership::default());
        let clock = Clock::following_tokio(Utc::now());
        let a = Ownership::new(store.clone(), "a", ttl, clock.clone());
        let b = Ownership::new(store.clone(), "b", ttl, clock);
        (store, a, b)
    }

    fn held(a: Acquired) -> Held {
        match a {
            Acquired::Taken(h) => h,
            Acquired::HeldBy(r) => panic!("held by {}", r.owner),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_owner_at_a_time_until_the_record_expires_then_another_takes_over() {
        let (store, a, b) = two_owners(Duration::from_secs(10));
        held(a.acquire("job.1").await.unwrap());
        assert_eq!(store.writes(), 1, "a free key costs one create");
        match b.acquire("job.1").await.unwrap() {
            Acquired::HeldBy(r) => assert_eq!(r.owner, "a"),
            Acquired::Taken(_) => panic!("b took a live record"),
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(matches!(
            b.acquire("job.1").await.unwrap(),
            Acquired::HeldBy(_)
        ));
        // a stops renewing (it died): after the TTL b takes over.
        tokio::time::advance(Duration::from_secs(1)).await;
        held(b.acquire("job.1").await.unwrap());
        assert_eq!(store.get("job.1").unwrap().owner, "b");
    }

    #[tokio::test(start_paused = true)]
    async fn renewing_keeps_a_record_and_a_renewal_after_a_takeover_is_refused() {
        let (_, a, b) = two_owners(Duration::from_secs(9));
        let mut h = held(a.acquire("ck.1").await.unwrap());
        assert_eq!(a.renew_every(), Duration::from_secs(3));
        for _ in 0..10 {
            tokio::time::advance(a.renew_every()).await;
            h = a.renew(&h).await.unwrap();
            assert!(matches!(
                b.acquire("ck.1").await.unwrap(),
                Acquired::HeldBy(_)
            ));
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        held(b.acquire("ck.1").await.unwrap());
        assert!(matches!(
            a.renew(&h).await,
            Err(OwnershipError::Conflict(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_retakes_its_own_record_and_a_released_key_is_free_at_once() {
        let (_, a, b) = two_owners(Duration::from_secs(60));
        let first = held(a.acquire("task.x").await.unwrap());
        let again = held(a.acquire("task.x").await.unwrap());
        assert!(
            again.revision > first.revision,
            "its own record is replaced"
        );
        a.release(again).await.unwrap();
        held(b.acquire("task.x").await.unwrap());
        // A stale release leaves the new owner's record alone.
        a.release(first).await.unwrap();
        assert_eq!(b.store.read("task.x").await.unwrap().unwrap().0.owner, "b");
    }

    #[tokio::test(start_paused = true)]
    async fn of_many_owners_racing_for_an_expired_key_exactly_one_wins() {
        let store = Arc::new(MemoryOwnership::default());
        let clock = Clock::following_tokio(Utc::now());
        let ttl = Duration::from_secs(5);
        let dead = Ownership::new(store.clone(), "dead", ttl, clock.clone());
        held(dead.acquire("k").await.unwrap());
        tokio::time::advance(ttl).await;
        let racers: Vec<Ownership> = (0..8)
            .map(|i| Ownership::new(store.clone(), &format!("r{i}"), ttl, clock.clone()))
            .collect();
        let results = futures::future::join_all(racers.iter().map(|o| o.acquire("k"))).await;
        let winners = results
            .iter()
            .filter(|r| matches!(r, Ok(Acquired::Taken(_))))
            .count();
        assert_eq!(winners, 1, "{results:?}");
    }
}
