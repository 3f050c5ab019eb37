//! The batches the Dispatcher is driving, each with a pause flag the
//! PreemptionMonitor sets and clears. Kept in the engine context, so a
//! restarted monitor finds which batches are preempted, and in what order.
//!
//! A preempted batch launches no new call: each of its tasks waits for the
//! flag to clear before it asks its route for admission (and leaves the
//! gate's queue if the flag is set while it waits there). Its calls in
//! flight finish normally; its waiting tasks keep their leases (the lease
//! keeper heartbeats them) and spend no attempt.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ports::{Checkpoint, CHECKPOINT_VERSION};
use crate::preemption_monitor::{BatchView, PreemptReason};
use crate::routing::Route;
use crate::task::Priority;

/// One running batch.
#[derive(Debug)]
pub struct BatchControl {
    /// Its id.
    pub id: Arc<str>,
    /// Its route.
    pub route: Route,
    /// Its priority.
    pub priority: Priority,
    /// When the Dispatcher started it.
    pub started_at: Instant,
    paused: watch::Sender<bool>,
    progress: Mutex<Progress>,
    /// The ownership record of its checkpoint, renewed while it runs.
    checkpoint_owner: Mutex<Option<crate::call_claim::ClaimGuard>>,
}

#[derive(Debug, Default)]
struct Progress {
    /// Tasks not yet done, with the attempts they had spent at the start.
    remaining: BTreeMap<String, u32>,
    finished: Vec<String>,
    in_flight: usize,
    /// When it was preempted (both clocks), while it is.
    preempted_at: Option<(Instant, DateTime<Utc>)>,
    checkpointed: bool,
    /// It was preempted and resumed (here or by an earlier process): its
    /// tasks queue ahead of the other work of its priority at the route.
    resumed: bool,
}

/// A call of a batch at the provider; counted until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a BatchControl);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut p = self.0.progress();
        p.in_flight = p.in_flight.saturating_sub(1);
    }
}

impl BatchControl {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        // Plain counters and lists, consistent between statements.
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while it is preempted.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Resolves at once while it runs, else when it resumes.
    pub async fn until_running(&self) {
        let mut rx = self.paused.subscribe();
        // An error means the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|paused| !*paused).await;
    }

    /// Resolves once it is preempted.
    pub async fn until_paused(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|paused| *paused).await;
    }

    /// Counts one call going out until the returned guard drops.
    pub fn call(&self) -> InFlight<'_> {
        self.progress().in_flight += 1;
        InFlight(self)
    }

    /// The batch is done with `task_id` (outcome, retry or requeue).
    pub fn task_done(&self, task_id: &str) {
        let mut p = self.progress();
        if p.remaining.remove(task_id).is_some() {
            p.finished.push(task_id.to_owned());
        }
    }

    /// Preempts it at `now` (`wall` on the UTC clock); false when it already was.
    pub fn pause(&self, now: Instant, wall: DateTime<Utc>) -> bool {
        {
            let mut p = self.progress();
            if p.preempted_at.is_some() {
                return false;
            }
            p.preempted_at = Some((now, wall));
        }
        self.paused.send_replace(true);
        true
    }

    /// Lets it launch calls again; false when it was not preempted.
    pub fn resume(&self) -> bool {
        let was = {
            let mut p = self.progress();
            let was = p.preempted_at.take().is_some();
            p.resumed |= was;
            was
        };
        self.paused.send_replace(false);
        was
    }

    /// True once it has resumed from a preemption: its tasks go ahead of
    /// the other work of its priority.
    pub fn is_resumed(&self) -> bool {
        self.progress().resumed
    }

    /// It resumes the checkpoint of an earlier process, which had finished
    /// `finished`: that checkpoint is deleted when it completes.
    pub fn adopt_checkpoint(&self, finished: Vec<String>) {
        let mut p = self.progress();
        p.finished = finished;
        p.checkpointed = true;
        p.resumed = true;
    }

    /// How the monitor sees it.
    pub fn view(&self) -> BatchView {
        let p = self.progress();
        BatchView {
            id: self.id.clone(),
            priority: self.priority,
            started_at: self.started_at,
            in_flight: p.in_flight,
            not_started: p.remaining.len().saturating_sub(p.in_flight),
            preempted_at: p.preempted_at.map(|(at, _)| at),
        }
    }

    /// Where it stands, for the checkpoint store; `None` unless preempted.
    pub fn checkpoint(&self, reason: PreemptReason) -> Option<Checkpoint> {
        let p = self.progress();
        let (_, wall) = p.preempted_at?;
        Some(Checkpoint {
            version: CHECKPOINT_VERSION,
            batch_id: self.id.to_string(),
            provider: self.route.provider.clone(),
            model: self.route.model.clone(),
            priority: self.priority.number(),
            finished: p.finished.clone(),
            remaining: p.remaining.keys().cloned().collect(),
            attempts: p.remaining.clone(),
            preempted_at: wall,
            reason: reason.as_str().to_owned(),
        })
    }

    /// Its checkpoint was written: it is deleted when the batch completes.
    pub fn mark_checkpointed(&self) {
        self.progress().checkpointed = true;
    }

    /// Keeps its checkpoint's ownership record renewed until it ends.
    pub fn hold_checkpoint(&self, guard: crate::call_claim::ClaimGuard) {
        *self
            .checkpoint_owner
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }

    /// True when a checkpoint of it was written.
    pub fn was_checkpointed(&self) -> bool {
        self.progress().checkpointed
    }
}

/// Every batch running in this engine, by id.
#[derive(Debug, Default)]
pub struct RunningBatches(Mutex<HashMap<Arc<str>, Arc<BatchControl>>>);

impl RunningBatches {
    fn map(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<BatchControl>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a batch that starts now with `tasks` (id, attempts spent).
    pub fn start(
        &self,
        id: Arc<str>,
        route: Route,
        priority: Priority,
        tasks: impl IntoIterator<Item = (String, u32)>,
    ) -> Arc<BatchControl> {
        let control = Arc::new(BatchControl {
            id: id.clone(),
            route,
            priority,
            started_at: Instant::now(),
            paused: watch::Sender::new(false),
            progress: Mutex::new(Progress {
                remaining: tasks.into_iter().collect(),
                ..Progress::default()
            }),
            checkpoint_owner: Mutex::new(None),
        });
        self.map().insert(id, control.clone());
        control
    }

    /// The batch ended.
    pub fn end(&self, id: &str) {
        self.map().remove(id);
    }

    /// One batch, while it runs.
    pub fn get(&self, id: &str) -> Option<Arc<BatchControl>> {
        self.map().get(id).cloned()
    }

    /// Every running batch.
    pub fn all(&self) -> Vec<Arc<BatchControl>> {
        self.map().values().cloned().collect()
    }

    /// How many are preempted now.
    pub fn preempted(&self) -> usize {
        self.map().values().filter(|b| b.is_paused()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (RunningBatches, Arc<BatchControl>) {
        let batches = RunningBatches::default();
        let route = Route {
            provider: "p".into(),
            model: "m".into(),
        };
        let tasks = [
            ("t1".to_owned(), 0),
            ("t2".to_owned(), 1),
            ("t3".to_owned(), 0),
        ];
        let c = batches.start("b_1".into(), route, Priority::P3, tasks);
        (batches, c)
    }

    #[tokio::test(start_paused = true)]
    async fn a_preempted_batch_checkpoints_what_it_finished_and_what_remains() {
        let (batches, c) = control();
        assert!(c.checkpoint(PreemptReason::PriorityOneWaiting).is_none());
        let call = c.call();
        c.task_done("t1");
        let wall = Utc::now();
        assert!(c.pause(Instant::now(), wall));
        assert!(!c.pause(Instant::now(), wall), "preempted once");
        let view = c.view();
        assert_eq!((view.in_flight, view.not_started), (1, 1));
        drop(call);
        let cp = c.checkpoint(PreemptReason::PriorityOneWaiting).unwrap();
        assert_eq!(cp.batch_id, "b_1");
        assert_eq!(cp.finished, ["t1"]);
        assert_eq!(cp.remaining, ["t2", "t3"]);
        assert_eq!(cp.attempts["t2"], 1);
        assert_eq!((cp.priority, cp.preempted_at), (3, wall));
        assert_eq!(cp.reason, "p1_waiting");
        assert_eq!(batches.preempted(), 1);
        assert!(c.resume());
        assert_eq!(batches.preempted(), 0);
        batches.end("b_1");
        assert!(batches.get("b_1").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_waits_while_its_batch_is_preempted() {
        let (_batches, c) = control();
        c.pause(Instant::now(), Utc::now());
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.until_running().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        c.resume();
        waiter.await.unwrap();
    }
}
