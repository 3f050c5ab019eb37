//! # RoutePublisher
//!
//! A task beside the actors, like the lease keeper: it publishes the state
//! of this replica's routes (paused, circuit open, limits learned) to the
//! [`crate::ports::RouteBoard`], so `batchd status` on any machine sees them,
//! and every `route_refresh` this replica's heartbeat: that it is alive and
//! what it holds (messages, calls in flight and waiting, batches).
//!
//! Owns: when each route was last written ([`BoardSchedule`]). Reads: the
//! routes in the engine context, every quarter second; a route whose
//! condition changed is written at once, the others every
//! `route_refresh`. Sends: nothing to the actors. A failed write is logged
//! once and tried again on the next look.
//!
//! Runs for the engine's lifetime: a Dispatcher restart does not touch it
//! (the routes live in the context). On shutdown, [`withdraw`] removes this
//! replica's entries; after a crash they age out of the bucket.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::context::EngineContext;
use crate::dispatcher::RouteEntry;
use crate::route::{heartbeat_key, route_key, BoardSchedule, ReplicaHeartbeat, RouteState};

/// How often the routes are looked at: the delay before a change shows.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// The longest a shutdown waits to remove this replica's entries.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts publishing; abort the handle to stop.
pub fn spawn(ctx: Arc<EngineContext>) -> JoinHandle<()> {
    tokio::spawn(publish(ctx))
}

fn key_and_state(ctx: &EngineContext, r: &RouteEntry) -> (String, RouteState) {
    let replica = ctx.settings.replica.as_str();
    let (provider, model) = (r.route.provider.as_str(), r.route.model.as_str());
    (
        route_key(replica, provider, model),
        RouteState::new(replica, provider, model, &r.gate.status()),
    )
}

/// This replica's heartbeat as of now.
fn heartbeat(ctx: &EngineContext, started_at: chrono::DateTime<chrono::Utc>) -> ReplicaHeartbeat {
    let routes = ctx.routes.all();
    let (mut in_flight, mut waiting) = (0, 0);
    for r in &routes {
        let s = r.gate.status();
        in_flight += s.in_flight;
        waiting += s.waiting.iter().sum::<usize>();
    }
    ReplicaHeartbeat {
        replica: ctx.settings.replica.clone(),
        started_at,
        messages_held: ctx.keeper.held(),
        calls_in_flight: in_flight,
        calls_waiting: waiting,
        batches: ctx.batches.all().len(),
        preempted_batches: ctx.batches.preempted(),
        routes: routes.len(),
        updated_at: chrono::Utc::now(),
    }
}

async fn publish(ctx: Arc<EngineContext>) {
    let mut schedule = BoardSchedule::new(ctx.settings.route_refresh);
    let mut failing = false;
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started_at = chrono::Utc::now();
    let mut beat_due = Instant::now();
    loop {
        tick.tick().await;
        if Instant::now() >= beat_due {
            beat_due = Instant::now() + ctx.settings.route_refresh;
            if let Err(e) = ctx.ports.board.beat(&heartbeat(&ctx, started_at)).await {
                tracing::debug!(error = %e, "heartbeat not written; the next one follows");
            }
        }
        for r in ctx.routes.all() {
            let (key, state) = key_and_state(&ctx, &r);
            let now = Instant::now();
            if !schedule.is_due(&key, &state, now) {
                continue;
            }
            match ctx.ports.board.put(&key, &state).await {
                Ok(()) => {
                    schedule.written(&key, &state, now);
                    if failing {
                        tracing::info!("route state published again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "route state not published; `batchd status` shows the last one written until a write succeeds");
                        failing = true;
                    }
                }
            }
        }
    }
}

/// Removes this replica's routes from the board (on shutdown): the routes
/// are no longer driven from here. Gives up after a short wait; what is
/// left ages out of the bucket.
pub async fn withdraw(ctx: &EngineContext) {
    let work = async {
        let beat = heartbeat_key(&ctx.settings.replica);
        if let Err(e) = ctx.ports.board.remove(&beat).await {
            tracing::debug!(key = beat, error = %e, "heartbeat not withdrawn; it ages out");
        }
        for r in ctx.routes.all() {
            let (key, _) = key_and_state(ctx, &r);
            if let Err(e) = ctx.ports.board.remove(&key).await {
                tracing::debug!(key, error = %e, "route state not withdrawn; it ages out");
            }
        }
    };
    if tokio::time::timeout(WITHDRAW_TIMEOUT, work).await.is_err() {
        tracing::debug!("route states not all withdrawn in time; they age out");
    }
}
