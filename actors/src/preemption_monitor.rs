//! # PreemptionMonitor
//!
//! Owns the decision to preempt bulk batches for priority-1 work and to
//! resume them ([`PreemptionPolicy`], plain code under a given clock), and
//! carries it out through the batches' pause flags
//! ([`crate::batch_control`]): a preempted batch launches no new call, its
//! calls in flight finish, its checkpoint goes to the [`CheckpointStore`]
//! (deleted by the Dispatcher when the batch completes).
//!
//! Receives: [`PreemptionMsg`]. A beat beside it asks for a look at once
//! when a priority-1 call has to wait at a route (the gates signal it), and
//! every `interval` otherwise. Sends: nothing; it sets flags in the context.
//!
//! On restart: the pause flags and preemption times live in the context, so
//! the new incarnation adopts the preempted batches in their order and
//! resumes them as the old one would have.
//!
//! Rules, per route:
//!
//! - while priority-1 calls wait at the route's gate, bulk batches running on
//!   it are preempted, priority 3 before priority 2 and the newest first,
//!   until the calls the preempted batches still have in flight (each counted
//!   as at least one) cover the priority-1 calls waiting: those slots go to
//!   priority 1 as the calls end, and older bulk batches, nearer their end,
//!   keep going on what priority 1 leaves;
//! - a batch with nothing left to launch is never preempted (there is
//!   nothing to stop);
//! - once no priority-1 call has waited at the route for `resume_after`, its
//!   preempted batches resume, in the order they were preempted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::context::EngineContext;
use crate::messages::PreemptionMsg;
use crate::metrics;
use crate::ports::CheckpointStore;
use crate::routing::Route;
use crate::task::Priority;

/// How preemption is decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreemptionSettings {
    /// Off: bulk batches are never preempted (priority 1 stays strict at the gate).
    pub enabled: bool,
    /// How long a route must have had no priority-1 call waiting before its
    /// preempted batches resume: the room kept for the next arrival of a burst.
    pub resume_after: Duration,
    /// How often the monitor looks when nothing signals it (resumes are
    /// decided on this beat; preemptions at once on a priority-1 arrival).
    pub interval: Duration,
    /// After a restart, how long a batch preempted by the earlier process
    /// waits for the rest of its redelivered tasks once the first is back.
    pub recover_wait: Duration,
}

impl Default for PreemptionSettings {
    fn default() -> Self {
        PreemptionSettings {
            enabled: true,
            resume_after: Duration::from_millis(500),
            interval: Duration::from_millis(50),
            recover_wait: Duration::from_secs(2),
        }
    }
}

/// A bulk batch running on a route, as the monitor sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchView {
    /// Its id.
    pub id: Arc<str>,
    /// Its priority (a priority-1 batch is never preempted).
    pub priority: Priority,
    /// When the Dispatcher started it.
    pub started_at: Instant,
    /// Its calls at the provider now.
    pub in_flight: usize,
    /// Its tasks whose call has not gone out yet.
    pub not_started: usize,
    /// When it was preempted, while it is.
    pub preempted_at: Option<Instant>,
}

/// One route: what waits at its gate and what runs on it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteView {
    /// Provider and model.
    pub route: Route,
    /// Priority-1 calls waiting at its gate.
    pub p1_waiting: usize,
    /// Batches running on it.
    pub batches: Vec<BatchView>,
}

/// Why a batch was preempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptReason {
    /// Priority-1 calls waited at its route.
    PriorityOneWaiting,
}

impl PreemptReason {
    /// As written in checkpoints.
    pub fn as_str(self) -> &'static str {
        match self {
            PreemptReason::PriorityOneWaiting => "p1_waiting",
        }
    }
}

/// What the monitor orders.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    /// Stop launching this batch's calls.
    Preempt {
        /// The batch.
        batch: Arc<str>,
        /// Its route.
        route: Route,
        /// Why.
        reason: PreemptReason,
    },
    /// Let it launch again.
    Resume {
        /// The batch.
        batch: Arc<str>,
    },
}

/// The preemption decision: which batches stop, which resume.
#[derive(Debug)]
pub struct PreemptionPolicy {
    resume_after: Duration,
    /// Preempted batches in the order they were preempted.
    preempted: Vec<(Arc<str>, Route)>,
    /// The last moment priority 1 was seen waiting, per route.
    p1_seen: HashMap<Route, Instant>,
}

impl PreemptionPolicy {
    /// A policy that resumes after `resume_after` without priority 1 waiting.
    pub fn new(resume_after: Duration) -> PreemptionPolicy {
        PreemptionPolicy {
            resume_after,
            preempted: Vec::new(),
            p1_seen: HashMap::new(),
        }
    }

    /// Batches preempted and not yet resumed, in the order they were preempted.
    pub fn preempted(&self) -> impl Iterator<Item = &Arc<str>> {
        self.preempted.iter().map(|(id, _)| id)
    }

    /// What to do at `now`, given every route.
    pub fn decide(&mut self, now: Instant, routes: &[RouteView]) -> Vec<Order> {
        self.reconcile(routes);
        let mut orders = Vec::new();
        for view in routes {
            if view.p1_waiting > 0 {
                self.p1_seen.insert(view.route.clone(), now);
                self.preempt_for(view, &mut orders);
            }
        }
        let quiet = |policy: &PreemptionPolicy, route: &Route| {
            let waiting = routes.iter().any(|v| &v.route == route && v.p1_waiting > 0);
            let since = policy
                .p1_seen
                .get(route)
                .map_or(Duration::MAX, |seen| now.saturating_duration_since(*seen));
            !waiting && since >= policy.resume_after
        };
        let (resume, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.preempted)
            .into_iter()
            .partition(|(_, route)| quiet(self, route));
        self.preempted = keep;
        orders.extend(resume.into_iter().map(|(batch, _)| Order::Resume { batch }));
        let live: Vec<&Route> = routes.iter().map(|v| &v.route).collect();
        self.p1_seen.retain(|route, seen| {
            live.contains(&route) && now.saturating_duration_since(*seen) < self.resume_after
        });
        orders
    }

    /// Forgets batches that ended; adopts batches preempted by an earlier
    /// incarnation (after a restart), in the order they were preempted.
    fn reconcile(&mut self, routes: &[RouteView]) {
        let running = |id: &Arc<str>| {
            routes.iter().any(|v| {
                v.batches
                    .iter()
                    .any(|b| &b.id == id && b.preempted_at.is_some())
            })
        };
        self.preempted.retain(|(id, _)| running(id));
        let mut adopted: Vec<(Instant, Arc<str>, Route)> = routes
            .iter()
            .flat_map(|v| {
                v.batches.iter().filter_map(|b| {
                    let at = b.preempted_at?;
                    let known = self.preempted.iter().any(|(id, _)| id == &b.id);
                    (!known).then(|| (at, b.id.clone(), v.route.clone()))
                })
            })
            .collect();
        adopted.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        self.preempted
            .extend(adopted.into_iter().map(|(_, id, route)| (id, route)));
    }

    fn preempt_for(&mut self, view: &RouteView, orders: &mut Vec<Order>) {
        let mut covered: usize = view
            .batches
            .iter()
            .filter(|b| b.preempted_at.is_some())
            .map(|b| b.in_flight.max(1))
            .sum();
        let mut candidates: Vec<&BatchView> = view
            .batches
            .iter()
            .filter(|b| b.priority != Priority::P1 && b.preempted_at.is_none())
            .filter(|b| b.not_started > 0)
            .collect();
        // Priority 3 first, then 2; the newest first within each.
        candidates.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| b.started_at.cmp(&a.started_at))
                .then_with(|| a.id.cmp(&b.id))
        });
        for b in candidates {
            if covered >= view.p1_waiting {
                break;
            }
            covered += b.in_flight.max(1);
            self.preempted.push((b.id.clone(), view.route.clone()));
            orders.push(Order::Preempt {
                batch: b.id.clone(),
                route: view.route.clone(),
                reason: PreemptReason::PriorityOneWaiting,
            });
        }
    }
}

/// The PreemptionMonitor actor.
pub struct PreemptionMonitor;

/// The monitor's state: the policy and the beat that asks it to look.
pub struct MonitorState {
    ctx: Arc<EngineContext>,
    policy: PreemptionPolicy,
    beat: JoinHandle<()>,
}

impl Drop for MonitorState {
    fn drop(&mut self) {
        self.beat.abort();
    }
}

impl Actor for PreemptionMonitor {
    type Msg = PreemptionMsg;
    type State = MonitorState;
    type Arguments = Arc<EngineContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<PreemptionMsg>,
        ctx: Arc<EngineContext>,
    ) -> Result<MonitorState, ActorProcessingErr> {
        let settings = ctx.settings.preemption;
        let beat = tokio::spawn(beat(myself, ctx.clone(), settings.interval));
        Ok(MonitorState {
            ctx,
            policy: PreemptionPolicy::new(settings.resume_after),
            beat,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<PreemptionMsg>,
        msg: PreemptionMsg,
        state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PreemptionMsg::Look(reply) => {
                state.look().await;
                let _ = reply.send(());
            }
            PreemptionMsg::InjectFault => panic!("fault injected into the preemption monitor"),
        }
        Ok(())
    }
}

/// Asks the monitor to look when a priority-1 call waits, and on every
/// `interval`; one look at a time.
async fn beat(myself: ActorRef<PreemptionMsg>, ctx: Arc<EngineContext>, interval: Duration) {
    loop {
        tokio::select! {
            () = ctx.p1_waiting.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
        if ractor::call!(myself, PreemptionMsg::Look).is_err() {
            return; // the actor is gone; its successor runs its own beat
        }
    }
}

impl MonitorState {
    /// Every route with a priority-1 wait or a running batch, as the policy sees it.
    fn views(&self) -> Vec<RouteView> {
        let enabled = self.ctx.settings.preemption.enabled;
        let mut views: Vec<RouteView> = Vec::new();
        for entry in self.ctx.routes.all() {
            let status = entry.gate.status();
            // Behind an open circuit priority 1 waits for the provider, not
            // for bulk work; and a preempted batch's tasks must stay where
            // a route that is down can requeue them.
            let p1_waiting = if enabled && status.circuit.is_none() {
                status.waiting[Priority::P1.index()]
            } else {
                0
            };
            views.push(RouteView {
                route: entry.route.clone(),
                p1_waiting,
                batches: Vec::new(),
            });
        }
        for batch in self.ctx.batches.all() {
            let at = match views.iter().position(|v| v.route == batch.route) {
                Some(at) => at,
                None => {
                    views.push(RouteView {
                        route: batch.route.clone(),
                        p1_waiting: 0,
                        batches: Vec::new(),
                    });
                    views.len() - 1
                }
            };
            views[at].batches.push(batch.view());
        }
        views
    }

    async fn look(&mut self) {
        let views = self.views();
        let now = Instant::now();
        for order in self.policy.decide(now, &views) {
            match order {
                Order::Preempt {
                    batch,
                    route,
                    reason,
                } => self.preempt(&batch, &route, reason, now).await,
                Order::Resume { batch } => {
                    if let Some(control) = self.ctx.batches.get(&batch) {
                        if control.resume() {
                            tracing::info!(batch_id = %batch, "preempted batch resumes");
                        }
                    }
                }
            }
        }
        metrics::preempted_batches(self.ctx.batches.preempted());
    }

    async fn preempt(&self, batch: &str, route: &Route, reason: PreemptReason, now: Instant) {
        let Some(control) = self.ctx.batches.get(batch) else {
            return; // it ended meanwhile
        };
        if !control.pause(now, self.ctx.settings.clock.now()) {
            return;
        }
        metrics::preempted(control.priority);
        tracing::info!(
            batch_id = %batch,
            route = %format_args!("{}/{}", route.provider, route.model),
            priority = control.priority.number(),
            reason = reason.as_str(),
            "bulk batch preempted: it launches no new call until priority 1 is served"
        );
        let Some(checkpoint) = control.checkpoint(reason) else {
            return;
        };
        let store: &dyn CheckpointStore = &*self.ctx.ports.checkpoints;
        match store.put(&checkpoint).await {
            Ok(()) => {
                control.mark_checkpointed();
                metrics::checkpoint_written();
                // This replica resumes it: no other takes it up while the
                // record is renewed (see `recovery`).
                let key = crate::recovery::owner_key(batch);
                match self.ctx.call_owners.acquire(&key).await {
                    Ok(crate::ownership::Acquired::Taken(held)) => control.hold_checkpoint(
                        crate::call_claim::ClaimGuard::keep(self.ctx.clone(), held),
                    ),
                    Ok(crate::ownership::Acquired::HeldBy(r)) => {
                        tracing::warn!(batch_id = %batch, owner = %r.owner, "checkpoint's ownership held by another replica");
                    }
                    Err(e) => {
                        tracing::warn!(batch_id = %batch, error = %e, "checkpoint's ownership not taken; another replica starting now may take it up");
                    }
                }
                // It may have completed while its checkpoint was written.
                if self.ctx.batches.get(batch).is_none() {
                    if let Err(e) = store.delete(batch).await {
                        tracing::warn!(batch_id = %batch, error = %e, "checkpoint of a completed batch not deleted");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(batch_id = %batch, error = %e, "checkpoint of a preempted batch not written; it stays preempted in memory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(model: &str) -> Route {
        Route {
            provider: "p".into(),
            model: model.into(),
        }
    }

    fn batch(id: &str, priority: Priority, started: u64, in_flight: usize) -> BatchView {
        BatchView {
            id: id.into(),
            priority,
            started_at: Instant::now() + Duration::from_secs(started),
            in_flight,
            not_started: 10,
            preempted_at: None,
        }
    }

    fn view(model: &str, p1_waiting: usize, batches: Vec<BatchView>) -> RouteView {
        RouteView {
            route: route(model),
            p1_waiting,
            batches,
        }
    }

    fn preempted(orders: &[Order]) -> Vec<&str> {
        orders
            .iter()
            .filter_map(|o| match o {
                Order::Preempt { batch, .. } => Some(&**batch),
                Order::Resume { .. } => None,
            })
            .collect()
    }

    fn resumed(orders: &[Order]) -> Vec<&str> {
        orders
            .iter()
            .filter_map(|o| match o {
                Order::Resume { batch } => Some(&**batch),
                Order::Preempt { .. } => None,
            })
            .collect()
    }

    /// The views after `orders` took effect at `at`.
    fn apply(views: &mut [RouteView], orders: &[Order], at: Instant) {
        for v in views.iter_mut() {
            for b in &mut v.batches {
                for o in orders {
                    match o {
                        Order::Preempt { batch, .. } if *batch == b.id => b.preempted_at = Some(at),
                        Order::Resume { batch } if *batch == b.id => b.preempted_at = None,
                        _ => {}
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_preempted_while_priority_one_does_not_wait() {
        let mut policy = PreemptionPolicy::new(Duration::from_millis(500));
        let views = [view("m", 0, vec![batch("b3", Priority::P3, 0, 2)])];
        assert!(policy.decide(Instant::now(), &views).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn priority_three_goes_before_priority_two_and_the_newest_first() {
        let mut policy = PreemptionPolicy::new(Duration::from_millis(500));
        let views = [view(
            "m",
            3,
            vec![
                batch("p2-old", Priority::P2, 0, 1),
                batch("p3-old", Priority::P3, 1, 1),
                batch("p3-new", Priority::P3, 2, 1),
                batch("p2-new", Priority::P2, 3, 1),
            ],
        )];
        let orders = policy.decide(Instant::now(), &views);
        assert_eq!(preempted(&orders), ["p3-new", "p3-old", "p2-new"]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_as_many_batches_as_priority_one_needs_are_preempted() {
        let mut policy = PreemptionPolicy::new(Duration::from_millis(500));
        let views = [view(
            "m",
            2,
            vec![
                batch("old", Priority::P3, 0, 2),
                batch("new", Priority::P3, 1, 2),
            ],
        )];
        let orders = policy.decide(Instant::now(), &views);
        assert_eq!(
            preempted(&orders),
            ["new"],
            "its two calls cover two waiting"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn priority_one_batches_and_batches_with_nothing_left_are_not_preempted() {
        let mut policy = PreemptionPolicy::new(Duration::from_millis(500));
        let mut done = batch("done", Priority::P3, 2, 1);
        done.not_started = 0;
        let views = [view("m", 5, vec![batch("vip", Priority::P1, 1, 1), done])];
        assert!(policy.decide(Instant::now(), &views).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn another_routes_batches_are_left_alone() {
        let mut policy = PreemptionPolicy::new(Duration::from_millis(500));
        let views = [
            view("busy", 1, vec![]),
            view("other", 0, vec![batch("b", Priority::P3, 0, 1)]),
        ];
        assert!(policy.decide(Instant::now(), &views).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn preempted_batches_resume_in_order_once_priority_one_is_quiet() {
        let quiet = Duration::from_millis(500);
        let mut policy = PreemptionPolicy::new(quiet);
        let t0 = Instant::now();
        let mut views = vec![view(
            "m",
            1,
            vec![
                batch("a", Priority::P3, 0, 1),
                batch("b", Priority::P3, 1, 1),
            ],
        )];
        let first = policy.decide(t0, &views);
        assert_eq!(preempted(&first), ["b"]);
        apply(&mut views, &first, t0);
        // More priority 1 waits than the call in flight of `b` covers: one more goes.
        views[0].p1_waiting = 2;
        let t1 = t0 + Duration::from_millis(100);
        let second = policy.decide(t1, &views);
        assert_eq!(preempted(&second), ["a"]);
        apply(&mut views, &second, t1);
        // Drained: nothing resumes before the quiet period has passed.
        views[0].p1_waiting = 0;
        assert!(policy.decide(t1 + quiet / 2, &views).is_empty());
        let orders = policy.decide(t1 + quiet, &views);
        assert_eq!(resumed(&orders), ["b", "a"], "in the order preempted");
        apply(&mut views, &orders, t1 + quiet);
        assert!(policy.decide(t1 + quiet * 2, &views).is_empty());
        assert_eq!(policy.preempted().count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_ended_while_preempted_is_forgotten() {
        let mut policy = PreemptionPolicy::new(Duration::ZERO);
        let t0 = Instant::now();
        let mut views = vec![view("m", 1, vec![batch("b", Priority::P3, 0, 1)])];
        let orders = policy.decide(t0, &views);
        apply(&mut views, &orders, t0);
        views[0].batches.clear();
        views[0].p1_waiting = 0;
        assert!(policy
            .decide(t0 + Duration::from_secs(1), &views)
            .is_empty());
        assert_eq!(policy.preempted().count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_monitor_adopts_preempted_batches_in_their_order() {
        let mut policy = PreemptionPolicy::new(Duration::ZERO);
        let t0 = Instant::now();
        let mut late = batch("late", Priority::P3, 0, 0);
        late.preempted_at = Some(t0 + Duration::from_millis(20));
        let mut early = batch("early", Priority::P2, 1, 0);
        early.preempted_at = Some(t0 + Duration::from_millis(10));
        let views = [view("m", 0, vec![late, early])];
        let orders = policy.decide(t0 + Duration::from_secs(1), &views);
        assert_eq!(resumed(&orders), ["early", "late"]);
    }
}
