//! What a replica tells every other machine about its routes: one
//! [`RouteState`] per route, stored under [`route_key`] in the route status
//! bucket (see PROTOCOL.md), so `batchd status` needs NATS alone.
//!
//! A route's state is written when its condition changes (paused, circuit
//! open, half-open, open again) or a rate limit is learned, and refreshed
//! every `refresh` otherwise ([`BoardSchedule`]): the in-flight count and
//! the concurrency limit move with every call and are only refreshed, so
//! the write rate stays low whatever the traffic.
//!
//! Pure: the caller passes the clock (tokio's, for the schedule).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::circuit::CircuitReason;
use super::gate::RouteStatus;

/// Whether a route serves, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteCondition {
    /// Calls go (within the concurrency limit and the rate budget).
    Open,
    /// Waiting out a 429's `Retry-After` until `paused_until`.
    Paused,
    /// The circuit is open: no calls until `circuit_until`, then one probe.
    CircuitOpen,
    /// The circuit's open period is over: one probe decides.
    HalfOpen,
}

impl RouteCondition {
    /// The condition a gate's status shows; a circuit that is not closed
    /// outranks a pause.
    pub fn of(status: &RouteStatus) -> RouteCondition {
        match (status.circuit, status.circuit_until, status.paused_until) {
            (Some(_), Some(_), _) => RouteCondition::CircuitOpen,
            (Some(_), None, _) => RouteCondition::HalfOpen,
            (None, _, Some(_)) => RouteCondition::Paused,
            (None, _, None) => RouteCondition::Open,
        }
    }

    /// As written in the bucket: `open`, `paused`, `circuit_open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteCondition::Open => "open",
            RouteCondition::Paused => "paused",
            RouteCondition::CircuitOpen => "circuit_open",
            RouteCondition::HalfOpen => "half_open",
        }
    }
}

/// One replica's route, as stored in the route status bucket (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    /// The replica that drives this route.
    pub replica: String,
    /// `<provider>/<model>`.
    pub route: String,
    /// Provider name.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Whether the route serves.
    pub state: RouteCondition,
    /// Why the circuit is not closed; `None` when it is.
    pub reason: Option<CircuitReason>,
    /// The end of a 429's pause, while it lasts.
    pub paused_until: Option<DateTime<Utc>>,
    /// When an open circuit sends its next probe.
    pub circuit_until: Option<DateTime<Utc>>,
    /// The adaptive concurrency limit.
    pub concurrency_limit: usize,
    /// Calls in flight.
    pub in_flight: usize,
    /// Calls waiting for admission.
    pub waiting: usize,
    /// Requests per minute, configured or learned; `None` while unknown.
    pub rpm_limit: Option<u64>,
    /// Tokens per minute, configured or learned; `None` while unknown.
    pub tpm_limit: Option<u64>,
    /// How many replicas the limits are split among (this one included):
    /// this replica sends its equal part.
    #[serde(default = "alone")]
    pub sharing: u32,
    /// When this was written.
    pub updated_at: DateTime<Utc>,
}

/// A route state written before replicas split limits: driven alone.
fn alone() -> u32 {
    1
}

impl RouteState {
    /// The state of `provider`/`model` from its gate's status.
    pub fn new(replica: &str, provider: &str, model: &str, status: &RouteStatus) -> RouteState {
        RouteState {
            replica: replica.to_owned(),
            route: format!("{provider}/{model}"),
            provider: provider.to_owned(),
            model: model.to_owned(),
            state: RouteCondition::of(status),
            reason: status.circuit,
            paused_until: status.paused_until.map(|t| t.round_subsecs(3)),
            circuit_until: status.circuit_until.map(|t| t.round_subsecs(3)),
            concurrency_limit: status.concurrency_limit,
            in_flight: status.in_flight,
            waiting: status.waiting.iter().sum(),
            rpm_limit: status.rpm_limit,
            tpm_limit: status.tpm_limit,
            sharing: status.sharing,
            updated_at: status.at.round_subsecs(3),
        }
    }

    /// When the route should serve again by itself: the next probe of an
    /// open circuit, else the end of the pause.
    pub fn until(&self) -> Option<DateTime<Utc>> {
        match self.state {
            RouteCondition::CircuitOpen => self.circuit_until,
            RouteCondition::Paused => self.paused_until,
            RouteCondition::Open | RouteCondition::HalfOpen => None,
        }
    }

    /// What a change of must be written at once.
    fn fingerprint(&self) -> Fingerprint {
        (
            self.state,
            self.reason,
            self.rpm_limit,
            self.tpm_limit,
            self.sharing,
        )
    }
}

type Fingerprint = (
    RouteCondition,
    Option<CircuitReason>,
    Option<u64>,
    Option<u64>,
    u32,
);

/// A replica's heartbeat: that it is alive and what it holds, written every
/// `route_refresh` beside its routes (JSON, key [`heartbeat_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHeartbeat {
    /// The replica.
    pub replica: String,
    /// When its engine started.
    pub started_at: DateTime<Utc>,
    /// Task messages it holds (delivered to it, not yet acked).
    pub messages_held: usize,
    /// Provider calls in flight, over all its routes.
    pub calls_in_flight: usize,
    /// Calls waiting for admission at its routes.
    pub calls_waiting: usize,
    /// Batches it is driving, and of those, preempted.
    pub batches: usize,
    /// See `batches`.
    pub preempted_batches: usize,
    /// Routes it has used.
    pub routes: usize,
    /// When it wrote this.
    pub updated_at: DateTime<Utc>,
}

impl ReplicaHeartbeat {
    /// The heartbeat of `replica`, started and written at `at`, holding
    /// nothing.
    pub fn idle(replica: &str, at: DateTime<Utc>) -> ReplicaHeartbeat {
        ReplicaHeartbeat {
            replica: replica.to_owned(),
            started_at: at,
            messages_held: 0,
            calls_in_flight: 0,
            calls_waiting: 0,
            batches: 0,
            preempted_batches: 0,
            routes: 0,
            updated_at: at,
        }
    }
}

/// The key of a replica's heartbeat: `replica.<replica>` (two tokens, where
/// a route's key has three).
pub fn heartbeat_key(replica: &str) -> String {
    format!("replica.{}", key_token(replica))
}

/// The key of one replica's route: `<replica>.<provider>.<model>`, each part
/// escaped to the characters a KV key allows (`[-/_=A-Za-z0-9]`; any other
/// byte, `.` included, becomes `=XX` in hex), so keys never collide and a
/// replica's routes share the prefix `<replica>.`.
pub fn route_key(replica: &str, provider: &str, model: &str) -> String {
    [replica, provider, model].map(key_token).join(".")
}

fn key_token(part: &str) -> String {
    if part.is_empty() {
        return "=".to_owned();
    }
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// When each route's state is due: at once when its condition changed,
/// else `refresh` after the last write.
#[derive(Debug)]
pub struct BoardSchedule {
    refresh: Duration,
    written: HashMap<String, (Instant, Fingerprint)>,
}

impl BoardSchedule {
    /// A schedule that refreshes every `refresh`.
    pub fn new(refresh: Duration) -> BoardSchedule {
        BoardSchedule {
            refresh,
            written: HashMap::new(),
        }
    }

    /// True when `state`, stored under `key`, should be written at `now`.
    pub fn is_due(&self, key: &str, state: &RouteState, now: Instant) -> bool {
        match self.written.get(key) {
            None => true,
            Some((at, fingerprint)) => {
                *fingerprint != state.fingerprint()
                    || now.saturating_duration_since(*at) >= self.refresh
            }
        }
    }

    /// `state` was written under `key` at `now`.
    pub fn written(&mut self, key: &str, state: &RouteState, now: Instant) {
        self.written
            .insert(key.to_owned(), (now, state.fingerprint()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    fn status() -> RouteStatus {
        RouteStatus {
            at: at(0),
            concurrency_limit: 8,
            in_flight: 3,
            rpm_limit: Some(500),
            tpm_limit: None,
            sharing: 1,
            paused_until: None,
            circuit: None,
            circuit_until: None,
            waiting: [1, 0, 4],
        }
    }

    #[test]
    fn a_circuit_outranks_a_pause_and_half_open_has_no_until() {
        let mut s = status();
        assert_eq!(RouteCondition::of(&s), RouteCondition::Open);
        s.paused_until = Some(at(1000));
        assert_eq!(RouteCondition::of(&s), RouteCondition::Paused);
        s.circuit = Some(CircuitReason::Unavailable);
        s.circuit_until = Some(at(5000));
        assert_eq!(RouteCondition::of(&s), RouteCondition::CircuitOpen);
        let state = RouteState::new("r", "openai", "m", &s);
        assert_eq!(state.until(), Some(at(5000)));
        s.circuit_until = None;
        assert_eq!(RouteCondition::of(&s), RouteCondition::HalfOpen);
        assert_eq!(RouteState::new("r", "openai", "m", &s).until(), None);
    }

    #[test]
    fn the_stored_value_is_the_documented_json() {
        let mut s = status();
        s.circuit = Some(CircuitReason::Unauthorized);
        s.circuit_until = Some(at(2500));
        let state = RouteState::new("host-7", "openai", "gpt-4.1-mini", &s);
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "replica": "host-7",
                "route": "openai/gpt-4.1-mini",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "state": "circuit_open",
                "reason": "unauthorized",
                "paused_until": null,
                "circuit_until": "2027-01-15T08:00:02.500Z",
                "concurrency_limit": 8,
                "in_flight": 3,
                "waiting": 5,
                "rpm_limit": 500,
                "tpm_limit": null,
                "sharing": 1,
                "updated_at": "2027-01-15T08:00:00Z",
            })
        );
        let back: RouteState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn keys_are_valid_kv_keys_and_never_collide() {
        assert_eq!(
            route_key("host-7", "openai", "gpt-4.1-mini"),
            "host-7.openai.gpt-4=2E1-mini"
        );
        assert_eq!(
            route_key("a.b", "c", "d"),
            "a=2Eb.c.d",
            "a dot inside a part is escaped"
        );
        assert_ne!(route_key("a.b", "c", "d"), route_key("a", "b.c", "d"));
        assert_eq!(route_key("r", "p", "ft:m=1 x"), "r.p.ft=3Am=3D1=20x");
        assert_eq!(route_key("", "p", "m"), "=.p.m");
        let key = route_key("r", "p", "model/é");
        assert!(key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_due_at_once_and_the_rest_every_refresh() {
        let mut schedule = BoardSchedule::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let mut s = status();
        let open = RouteState::new("r", "p", "m", &s);
        assert!(schedule.is_due("k", &open, t0), "never written");
        schedule.written("k", &open, t0);
        s.in_flight = 7;
        s.concurrency_limit = 9;
        let busier = RouteState::new("r", "p", "m", &s);
        assert!(
            !schedule.is_due("k", &busier, t0 + Duration::from_secs(1)),
            "calls in flight and the limit only refresh"
        );
        assert!(schedule.is_due("k", &busier, t0 + Duration::from_secs(5)));
        s.paused_until = Some(at(3000));
        let paused = RouteState::new("r", "p", "m", &s);
        assert!(schedule.is_due("k", &paused, t0 + Duration::from_secs(1)));
        s.paused_until = None;
        s.tpm_limit = Some(30_000);
        let learned = RouteState::new("r", "p", "m", &s);
        assert!(
            schedule.is_due("k", &learned, t0 + Duration::from_secs(1)),
            "a learned limit is written at once"
        );
        assert!(schedule.is_due("other", &open, t0), "per key");
    }
}
