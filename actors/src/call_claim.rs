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
//!
//! A replica that sees no other one running ([`crate::peers`], by default
//! `dispatch.claims = "auto"`) takes no claim: nobody could race it for a
//! call. It lists its calls in flight instead (in memory), and claims them
//! all the moment another replica's heartbeat appears.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::context::EngineContext;
use crate::ownership::{Acquired, Held, OwnershipError};

/// What the claim on a call says.
#[derive(Debug)]
pub enum ClaimCheck {
    /// This replica may call: it holds the claim (renewed until the guard
    /// is dropped), or no other replica is running (the call is listed, to
    /// be claimed should one appear before it ends).
    Ours(ClaimGuard),
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

/// Takes the claim on the call of `task_id` (generation `generation`), or,
/// when no other replica runs ([`crate::peers`]), lists the call as
/// unclaimed without a write.
pub async fn claim(ctx: &Arc<EngineContext>, task_id: &str, generation: u32) -> ClaimCheck {
    let key = key(task_id, generation);
    if !ctx.peers.claims_needed() {
        return ClaimCheck::Ours(ctx.unclaimed.list(ctx, key));
    }
    match ctx.call_owners.acquire(&key).await {
        Ok(Acquired::Taken(held)) => ClaimCheck::Ours(ClaimGuard::keep(ctx.clone(), held)),
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
/// For a call made while no other replica ran: its place in the list of
/// unclaimed calls, and the claim taken when another replica appeared.
#[derive(Debug)]
pub struct ClaimGuard(Guard);

enum Guard {
    Renewing(tokio::task::JoinHandle<()>),
    Listed { ctx: Arc<EngineContext>, id: u64 },
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Guard::Renewing(_) => f.write_str("Renewing"),
            Guard::Listed { id, .. } => f.debug_struct("Listed").field("id", id).finish(),
        }
    }
}

impl ClaimGuard {
    /// Starts renewing `held`.
    pub fn keep(ctx: Arc<EngineContext>, held: Held) -> ClaimGuard {
        ClaimGuard(Guard::Renewing(tokio::spawn(renew(ctx, held))))
    }

    /// True when the call is claimed (now or since it was listed).
    pub fn is_claimed(&self) -> bool {
        match &self.0 {
            Guard::Renewing(_) => true,
            Guard::Listed { ctx, id } => ctx.unclaimed.is_claimed(*id),
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        match &self.0 {
            Guard::Renewing(handle) => handle.abort(),
            Guard::Listed { ctx, id } => ctx.unclaimed.unlist(*id),
        }
    }
}

/// Renews `held` every third of its TTL.
async fn renew(ctx: Arc<EngineContext>, mut held: Held) {
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
}

/// Calls in flight that were made unclaimed (no other replica ran), so
/// they can be claimed the moment one appears.
#[derive(Debug, Default)]
pub struct UnclaimedCalls {
    calls: Mutex<Listed>,
}

#[derive(Debug, Default)]
struct Listed {
    next: u64,
    /// By id: the call's ownership key, and the task claiming it once
    /// another replica appeared.
    calls: HashMap<u64, (String, Option<tokio::task::JoinHandle<()>>)>,
}

impl UnclaimedCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, Listed> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn list(&self, ctx: &Arc<EngineContext>, key: String) -> ClaimGuard {
        let mut listed = self.lock();
        listed.next += 1;
        let id = listed.next;
        listed.calls.insert(id, (key, None));
        ClaimGuard(Guard::Listed {
            ctx: ctx.clone(),
            id,
        })
    }

    fn unlist(&self, id: u64) {
        if let Some((_, Some(claiming))) = self.lock().calls.remove(&id) {
            claiming.abort();
        }
    }

    fn is_claimed(&self, id: u64) -> bool {
        matches!(self.lock().calls.get(&id), Some((_, Some(_))))
    }

    /// How many calls in flight are listed (claimed since or not).
    pub fn len(&self) -> usize {
        self.lock().calls.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Claims every call in flight made while no other replica ran: another
/// one has appeared. Each claim is then renewed like any other until its
/// call's guard is dropped.
pub fn claim_in_flight(ctx: &Arc<EngineContext>) {
    let mut listed = ctx.unclaimed.lock();
    for (key, claiming) in listed.calls.values_mut() {
        if claiming.is_none() {
            *claiming = Some(tokio::spawn(claim_listed(ctx.clone(), key.clone())));
        }
    }
}

/// Takes the claim of a call already in flight, trying again while the
/// store cannot answer, then renews it.
async fn claim_listed(ctx: Arc<EngineContext>, key: String) {
    loop {
        match ctx.call_owners.acquire(&key).await {
            Ok(Acquired::Taken(held)) => return renew(ctx, held).await,
            Ok(Acquired::HeldBy(record)) => {
                tracing::warn!(%key, owner = %record.owner, "a call in flight here is claimed by another replica as well");
                return;
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "call in flight not claimed yet; trying again");
                tokio::time::sleep(RECHECK_AFTER).await;
            }
        }
    }
}
