//! # Assembler
//!
//! Owns the open batches, keyed by priority, route (provider, model) and
//! shared prompt prefix. A batch is opened for the size its priority's
//! policy gives for the last sampled queue depth
//! ([`crate::batching::BatchPolicy::size_for`], [`crate::context::EngineContext::depths`]),
//! and sealed when it reaches that size or when its first task has waited
//! `max_wait`; sealed batches go to the Dispatcher. A task whose deadline
//! has passed by the time its batch is sealed gets `expired` instead.
//!
//! Receives: [`AssemblerMsg`]. Sends: [`DispatcherMsg::Dispatch`]; outcomes
//! of expired tasks to the sink.
//!
//! A task of a batch preempted by an earlier process
//! ([`crate::recovery`]) rejoins that batch instead: it is sealed under its
//! old id once all its tasks are back, or `recover_wait` after the first
//! came back.
//!
//! On restart: open batches die with the old state; their leases nak on drop
//! and JetStream redelivers the tasks to the Intake (tasks of a resumed
//! batch then find it again: it leaves the recovery index only when sealed).

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::batching::{fill_ratio, is_full, BatchKey};
use crate::context::EngineContext;
use crate::messages::{Accepted, AssemblerMsg, Batch, DispatcherMsg, Resumed};
use crate::outcome;
use crate::task::{ErrorKind, TaskError};

/// The Assembler actor.
pub struct Assembler;

struct OpenBatch {
    generation: u64,
    /// The size it seals at, chosen when it was opened.
    size: usize,
    tasks: Vec<Accepted>,
}

/// The Assembler's state.
pub struct AssemblerState {
    ctx: Arc<EngineContext>,
    open: HashMap<BatchKey, OpenBatch>,
    next_generation: u64,
    /// Batches of an earlier process whose tasks are coming back, by id.
    resuming: HashMap<Arc<str>, Resuming>,
}

/// A batch of an earlier process gathering its redelivered tasks.
struct Resuming {
    key: BatchKey,
    /// How many tasks it waits for.
    expected: usize,
    tasks: Vec<Accepted>,
}

impl Actor for Assembler {
    type Msg = AssemblerMsg;
    type State = AssemblerState;
    type Arguments = Arc<EngineContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<AssemblerMsg>,
        ctx: Arc<EngineContext>,
    ) -> Result<AssemblerState, ActorProcessingErr> {
        Ok(AssemblerState {
            ctx,
            open: HashMap::new(),
            next_generation: 0,
            resuming: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AssemblerMsg>,
        msg: AssemblerMsg,
        state: &mut AssemblerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AssemblerMsg::Task(accepted) => state.add(&myself, *accepted),
            AssemblerMsg::SealDue { key, generation } => {
                if state
                    .open
                    .get(&key)
                    .is_some_and(|b| b.generation == generation)
                {
                    state.seal(&key);
                }
            }
            AssemblerMsg::ResumedDue { batch } => state.seal_resumed(&batch),
            AssemblerMsg::Flush(reply) => {
                let keys: Vec<BatchKey> = state.open.keys().cloned().collect();
                for key in keys {
                    state.seal(&key);
                }
                let resuming: Vec<Arc<str>> = state.resuming.keys().cloned().collect();
                for id in resuming {
                    state.seal_resumed(&id);
                }
                let _ = reply.send(());
            }
            AssemblerMsg::InjectFault => panic!("fault injected into the assembler"),
        }
        Ok(())
    }
}

impl AssemblerState {
    fn add(&mut self, myself: &ActorRef<AssemblerMsg>, accepted: Accepted) {
        let key = BatchKey {
            priority: accepted.task.priority,
            kind: accepted.plan.kind,
            route: accepted.plan.route.clone(),
            prefix: accepted.plan.prefix,
        };
        let Some(accepted) = self.rejoin(myself, key.clone(), accepted) else {
            return;
        };
        let policy = self.ctx.settings.batch_policy(key.priority, key.kind);
        let batch = match self.open.get_mut(&key) {
            Some(b) => b,
            None => {
                let generation = self.next_generation;
                self.next_generation += 1;
                let due_key = key.clone();
                myself.send_after(policy.max_wait(), move || AssemblerMsg::SealDue {
                    key: due_key,
                    generation,
                });
                let size = policy.size_for(self.ctx.depths.get(key.priority));
                self.open.entry(key.clone()).or_insert(OpenBatch {
                    generation,
                    size,
                    tasks: Vec::with_capacity(size.min(1024)),
                })
            }
        };
        let drained = accepted.drained && policy.seal_when_drained;
        batch.tasks.push(accepted);
        if drained || is_full(batch.tasks.len(), batch.size) {
            self.seal(&key);
        }
    }

    fn seal(&mut self, key: &BatchKey) {
        let Some(open) = self.open.remove(key) else {
            return;
        };
        let tasks = self.unexpired(open.tasks);
        if tasks.is_empty() {
            return;
        }
        self.send(Batch {
            id: format!("b_{}", ulid::Ulid::new()),
            key: key.clone(),
            fill_ratio: fill_ratio(tasks.len(), open.size),
            tasks,
            resumed: None,
        });
    }

    /// The tasks whose deadline has not passed; the others get `expired`.
    fn unexpired(&self, tasks: Vec<Accepted>) -> Vec<Accepted> {
        let now = self.ctx.settings.clock.now();
        let (expired, tasks): (Vec<Accepted>, Vec<Accepted>) = tasks
            .into_iter()
            .partition(|a| a.task.deadline.is_some_and(|dl| dl <= now));
        for a in expired {
            let error = TaskError::new(
                ErrorKind::Expired,
                "the task's deadline passed while it waited in a batch",
            );
            outcome::fail_accepted(&self.ctx, a, error);
        }
        tasks
    }

    fn send(&self, batch: Batch) {
        match self.ctx.directory.dispatcher() {
            // A failed send drops the batch: its leases nak and the tasks come back.
            Some(d) => {
                let _ = d.cast(DispatcherMsg::Dispatch(batch));
            }
            None => drop(batch),
        }
    }

    /// Adds `accepted` to the batch of an earlier process it belongs to, if
    /// any (sealing it when all its tasks are back); else hands it back.
    fn rejoin(
        &mut self,
        myself: &ActorRef<AssemblerMsg>,
        key: BatchKey,
        accepted: Accepted,
    ) -> Option<Accepted> {
        let Some((id, expected)) =
            self.ctx
                .recovery
                .batch_of(&accepted.task.task_id, &key.route, key.priority)
        else {
            return Some(accepted);
        };
        let resuming = self.resuming.entry(id.clone()).or_insert_with(|| {
            let due = id.clone();
            let wait = self.ctx.settings.preemption.recover_wait;
            myself.send_after(wait, move || AssemblerMsg::ResumedDue { batch: due });
            Resuming {
                key,
                expected,
                tasks: Vec::new(),
            }
        });
        resuming.tasks.push(accepted);
        if resuming.tasks.len() >= resuming.expected {
            self.seal_resumed(&id);
        }
        None
    }

    /// Seals a batch of an earlier process under its old id with the tasks
    /// that came back; later ones go into ordinary batches.
    fn seal_resumed(&mut self, id: &Arc<str>) {
        let Some(resuming) = self.resuming.remove(id) else {
            return;
        };
        let Some(recovered) = self.ctx.recovery.take(id) else {
            return;
        };
        let tasks = self.unexpired(resuming.tasks);
        tracing::info!(
            batch_id = %id,
            tasks = tasks.len(),
            expected = resuming.expected,
            "batch of an earlier process resumes under its id"
        );
        if tasks.is_empty() {
            return;
        }
        self.send(Batch {
            id: id.to_string(),
            key: resuming.key,
            fill_ratio: fill_ratio(tasks.len(), resuming.expected),
            tasks,
            resumed: Some(Resumed {
                finished: recovered.finished,
            }),
        });
    }
}
