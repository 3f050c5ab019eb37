//! The claim, across replicas, on one task's provider call: before a call
//! goes out its replica takes the ownership record `call.<task id>.g<generation>`
//! (see [`crate::ownership`]) and keeps it renewed while the call lasts. A
//! copy of the task redelivered to another replica meanwhile (its lease
//! lapsed, its replica lost NATS for a while) finds the record held and is
//! handed back until it expires, instead of billing the task a second time.
//!
//! The record is taken concurrently with the call's ledger record, so it adds
//! no round trip to a call's path; it is renewed until the task's outcome is
//! durable and then left to expire (no second write): a later copy finds the
//! outcome first. When the store cannot answer (NATS failing over) no call
//! goes out unclaimed: the task is handed back and tried again a moment later.

use std::sync::Arc;
use std::time::Duration;

use crate::context::EngineContext;
use crate::ownership::{Acquired, Held, OwnershipError};

/// What the claim on a call says.
#[derive(Debug)]
pub enum ClaimCheck {
    /// This replica holds the claim and may call.
    Ours(Held),
    /// Another replica holds it, for `wait` more at most.
    Elsewhere {
        /// The replica holding it.
        owner: String,
        /// Until its record expires unless renewed.
        wait: Duration,
    },
    /// The store could not say (NATS failing over, say): no call goes out
    /// unclaimed, the task is handed back for `wait`.
    Unknown {
        /// How long to hand it back for.
        wait: Duration,
    },
}

/// How long a task whose claim could not be checked is handed back for.
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// The ownership key of a task's call.
pub fn key(task_id: &str, generation: u32) -> String {
    format!("call.{task_id}.g{generation}")
}

/// Takes the claim on the call of `task_id` (generation `generation`).
pub async fn claim(ctx: &EngineContext, task_id: &str, generation: u32) -> ClaimCheck {
    match ctx.call_owners.acquire(&key(task_id, generation)).await {
        Ok(Acquired::Taken(held)) => ClaimCheck::Ours(held),
        Ok(Acquired::HeldBy(record)) => ClaimCheck::Elsewhere {
            wait: (record.expires_at - ctx.settings.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO),
            owner: record.owner,
        },
        Err(e) => {
            tracing::warn!(task_id, error = %e, "call not claimed across replicas; the task is handed back and tried again");
            ClaimCheck::Unknown {
                wait: RECHECK_AFTER,
            }
        }
    }
}

/// Keeps a claim renewed, every third of its TTL, until dropped: from the
/// call until its outcome is durable (a publish retried across a NATS
/// failover included), so no other replica calls for the task meanwhile.
#[derive(Debug)]
pub struct ClaimGuard(tokio::task::JoinHandle<()>);

impl ClaimGuard {
    /// Starts renewing `held`.
    pub fn keep(ctx: Arc<EngineContext>, mut held: Held) -> ClaimGuard {
        ClaimGuard(tokio::spawn(async move {
            loop {
                tokio::time::sleep(ctx.call_owners.renew_every()).await;
                match ctx.call_owners.renew(&held).await {
                    Ok(h) => held = h,
                    Err(OwnershipError::Conflict(_)) => {
                        tracing::warn!(key = %held.key, "claim on a call in flight was taken over (renewals failed for a whole TTL)");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(key = %held.key, error = %e, "claim on a call in flight not renewed; trying again");
                    }
                }
            }
        }))
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
