//! [`RouteGate`]: where every call on a route waits for its turn.
//!
//! A call may go when the circuit lets it (closed, or this call is the
//! half-open probe), the route is not paused, a concurrency slot is free and
//! the rate budget holds its request and tokens. What the call met is then
//! reported back, and the policies learn from it.
//!
//! Waiters queue per priority. Only the head of the queues may take what the
//! route has; everyone else sleeps until woken, so an admission costs one
//! wake-up, not one per waiter. Priority 1 is always the head when it waits;
//! between 2 and 3 the turn goes by weight (smooth weighted round robin), so
//! bulk work gets a share and is never starved. The head sleeps until the
//! moment the route can take it (end of the pause, refill of the budget,
//! reopening of the circuit) or until a report changes the picture; a pause
//! set while it sleeps wakes it to wait longer.
//!
//! The state sits behind a `std::sync::Mutex` held only for arithmetic, never
//! across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::budget::{Charge, RateBudget};
use super::circuit::{
    CircuitAdmission, CircuitBreaker, CircuitReason, CircuitSettings, CircuitSnapshot, CircuitState,
};
use super::concurrency::{AdaptiveConcurrency, Backoff, ConcurrencySettings};
use super::limits::RateLimitInfo;
use crate::task::Priority;

/// The pause after a 429 that says nothing of how long to wait.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The longest pause a 429 may impose, whatever the settings say.
const PAUSE_CEILING: Duration = Duration::from_secs(3600);

/// How one route is driven.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteSettings {
    /// Ceiling of the adaptive concurrency limit.
    pub max_concurrency: usize,
    /// The concurrency limit before anything is learned.
    pub initial_concurrency: usize,
    /// Requests per minute; `None` to learn it from the provider's headers.
    pub rpm: Option<u64>,
    /// Tokens per minute; `None` to learn it from the provider's headers.
    pub tpm: Option<u64>,
    pub circuit: CircuitSettings,
    /// The longest pause a 429's `Retry-After` may impose.
    pub max_pause: Duration,
    /// Turns of priority 2 against `p3_weight` of priority 3 when both wait.
    pub p2_weight: u32,
    pub p3_weight: u32,
}

impl Default for RouteSettings {
    fn default() -> Self {
        RouteSettings {
            max_concurrency: 512,
            initial_concurrency: 8,
            rpm: None,
            tpm: None,
            circuit: CircuitSettings::default(),
            max_pause: Duration::from_secs(60),
            p2_weight: 3,
            p3_weight: 1,
        }
    }
}

impl RouteSettings {
    fn concurrency(&self) -> ConcurrencySettings {
        ConcurrencySettings {
            initial: self.initial_concurrency,
            max: self.max_concurrency,
            ..ConcurrencySettings::default()
        }
    }
}

/// What happened to a call.
#[derive(Debug, Clone, PartialEq)]
pub enum CallReport {
    /// Answered. `tokens` is what the provider billed.
    Success {
        latency: Duration,
        limits: RateLimitInfo,
        tokens: u64,
    },
    /// 429 rate limit: the route pauses for `limits.retry_after` (1 s if
    /// absent), its budget is emptied and its concurrency cut. Not a circuit
    /// matter.
    RateLimited { limits: RateLimitInfo },
    /// 5xx, 408, 409, timeout, connection error: counts towards opening the circuit.
    Transient { latency: Duration },
    /// The route refused as a whole: the circuit opens at once.
    RouteFailure { reason: CircuitReason },
    /// A rejection of this task alone (400 and the like): no effect.
    Neutral,
}

/// What a report changed, for the caller's logs and gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The circuit's new state, when this report changed it.
    pub circuit_changed: Option<CircuitState>,
    /// The end of the pause, when this report paused the route.
    pub paused_until: Option<Instant>,
    /// True when a rate limit was learned or changed (see [`RouteGate::status`]).
    pub limits_changed: bool,
    /// The concurrency limit after this report.
    pub concurrency_limit: usize,
}

/// The route as metrics and the route board show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    /// The moment it describes, on the gate's UTC clock.
    pub at: DateTime<Utc>,
    pub concurrency_limit: usize,
    pub in_flight: usize,
    /// Configured or learned; `None` while unknown.
    pub rpm_limit: Option<u64>,
    pub tpm_limit: Option<u64>,
    /// How many replicas the limits are split among (1: this one alone).
    pub sharing: u32,
    /// The end of the pause after a 429, while it lasts (it ends by itself).
    pub paused_until: Option<DateTime<Utc>>,
    /// Why the circuit is not closed; `None` when it is.
    pub circuit: Option<CircuitReason>,
    /// When an open circuit lets its next probe go; `None` when the circuit
    /// is closed or half-open (a probe may go, or is out).
    pub circuit_until: Option<DateTime<Utc>>,
    /// Calls waiting in `admit`, by [`Priority::index`].
    pub waiting: [usize; 3],
}

impl RouteStatus {
    /// A route at `at` that serves, driven by this replica alone, with
    /// nothing in flight or waiting and its rate limits not known.
    pub fn open(at: DateTime<Utc>, concurrency_limit: usize) -> RouteStatus {
        RouteStatus {
            at,
            concurrency_limit,
            in_flight: 0,
            rpm_limit: None,
            tpm_limit: None,
            sharing: 1,
            paused_until: None,
            circuit: None,
            circuit_until: None,
            waiting: [0; 3],
        }
    }
}

/// The route's state as stored, so that a restart neither doubles the
/// concurrency nor forgets a pause or an open circuit. Times are UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteSnapshot {
    pub concurrency_limit: usize,
    pub budget: RateBudget,
    pub circuit: CircuitSnapshot,
}

/// The admission point of one route; clones share it.
#[derive(Debug, Clone)]
pub struct RouteGate {
    shared: Arc<Shared>,
}

/// The right to make one call; dropping it unreported frees its slot as a
/// [`CallReport::Neutral`] outcome.
#[derive(Debug)]
pub struct Permit {
    shared: Arc<Shared>,
    charge: Charge,
    probe: bool,
    waited: Duration,
    reported: bool,
}

impl Permit {
    /// True when this call is the half-open circuit's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Time spent in [`RouteGate::admit`].
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.shared.finish(self, CallReport::Neutral);
        }
    }
}

#[derive(Debug)]
struct Shared {
    settings: RouteSettings,
    /// One moment on both clocks: the budget keeps UTC (it is stored and
    /// shared), everything else tokio's clock (which tests pause).
    origin: Instant,
    origin_wall: DateTime<Utc>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    concurrency: AdaptiveConcurrency,
    budget: RateBudget,
    circuit: CircuitBreaker,
    rng: StdRng,
    in_flight: usize,
    queues: [VecDeque<Waiter>; 3],
    turn: Turn,
    /// p2 and p3 weights, at least 1 each.
    weights: [i64; 2],
    next_id: u64,
    /// How many replicas the rate limits are split among.
    sharing: u32,
    /// Told whenever a priority-1 call has to wait (the PreemptionMonitor).
    p1_signal: Option<Arc<Notify>>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    notify: Arc<Notify>,
    ahead: bool,
}

/// The outcome of one look at the route by a waiter.
enum Step {
    Go {
        charge: Charge,
        probe: bool,
    },
    /// Sleep until woken, or until then if given.
    Wait(Option<Instant>),
}

impl RouteGate {
    pub fn new(settings: RouteSettings) -> RouteGate {
        RouteGate::new_at(settings, Utc::now())
    }

    /// A gate whose clocks meet at `wall` (the UTC time of tokio's now): lets
    /// tests under paused time choose the wall clock too.
    pub fn new_at(settings: RouteSettings, wall: DateTime<Utc>) -> RouteGate {
        let state = State {
            concurrency: AdaptiveConcurrency::new(settings.concurrency()),
            budget: RateBudget::new(settings.rpm, settings.tpm, wall),
            circuit: CircuitBreaker::new(settings.circuit),
            rng: StdRng::seed_from_u64(settings.circuit.seed),
            in_flight: 0,
            queues: Default::default(),
            turn: Turn::default(),
            weights: [
                i64::from(settings.p2_weight.max(1)),
                i64::from(settings.p3_weight.max(1)),
            ],
            next_id: 0,
            sharing: 1,
            p1_signal: None,
        };
        RouteGate {
            shared: Arc::new(Shared {
                settings,
                origin: Instant::now(),
                origin_wall: wall,
                state: Mutex::new(state),
            }),
        }
    }

    /// Has `signal` notified whenever a priority-1 call has to wait here.
    pub fn signal_priority_one_waiting(&self, signal: Arc<Notify>) {
        self.shared.lock().p1_signal = Some(signal);
    }

    /// A gate resumed from a snapshot; the settings win over what was stored
    /// (a configured limit, the concurrency ceiling).
    pub fn restore(settings: RouteSettings, snap: &RouteSnapshot) -> RouteGate {
        RouteGate::restore_at(settings, snap, Utc::now())
    }

    /// [`RouteGate::restore`] with the clocks meeting at `wall`.
    pub fn restore_at(
        settings: RouteSettings,
        snap: &RouteSnapshot,
        wall: DateTime<Utc>,
    ) -> RouteGate {
        let gate = RouteGate::new_at(settings, wall);
        let now = Instant::now();
        {
            let mut state = gate.shared.lock();
            state.concurrency =
                AdaptiveConcurrency::resume(settings.concurrency(), snap.concurrency_limit);
            state.budget = snap.budget.clone();
            state.budget.configure(settings.rpm, settings.tpm);
            // Until the other replicas are seen again, the split stored.
            state.sharing = (1.0 / state.budget.share()).round().max(1.0) as u32;
            state.circuit = CircuitBreaker::restore(settings.circuit, &snap.circuit, now, wall);
        }
        gate
    }

    /// Waits until this request may go: circuit closed (or this is the
    /// half-open probe), not paused, a concurrency slot free, request and
    /// token budget available. Priority 1 strictly first, then 2 and 3 by
    /// weight. Cancel-safe: dropping the future leaves no slot taken and no
    /// waiter behind.
    pub async fn admit(&self, priority: Priority, est_tokens: u64) -> Permit {
        self.admit_in_turn(priority, est_tokens, false).await
    }

    /// [`RouteGate::admit`], queued `ahead` of the other waiters of its
    /// priority (behind those queued ahead before it): for the tasks of a
    /// batch that resumes after a preemption.
    pub async fn admit_in_turn(&self, priority: Priority, est_tokens: u64, ahead: bool) -> Permit {
        let started = Instant::now();
        let notify = Arc::new(Notify::new());
        let id = self
            .shared
            .lock()
            .enqueue(priority, Arc::clone(&notify), ahead);
        let mut queued = Queued {
            shared: &self.shared,
            priority,
            id,
            admitted: false,
        };
        loop {
            let now = Instant::now();
            let step = self.shared.try_admit(priority, id, est_tokens, now);
            if priority == Priority::P1 && matches!(step, Step::Wait(_)) {
                if let Some(signal) = &self.shared.lock().p1_signal {
                    signal.notify_one();
                }
            }
            match step {
                Step::Go { charge, probe } => {
                    queued.admitted = true;
                    return Permit {
                        shared: Arc::clone(&self.shared),
                        charge,
                        probe,
                        waited: now.saturating_duration_since(started),
                        reported: false,
                    };
                }
                Step::Wait(None) => notify.notified().await,
                Step::Wait(Some(deadline)) => {
                    tokio::select! {
                        () = notify.notified() => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
            }
        }
    }

    /// What happened to the call made under `permit` (consumes it, frees the
    /// slot). A permit always reports to the gate that issued it.
    pub fn report(&self, mut permit: Permit, report: CallReport) -> Report {
        permit.reported = true;
        permit.shared.finish(&permit, report)
    }

    /// Splits the route's rate limits among `replicas` replicas driving it
    /// (1: this one alone): this replica's budget holds and refills its
    /// equal part.
    pub fn set_sharing(&self, replicas: u32) {
        let replicas = replicas.max(1);
        let mut state = self.shared.lock();
        if state.sharing == replicas {
            return;
        }
        state.sharing = replicas;
        state.budget.set_share(1.0 / f64::from(replicas));
        // A larger part may let the head go now.
        state.wake_head();
    }

    /// The route's state as a plain value, to be stored.
    pub fn snapshot(&self) -> RouteSnapshot {
        let now = Instant::now();
        let wall = self.shared.wall(now);
        let state = self.shared.lock();
        RouteSnapshot {
            concurrency_limit: state.concurrency.limit(),
            budget: state.budget.clone(),
            circuit: state.circuit.snapshot(now, wall),
        }
    }

    /// The route for metrics and the route board, computed at this moment.
    pub fn status(&self) -> RouteStatus {
        let now = Instant::now();
        let wall = self.shared.wall(now);
        let state = self.shared.lock();
        let circuit_until = match state.circuit.state(now) {
            CircuitState::Open { until, .. } => Some(self.shared.wall(until)),
            CircuitState::Closed | CircuitState::HalfOpen => None,
        };
        RouteStatus {
            at: wall,
            concurrency_limit: state.concurrency.limit(),
            in_flight: state.in_flight,
            rpm_limit: state.budget.rpm(),
            tpm_limit: state.budget.tpm(),
            sharing: state.sharing,
            paused_until: state.budget.paused_until(wall),
            circuit: state.circuit.reason(),
            circuit_until,
            waiting: state.queues.each_ref().map(VecDeque::len),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements; a panic elsewhere
        // while holding the lock leaves nothing half-done worth refusing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `now` on the UTC clock.
    fn wall(&self, now: Instant) -> DateTime<Utc> {
        let since = now.saturating_duration_since(self.origin);
        let since = TimeDelta::from_std(since).unwrap_or(TimeDelta::zero());
        self.origin_wall
            .checked_add_signed(since)
            .unwrap_or(self.origin_wall)
    }

    /// `until` (UTC) on tokio's clock, as seen at `now`.
    fn instant(&self, until: DateTime<Utc>, now: Instant) -> Instant {
        let left = (until - self.wall(now)).to_std().unwrap_or(Duration::ZERO);
        now + left.min(PAUSE_CEILING)
    }

    fn try_admit(&self, priority: Priority, id: u64, est_tokens: u64, now: Instant) -> Step {
        let wall = self.wall(now);
        let mut state = self.lock();
        if state.head() != Some(id) {
            return Step::Wait(None);
        }
        let probe = match state.circuit.admission(now) {
            CircuitAdmission::Call => false,
            CircuitAdmission::Probe => true,
            CircuitAdmission::OpenUntil(until) => return Step::Wait(Some(until)),
            CircuitAdmission::ProbeInFlight => return Step::Wait(None),
        };
        if let Some(until) = state.budget.paused_until(wall) {
            return Step::Wait(Some(self.instant(until, now)));
        }
        if state.in_flight >= state.concurrency.limit() {
            return Step::Wait(None);
        }
        let charge = match state.budget.try_take(est_tokens, wall) {
            Ok(charge) => charge,
            Err(wait) => return Step::Wait(Some(now + wait)),
        };
        if probe {
            state.circuit.start_probe(now);
        }
        state.in_flight += 1;
        let in_flight = state.in_flight;
        state.concurrency.note_in_flight(in_flight, now);
        state.dequeue(priority, id);
        if priority != Priority::P1 {
            state.turn.served();
        }
        // The next in line may be able to go at once.
        state.wake_head();
        Step::Go { charge, probe }
    }

    fn finish(&self, permit: &Permit, report: CallReport) -> Report {
        let now = Instant::now();
        let wall = self.wall(now);
        let mut guard = self.lock();
        let state = &mut *guard;
        // This call is still in flight: if that fills the limit, the limit
        // was reached while it was out. Noting it here, not only at
        // admission, lets a route held at one call grow again.
        state.concurrency.note_in_flight(state.in_flight, now);
        state.in_flight = state.in_flight.saturating_sub(1);
        let probe = permit.probe;
        let mut out = Report {
            circuit_changed: None,
            paused_until: None,
            limits_changed: false,
            concurrency_limit: 0,
        };
        match report {
            CallReport::Success {
                latency,
                limits,
                tokens,
            } => {
                state.concurrency.on_success(latency, now);
                out.limits_changed =
                    state
                        .budget
                        .on_answer(&permit.charge, Some(tokens), &limits, wall);
                let sent = now.checked_sub(latency).unwrap_or(now);
                out.circuit_changed = state.circuit.on_success(probe, now, sent);
            }
            CallReport::RateLimited { limits } => {
                out.limits_changed = state.budget.on_rate_limited(&permit.charge, &limits, wall);
                let wait = limits
                    .retry_after
                    .unwrap_or(DEFAULT_RETRY_AFTER)
                    .min(self.settings.max_pause)
                    .min(PAUSE_CEILING);
                let until = state.budget.pause(wait, wall);
                out.paused_until = Some(self.instant(until, now));
                state.concurrency.on_backoff(Backoff::RateLimited, now);
                state.circuit.on_neutral(probe);
            }
            CallReport::Transient { latency } => {
                state.concurrency.on_backoff(Backoff::Transient, now);
                let sent = now.checked_sub(latency).unwrap_or(now);
                out.circuit_changed = state.circuit.on_transient(probe, now, sent, &mut state.rng);
            }
            CallReport::RouteFailure { reason } => {
                state.concurrency.on_backoff(Backoff::RouteFailure, now);
                out.circuit_changed =
                    state
                        .circuit
                        .on_route_failure(reason, probe, now, &mut state.rng);
            }
            CallReport::Neutral => state.circuit.on_neutral(probe),
        }
        out.concurrency_limit = state.concurrency.limit();
        // A slot is free, and the pause, budget or circuit may have moved.
        state.wake_head();
        out
    }
}

impl State {
    fn enqueue(&mut self, priority: Priority, notify: Arc<Notify>, ahead: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let queue = &mut self.queues[priority.index()];
        let at = if ahead {
            queue.iter().position(|w| !w.ahead).unwrap_or(queue.len())
        } else {
            queue.len()
        };
        // A new head looks at the route at once; the one it displaced finds
        // itself no longer the head when it wakes.
        queue.insert(at, Waiter { id, notify, ahead });
        id
    }

    fn dequeue(&mut self, priority: Priority, id: u64) {
        let queue = &mut self.queues[priority.index()];
        if let Some(at) = queue.iter().position(|w| w.id == id) {
            queue.remove(at);
        }
    }

    /// The queue whose front goes next.
    fn head_queue(&mut self) -> Option<usize> {
        if !self.queues[0].is_empty() {
            return Some(0);
        }
        let waiting = [!self.queues[1].is_empty(), !self.queues[2].is_empty()];
        self.turn.choose(waiting, self.weights).map(|i| i + 1)
    }

    fn head(&mut self) -> Option<u64> {
        let queue = self.head_queue()?;
        self.queues[queue].front().map(|w| w.id)
    }

    fn wake_head(&mut self) {
        if let Some(queue) = self.head_queue() {
            if let Some(waiter) = self.queues[queue].front() {
                waiter.notify.notify_one();
            }
        }
    }
}

/// Whose turn it is between priorities 2 and 3: smooth weighted round robin
/// (as nginx balances upstreams), so 3:1 comes out as 2 2 3 2, 2 2 3 2, ...
/// The choice holds until that priority is served.
#[derive(Debug, Default)]
struct Turn {
    credit: [i64; 2],
    chosen: Option<usize>,
}

impl Turn {
    fn choose(&mut self, waiting: [bool; 2], weights: [i64; 2]) -> Option<usize> {
        if let Some(chosen) = self.chosen.filter(|&c| waiting[c]) {
            return Some(chosen);
        }
        match waiting {
            // Alone, a priority goes without using or building credit, and
            // without holding the turn against one that arrives meanwhile.
            [false, false] => None,
            [true, false] => Some(0),
            [false, true] => Some(1),
            [true, true] => {
                self.credit[0] += weights[0];
                self.credit[1] += weights[1];
                let pick = usize::from(self.credit[1] > self.credit[0]);
                self.credit[pick] -= weights[0] + weights[1];
                self.chosen = Some(pick);
                Some(pick)
            }
        }
    }

    fn served(&mut self) {
        self.chosen = None;
    }
}

/// A place in the queues, given up if `admit` is dropped before its turn.
struct Queued<'a> {
    shared: &'a Shared,
    priority: Priority,
    id: u64,
    admitted: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let mut state = self.shared.lock();
        state.dequeue(self.priority, self.id);
        // It may have been the head, or woken to become it: pass the turn on.
        state.wake_head();
    }
}
