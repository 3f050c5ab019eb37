//! # RoutePublisher
//!
//! A task beside the actors, like the lease keeper: it publishes the state
//! of this replica's routes (paused, circuit open, limits learned) to the
//! [`crate::ports::RouteBoard`], so `batchd status` on any machine sees them.
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
use crate::route::{route_key, BoardSchedule, RouteState};

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

async fn publish(ctx: Arc<EngineContext>) {
    let mut schedule = BoardSchedule::new(ctx.settings.route_refresh);
    let mut failing = false;
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
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
