//! Batches preempted by a process that died, resumed by the next one.
//!
//! A preempted batch's tasks keep their leases, so when the process is
//! killed their messages are redelivered once `ack_wait` passes, like any
//! other message it held. Its checkpoint stays in the store. At start the
//! engine reads every checkpoint ([`load`], before the Intake pulls). The
//! replica that preempted a batch holds the ownership record
//! `checkpoint.<batch id>` (KV `batchd-owners`) while the batch runs; a
//! checkpoint whose record another replica holds is left alone (that
//! replica still runs it, or died less than a TTL ago: the checkpoint is
//! looked at again when the record expires), so exactly one replica
//! resumes each. A replica restarted under the same name (`nats.replica`)
//! takes its own records back at once. A checkpoint whose record this
//! replica takes is judged ([`judge`], plain code):
//!
//! - of another layout version: logged and deleted (its tasks come back as
//!   ordinary tasks);
//! - its provider no longer configured: logged and deleted (its tasks are
//!   routed anew, by the current config);
//! - every remaining task has an outcome: deleted (nothing is left to do);
//! - else it is **adopted**: the task ids still without an outcome go into
//!   the [`Recovery`] index in the context, by task id.
//!
//! When a redelivered task of an adopted batch reaches the Assembler (same
//! route and priority as the checkpoint), it rejoins that batch instead of
//! an ordinary one; the batch is sealed under its old id when all its tasks
//! are back, or `recover_wait` after the first came back, and the Dispatcher
//! runs it ahead of the other work of its priority at the route, as a batch
//! that resumes. Its checkpoint is deleted when it completes. A task that
//! comes back after its batch was sealed goes into an ordinary batch. A task
//! with an outcome is never in the index: if its message comes back (a crash
//! between the outcome and the ack), the Dispatcher acks and skips it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use crate::call_claim::ClaimGuard;
use crate::context::EngineContext;
use crate::ownership::Acquired;
use crate::ports::{Checkpoint, CheckpointStore, CHECKPOINT_VERSION};
use crate::routing::Route;
use crate::task::Priority;

/// A batch read from its checkpoint, waiting for its tasks to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredBatch {
    /// Its id, kept in its outcomes.
    pub id: Arc<str>,
    /// Its route.
    pub route: Route,
    /// Its priority.
    pub priority: Priority,
    /// Tasks it had finished before the crash (carried into later checkpoints).
    pub finished: Vec<String>,
    /// Its tasks without an outcome, expected back.
    pub expected: BTreeSet<String>,
}

/// What becomes of one checkpoint read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Its tasks rejoin it as they come back.
    Adopt(RecoveredBatch),
    /// Every task it had left has an outcome: it is deleted.
    Done,
    /// It cannot be resumed here: logged and deleted; its tasks come back
    /// as ordinary tasks.
    Drop(&'static str),
}

/// Judges a checkpoint: `configured` says whether a provider is configured,
/// `has_outcome` whether a task has an outcome.
pub fn judge(
    cp: &Checkpoint,
    configured: impl Fn(&str) -> bool,
    has_outcome: impl Fn(&str) -> bool,
) -> Judgement {
    if cp.version != CHECKPOINT_VERSION {
        return Judgement::Drop("written by another layout version");
    }
    let priority = match cp.priority {
        2 => Priority::P2,
        3 => Priority::P3,
        _ => return Judgement::Drop("not of a bulk priority (2 or 3)"),
    };
    if !configured(&cp.provider) {
        return Judgement::Drop("its provider is no longer configured");
    }
    let expected: BTreeSet<String> = cp
        .remaining
        .iter()
        .filter(|id| !has_outcome(id))
        .cloned()
        .collect();
    if expected.is_empty() {
        return Judgement::Done;
    }
    Judgement::Adopt(RecoveredBatch {
        id: cp.batch_id.as_str().into(),
        route: Route {
            provider: cp.provider.clone(),
            model: cp.model.clone(),
        },
        priority,
        finished: cp.finished.clone(),
        expected,
    })
}

/// The adopted batches and, by task id, which one each expected task rejoins.
#[derive(Debug, Default)]
pub struct Recovery(Mutex<Index>);

#[derive(Debug, Default)]
struct Index {
    batches: HashMap<Arc<str>, RecoveredBatch>,
    by_task: HashMap<String, Arc<str>>,
    /// The ownership record of each adopted batch's checkpoint, renewed
    /// until the batch is sealed.
    held: HashMap<Arc<str>, ClaimGuard>,
}

impl Recovery {
    fn index(&self) -> MutexGuard<'_, Index> {
        // Two maps updated together under the lock, never across an await.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adopts a batch: its expected tasks rejoin it as they come back.
    pub fn adopt(&self, batch: RecoveredBatch) {
        let mut index = self.index();
        for task in &batch.expected {
            index.by_task.insert(task.clone(), batch.id.clone());
        }
        index.batches.insert(batch.id.clone(), batch);
    }

    /// The adopted batch `task_id` rejoins, with how many tasks it expects,
    /// when the task still travels on its route at its priority.
    pub fn batch_of(
        &self,
        task_id: &str,
        route: &Route,
        priority: Priority,
    ) -> Option<(Arc<str>, usize)> {
        let index = self.index();
        let id = index.by_task.get(task_id)?;
        let batch = index.batches.get(id)?;
        (batch.route == *route && batch.priority == priority)
            .then(|| (batch.id.clone(), batch.expected.len()))
    }

    /// [`Recovery::adopt`], keeping the checkpoint's ownership record
    /// renewed until the batch is sealed.
    pub fn adopt_held(&self, batch: RecoveredBatch, guard: ClaimGuard) {
        self.index().held.insert(batch.id.clone(), guard);
        self.adopt(batch);
    }

    /// Takes an adopted batch out when it is sealed: tasks of it that come
    /// back later go into ordinary batches.
    pub fn take(&self, id: &str) -> Option<RecoveredBatch> {
        let mut index = self.index();
        index.held.remove(id);
        let batch = index.batches.remove(id)?;
        for task in &batch.expected {
            index.by_task.remove(task);
        }
        Some(batch)
    }

    /// How many adopted batches still wait for their tasks.
    pub fn waiting(&self) -> usize {
        self.index().batches.len()
    }
}

/// Reads the checkpoints left by an earlier process, deletes those that
/// cannot or need not be resumed, and adopts the others. A store that
/// cannot be read costs the recovery, not the start: the tasks then come
/// back as ordinary tasks.
pub async fn load(ctx: &Arc<EngineContext>) {
    let store: &dyn CheckpointStore = &*ctx.ports.checkpoints;
    match store.drop_unreadable().await {
        Ok(dropped) => {
            for key in dropped {
                tracing::warn!(batch_id = %key, "checkpoint of an unknown layout deleted; its tasks are batched anew");
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable checkpoints not cleaned up"),
    }
    let checkpoints = match store.list().await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "checkpoints not read; preempted batches of an earlier process are batched anew");
            return;
        }
    };
    for cp in checkpoints {
        if let Some(wait) = take_up(ctx, &cp).await {
            tokio::spawn(take_up_later(ctx.clone(), cp, wait));
        }
    }
}

/// Looks at a checkpoint held by another replica again when its record
/// expires, until this replica takes it up or it is gone.
async fn take_up_later(ctx: Arc<EngineContext>, cp: Checkpoint, mut wait: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = ctx.stopping() => return,
        }
        match take_up(&ctx, &cp).await {
            Some(next) => wait = next,
            None => return,
        }
    }
}

/// The ownership key of a preempted batch's checkpoint.
pub fn owner_key(batch_id: &str) -> String {
    format!("checkpoint.{batch_id}")
}

/// Judges one checkpoint if this replica can take its ownership record.
/// A record another replica holds is left to it: that replica preempted the
/// batch and still runs (it renews the record), or died less than a TTL
/// ago; the answer is then how long until its record expires.
async fn take_up(ctx: &Arc<EngineContext>, cp: &Checkpoint) -> Option<Duration> {
    let key = owner_key(&cp.batch_id);
    let held = match ctx.call_owners.acquire(&key).await {
        Ok(Acquired::Taken(held)) => held,
        Ok(Acquired::HeldBy(record)) => {
            let wait = (record.expires_at - ctx.settings.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .saturating_add(Duration::from_millis(100));
            tracing::debug!(batch_id = %cp.batch_id, owner = %record.owner, ?wait, "checkpoint held by another replica; looked at again when its record expires");
            return Some(wait);
        }
        Err(e) => {
            tracing::warn!(batch_id = %cp.batch_id, error = %e, "checkpoint's ownership not taken; its tasks are batched anew");
            return None;
        }
    };
    let store: &dyn CheckpointStore = &*ctx.ports.checkpoints;
    let done = outcomes_of(ctx, &cp.remaining).await;
    let judgement = judge(
        cp,
        |provider| ctx.ports.providers.contains_key(provider),
        |task| done.contains(task),
    );
    match judgement {
        Judgement::Adopt(batch) => {
            tracing::info!(
                batch_id = %batch.id,
                route = %format_args!("{}/{}", batch.route.provider, batch.route.model),
                priority = batch.priority.number(),
                tasks = batch.expected.len(),
                "preempted batch of an earlier process adopted: its tasks rejoin it as they are redelivered"
            );
            let guard = ClaimGuard::keep(ctx.clone(), held);
            ctx.recovery.adopt_held(batch, guard);
        }
        Judgement::Done => {
            tracing::info!(batch_id = %cp.batch_id, "checkpoint of a batch whose tasks all have outcomes deleted");
            delete(store, &cp.batch_id).await;
        }
        Judgement::Drop(why) => {
            tracing::warn!(batch_id = %cp.batch_id, version = cp.version, provider = %cp.provider, reason = why, "checkpoint dropped; its tasks are batched anew");
            delete(store, &cp.batch_id).await;
        }
    }
    None
}

/// Which of `tasks` have an outcome (of any generation). A task whose check
/// fails counts as without one: it is then expected back, and the
/// Dispatcher's own check before the call still skips it.
async fn outcomes_of(ctx: &EngineContext, tasks: &[String]) -> HashSet<String> {
    let mut done = HashSet::new();
    for task in tasks {
        match ctx.ports.sink.outcome_exists(task, 0).await {
            Ok(true) => {
                done.insert(task.clone());
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(task_id = %task, error = %e, "outcome check failed"),
        }
    }
    done
}

async fn delete(store: &dyn CheckpointStore, batch_id: &str) {
    if let Err(e) = store.delete(batch_id).await {
        tracing::warn!(batch_id = %batch_id, error = %e, "checkpoint not deleted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            version: CHECKPOINT_VERSION,
            batch_id: "b_1".into(),
            provider: "p".into(),
            model: "m".into(),
            priority: 3,
            finished: vec!["t1".into()],
            remaining: vec!["t2".into(), "t3".into()],
            attempts: BTreeMap::new(),
            preempted_at: chrono::Utc::now(),
            reason: "p1_waiting".into(),
        }
    }

    fn route() -> Route {
        Route {
            provider: "p".into(),
            model: "m".into(),
        }
    }

    #[test]
    fn a_checkpoint_is_adopted_with_the_tasks_that_have_no_outcome() {
        let j = judge(&checkpoint(), |p| p == "p", |t| t == "t2");
        let Judgement::Adopt(b) = j else {
            panic!("{j:?}")
        };
        assert_eq!(&*b.id, "b_1");
        assert_eq!(b.expected.into_iter().collect::<Vec<_>>(), ["t3"]);
        assert_eq!(b.finished, ["t1"]);
        assert_eq!(b.priority, Priority::P3);
    }

    #[test]
    fn a_checkpoint_whose_tasks_all_have_outcomes_is_done() {
        assert_eq!(judge(&checkpoint(), |_| true, |_| true), Judgement::Done);
    }

    #[test]
    fn another_version_a_provider_gone_or_a_bad_priority_is_dropped() {
        let mut old = checkpoint();
        old.version = CHECKPOINT_VERSION + 1;
        assert!(matches!(
            judge(&old, |_| true, |_| false),
            Judgement::Drop(_)
        ));
        assert!(matches!(
            judge(&checkpoint(), |_| false, |_| false),
            Judgement::Drop(_)
        ));
        let mut p1 = checkpoint();
        p1.priority = 1;
        assert!(matches!(
            judge(&p1, |_| true, |_| false),
            Judgement::Drop(_)
        ));
    }

    #[test]
    fn a_task_rejoins_its_batch_only_on_the_same_route_and_priority_until_it_is_sealed() {
        let recovery = Recovery::default();
        let Judgement::Adopt(b) = judge(&checkpoint(), |_| true, |_| false) else {
            panic!("adopted")
        };
        recovery.adopt(b);
        assert_eq!(
            recovery.batch_of("t2", &route(), Priority::P3),
            Some(("b_1".into(), 2))
        );
        assert_eq!(recovery.batch_of("t2", &route(), Priority::P2), None);
        let other = Route {
            provider: "p".into(),
            model: "other".into(),
        };
        assert_eq!(recovery.batch_of("t2", &other, Priority::P3), None);
        assert_eq!(recovery.batch_of("t1", &route(), Priority::P3), None);
        assert_eq!(recovery.waiting(), 1);
        assert!(recovery.take("b_1").is_some());
        assert_eq!(recovery.batch_of("t3", &route(), Priority::P3), None);
        assert_eq!(recovery.waiting(), 0);
    }
}
