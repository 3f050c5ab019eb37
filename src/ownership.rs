//! Ownership records ([`batchd_actors::ownership`]) in a JetStream KV
//! bucket, as JSON: a create takes a key, a revision-checked update renews
//! or takes it over, a revision-checked delete releases it.

use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use batchd_actors::ownership::{OwnershipError, OwnershipRecord, OwnershipStore};

/// How long the bucket keeps a record after its last write: it only sweeps
/// records of owners that died, so it outlasts any TTL batchd uses.
pub const OWNERS_MAX_AGE: Duration = Duration::from_secs(3600);

/// Ownership records over one KV bucket.
pub struct KvOwnership(pub kv::Store);

fn encode(key: &str, record: &OwnershipRecord) -> Result<bytes::Bytes, OwnershipError> {
    serde_json::to_vec(record)
        .map(Into::into)
        .map_err(|e| OwnershipError::Store(format!("encoding the record of {key}: {e}")))
}

fn wrong_revision(e: &kv::UpdateError) -> bool {
    // A revision-checked delete reports the server's "wrong last sequence"
    // (10071) without a kind of its own.
    e.kind() == kv::UpdateErrorKind::WrongLastRevision || e.to_string().contains("10071")
}

#[async_trait]
impl OwnershipStore for KvOwnership {
    async fn read(&self, key: &str) -> Result<Option<(OwnershipRecord, u64)>, OwnershipError> {
        let entry = self
            .0
            .entry(key)
            .await
            .map_err(|e| OwnershipError::Store(format!("reading {key}: {e}")))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value).map_err(|err| {
                    OwnershipError::Store(format!("the record of {key} is not one: {err}"))
                })?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn create(&self, key: &str, record: &OwnershipRecord) -> Result<u64, OwnershipError> {
        self.0
            .create(key, encode(key, record)?)
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => OwnershipError::Conflict(key.to_owned()),
                _ => OwnershipError::Store(format!("creating {key}: {e}")),
            })
    }

    async fn replace(
        &self,
        key: &str,
        record: &OwnershipRecord,
        revision: u64,
    ) -> Result<u64, OwnershipError> {
        self.0
            .update(key, encode(key, record)?, revision)
            .await
            .map_err(|e| {
                if wrong_revision(&e) {
                    OwnershipError::Conflict(key.to_owned())
                } else {
                    OwnershipError::Store(format!("updating {key}: {e}"))
                }
            })
    }

    async fn remove(&self, key: &str, revision: u64) -> Result<(), OwnershipError> {
        self.0
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| {
                if wrong_revision(&e) {
                    OwnershipError::Conflict(key.to_owned())
                } else {
                    OwnershipError::Store(format!("deleting {key}: {e}"))
                }
            })
    }
}
