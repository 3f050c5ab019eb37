//! The other replicas this one can see: from the heartbeats every replica
//! writes beside its routes (`replica.<name>` in the routes bucket, see
//! [`crate::route_publisher`]), watched as they are written.
//!
//! What depends on it: the claim across replicas on each provider call
//! ([`crate::call_claim`]). A replica that sees no other live replica has
//! nobody to race for a call and takes no claim (no KV write per call);
//! one that sees another, or cannot tell (the heartbeats not read yet, the
//! watch lost), claims every call, and claims its calls already in flight
//! the moment another replica appears.
//!
//! And the split of each route's rate limits: a route driven by several
//! replicas at once (each has calls in flight or waiting there, as its route
//! state on the board says) is split among them in equal parts
//! ([`crate::route::RouteGate::set_sharing`]), so together they stay within
//! the provider's limit with no KV write beyond the route states and
//! heartbeats each replica writes anyway.
//!
//! A replica is live while its last heartbeat is younger than three
//! heartbeat periods; a clean stop removes its heartbeat at once. A route
//! state counts while younger than three periods too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::context::EngineContext;
use crate::route::{heartbeat_key, ReplicaHeartbeat, RouteState};

/// When calls are claimed across replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimMode {
    /// While another live replica is seen, or none can be ruled out.
    #[default]
    Auto,
    /// Every call, whatever replicas are seen.
    Always,
}

/// What a watch of the heartbeats reports.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaEvent {
    /// A heartbeat was written (or was there when the watch began).
    Beat(ReplicaHeartbeat),
    /// A replica's heartbeat was removed (a clean stop), by its key
    /// ([`crate::route::heartbeat_key`]).
    Gone(String),
    /// A route state was written (or was there when the watch began).
    Route(RouteState),
    /// Every heartbeat stored when the watch began has been reported.
    Loaded,
}

/// How often the view is looked at again, so a replica that died (its
/// heartbeat no longer written) ages out.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);

/// How long to wait before watching again after a watch failed.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// The replicas seen, and whether calls must be claimed.
#[derive(Debug)]
pub struct Peers {
    me: String,
    mode: ClaimMode,
    live_for: chrono::Duration,
    view: Mutex<View>,
    /// Whether calls are claimed now: read on every call, recomputed on
    /// every event and every [`LOOK_EVERY`].
    claiming: AtomicBool,
}

#[derive(Debug, Default)]
struct View {
    loaded: bool,
    /// By heartbeat key: the replica's name and its latest heartbeat.
    seen: HashMap<String, (String, DateTime<Utc>)>,
    /// By route (`provider/model`), by replica name: its calls in flight and
    /// waiting there, and when it said so.
    routes: HashMap<String, HashMap<String, (usize, DateTime<Utc>)>>,
}

impl Peers {
    /// The view of replica `me`, whose heartbeats come every `beat_every`.
    pub fn new(me: &str, mode: ClaimMode, beat_every: Duration) -> Peers {
        let live_for = chrono::Duration::from_std(beat_every.saturating_mul(3))
            .unwrap_or(chrono::Duration::MAX);
        Peers {
            me: heartbeat_key(me),
            mode,
            live_for,
            view: Mutex::default(),
            claiming: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a call must be claimed before it goes out.
    pub fn claims_needed(&self) -> bool {
        self.claiming.load(Ordering::Relaxed)
    }

    /// The other replicas live at `now`, by name.
    pub fn others(&self, now: DateTime<Utc>) -> Vec<String> {
        let view = self.lock();
        let mut live: Vec<String> = view
            .seen
            .iter()
            .filter(|(key, (_, at))| **key != self.me && now - *at < self.live_for)
            .map(|(_, (name, _))| name.clone())
            .collect();
        live.sort();
        live
    }

    /// How many replicas drive `route` (`provider/model`) at `now`: this one
    /// and every other live one whose latest state there shows calls in
    /// flight or waiting.
    pub fn sharing(&self, route: &str, now: DateTime<Utc>) -> u32 {
        let view = self.lock();
        let Some(replicas) = view.routes.get(route) else {
            return 1;
        };
        let live = |name: &str| {
            let key = heartbeat_key(name);
            key != self.me
                && view
                    .seen
                    .get(&key)
                    .is_some_and(|(_, at)| now - *at < self.live_for)
        };
        let others = replicas
            .iter()
            .filter(|(name, (demand, at))| *demand > 0 && now - *at < self.live_for && live(name))
            .count();
        u32::try_from(others).unwrap_or(u32::MAX).saturating_add(1)
    }

    /// Takes in one event; true when calls became claimed by it (they were not).
    pub fn apply(&self, event: ReplicaEvent, now: DateTime<Utc>) -> bool {
        {
            let mut view = self.lock();
            match event {
                ReplicaEvent::Beat(beat) => {
                    let seen = view
                        .seen
                        .entry(heartbeat_key(&beat.replica))
                        .or_insert((beat.replica, beat.updated_at));
                    seen.1 = seen.1.max(beat.updated_at);
                }
                ReplicaEvent::Gone(key) => {
                    view.seen.remove(&key);
                }
                ReplicaEvent::Route(state) => {
                    let demand = state.in_flight.saturating_add(state.waiting);
                    let seen = view
                        .routes
                        .entry(state.route)
                        .or_default()
                        .entry(state.replica)
                        .or_insert((demand, state.updated_at));
                    if state.updated_at >= seen.1 {
                        *seen = (demand, state.updated_at);
                    }
                }
                ReplicaEvent::Loaded => view.loaded = true,
            }
        }
        self.refresh(now)
    }

    /// The watch was lost: nobody can be ruled out until it is back.
    pub fn lost(&self) -> bool {
        self.lock().loaded = false;
        self.refresh(Utc::now())
    }

    /// Recomputes whether calls are claimed at `now`; true when they became so.
    pub fn refresh(&self, now: DateTime<Utc>) -> bool {
        let claiming = match self.mode {
            ClaimMode::Always => true,
            ClaimMode::Auto => !self.lock().loaded || !self.others(now).is_empty(),
        };
        let before = self.claiming.swap(claiming, Ordering::Relaxed);
        claiming && !before
    }
}

/// Starts watching the heartbeats; abort the handle to stop.
pub fn spawn(ctx: Arc<EngineContext>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch(ctx))
}

async fn watch(ctx: Arc<EngineContext>) {
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut events = match ctx.ports.board.watch_board().await {
            Ok(events) => events,
            Err(e) => {
                tracing::debug!(error = %e, "replicas' heartbeats not watched; calls are claimed meanwhile");
                tokio::time::sleep(REWATCH_AFTER).await;
                continue;
            }
        };
        loop {
            let became = tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => ctx.peers.apply(event, ctx.settings.clock.now()),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "watch of the replicas' heartbeats lost; calls are claimed until it is back");
                        ctx.peers.lost();
                        break;
                    }
                    None => {
                        ctx.peers.lost();
                        break;
                    }
                },
                _ = look.tick() => {
                    split_routes(&ctx);
                    ctx.peers.refresh(ctx.settings.clock.now())
                }
            };
            if became {
                let others = ctx.peers.others(ctx.settings.clock.now());
                tracing::info!(?others, "another replica is running (or none can be ruled out): every provider call is claimed across replicas, those in flight included");
                crate::call_claim::claim_in_flight(&ctx);
            }
        }
        tokio::time::sleep(REWATCH_AFTER).await;
    }
}

/// Splits each of this replica's routes among the replicas driving it.
fn split_routes(ctx: &EngineContext) {
    let now = ctx.settings.clock.now();
    for r in ctx.routes.all() {
        r.gate.set_sharing(ctx.peers.sharing(&r.route.label(), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(replica: &str, at: DateTime<Utc>) -> ReplicaEvent {
        ReplicaEvent::Beat(ReplicaHeartbeat::idle(replica, at))
    }

    #[test]
    fn alone_no_claims_once_the_heartbeats_are_read_and_claims_while_another_lives() {
        let t0 = Utc::now();
        let peers = Peers::new("a", ClaimMode::Auto, Duration::from_secs(5));
        assert!(peers.claims_needed(), "nothing read yet: claim");
        assert!(!peers.apply(beat("a", t0), t0));
        assert!(peers.claims_needed(), "not all read yet: claim");
        assert!(!peers.apply(ReplicaEvent::Loaded, t0));
        assert!(!peers.claims_needed(), "alone: no claim");

        assert!(peers.apply(beat("b", t0), t0), "b appears: claims begin");
        assert!(peers.claims_needed());
        assert_eq!(peers.others(t0), vec!["b".to_owned()]);
        // b's heartbeat is 14 s old: live (three periods of 5 s); 15 s: gone.
        assert!(!peers.refresh(t0 + chrono::Duration::seconds(14)));
        assert!(peers.claims_needed());
        assert!(!peers.refresh(t0 + chrono::Duration::seconds(15)));
        assert!(!peers.claims_needed(), "b died: alone again");

        // An older beat arriving late does not revive it.
        let t1 = t0 + chrono::Duration::seconds(20);
        assert!(!peers.apply(beat("b", t0), t1));
        assert!(!peers.claims_needed());
        assert!(peers.apply(beat("b", t1), t1));
        assert!(!peers.apply(ReplicaEvent::Gone(heartbeat_key("b")), t1));
        assert!(!peers.claims_needed(), "b stopped cleanly");

        assert!(peers.lost(), "watch lost: claim until it is back");
        assert!(peers.claims_needed());
    }

    fn route(replica: &str, busy: usize, at: DateTime<Utc>) -> ReplicaEvent {
        ReplicaEvent::Route(RouteState {
            replica: replica.into(),
            route: "openai/m".into(),
            provider: "openai".into(),
            model: "m".into(),
            state: crate::route::RouteCondition::Open,
            reason: None,
            paused_until: None,
            circuit_until: None,
            concurrency_limit: 8,
            in_flight: busy,
            waiting: 0,
            rpm_limit: Some(1200),
            tpm_limit: None,
            sharing: 1,
            updated_at: at,
        })
    }

    #[test]
    fn a_route_is_split_among_the_live_replicas_with_calls_there() {
        let t0 = Utc::now();
        let s = |n| t0 + chrono::Duration::seconds(n);
        let peers = Peers::new("a", ClaimMode::Auto, Duration::from_secs(5));
        for event in [
            ReplicaEvent::Loaded,
            beat("a", t0),
            beat("b", t0),
            beat("c", t0),
            route("a", 3, t0),
            route("b", 3, t0),
            route("c", 0, t0),
            // d's route state, but no heartbeat: not running.
            route("d", 5, t0),
        ] {
            peers.apply(event, t0);
        }
        assert_eq!(
            peers.sharing("openai/m", t0),
            2,
            "a and b (c is idle there)"
        );
        assert_eq!(peers.sharing("openai/other", t0), 1);
        peers.apply(route("c", 1, s(1)), s(1));
        assert_eq!(peers.sharing("openai/m", s(1)), 3);
        // An older state arriving late changes nothing.
        peers.apply(route("c", 0, t0), s(1));
        assert_eq!(peers.sharing("openai/m", s(1)), 3);
        // b stops cleanly; c's heartbeat ages out at 15 s.
        peers.apply(ReplicaEvent::Gone(heartbeat_key("b")), s(2));
        assert_eq!(peers.sharing("openai/m", s(2)), 2);
        assert_eq!(peers.sharing("openai/m", s(16)), 1);
    }

    #[test]
    fn always_claims_whatever_is_seen() {
        let t0 = Utc::now();
        let peers = Peers::new("a", ClaimMode::Always, Duration::from_secs(5));
        peers.apply(ReplicaEvent::Loaded, t0);
        peers.apply(beat("a", t0), t0);
        assert!(peers.claims_needed());
    }
}
