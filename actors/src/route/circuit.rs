//! The circuit breaker of one route: when the route itself is down (outage,
//! revoked key, unknown model, exhausted quota) its tasks stop being sent, and
//! one probe at a time finds out when it is back.
//!
//! - Closed: calls go. `threshold` consecutive transient failures within
//!   `window` open it, and so does one route-level failure, at once.
//! - Open until a time: no calls.
//! - Half-open after that: exactly one probe in flight. Its success closes the
//!   circuit; its failure opens it again for twice as long (up to `max_wait`).
//!
//! Reports from calls sent before the circuit opened are stale and ignored
//! while it is open or half-open: only the probe decides. Every transition is
//! returned, so the caller logs one line per change, not one per task.
//!
//! Pure: the caller passes `now` and the random source for the jitter.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Tuning of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitSettings {
    /// Consecutive transient failures that open the circuit.
    pub threshold: u32,
    /// ... when they all fall within this window.
    pub window: Duration,
    /// First open period.
    pub initial_wait: Duration,
    /// Longest open period, however many probes failed.
    pub max_wait: Duration,
    /// Share of each open period taken off at random (0 = none, at most 1),
    /// so that replicas do not probe in step.
    pub jitter: f64,
    /// Seed of the jitter's random source.
    pub seed: u64,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            threshold: 5,
            window: Duration::from_secs(10),
            initial_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(15),
            jitter: 0.2,
            seed: 0,
        }
    }
}

/// Why a circuit opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitReason {
    /// Transient failures in a row (5xx, timeouts, refused connections).
    Unavailable,
    /// 401 or 403: the key was refused.
    Unauthorized,
    /// 404 for a configured model.
    ModelNotFound,
    /// 429 `insufficient_quota`: the account is out of credit.
    QuotaExhausted,
}

impl CircuitReason {
    /// The `reason` label of `batchd_route_circuit_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitReason::Unavailable => "unavailable",
            CircuitReason::Unauthorized => "unauthorized",
            CircuitReason::ModelNotFound => "model_not_found",
            CircuitReason::QuotaExhausted => "quota_exhausted",
        }
    }
}

/// The state of a circuit as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open {
        reason: CircuitReason,
        until: Instant,
    },
    HalfOpen,
}

/// What the circuit says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitAdmission {
    /// Closed: go.
    Call,
    /// Half-open and no probe out: go, as the probe.
    Probe,
    /// Open: wait until then.
    OpenUntil(Instant),
    /// Half-open with a probe out: wait for its report.
    ProbeInFlight,
}

/// A circuit as stored: times in UTC milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CircuitSnapshot {
    Closed,
    Open {
        reason: CircuitReason,
        until_ms: i64,
        wait_ms: u64,
    },
    HalfOpen {
        reason: CircuitReason,
        wait_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_out: bool },
}

/// The circuit breaker of one route.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    settings: CircuitSettings,
    mode: Mode,
    /// Why it is not closed.
    reason: CircuitReason,
    /// Times of the current run of transient failures, oldest first.
    failures: VecDeque<Instant>,
    /// The open period before jitter; doubles on each failed probe.
    wait: Duration,
}

impl CircuitBreaker {
    pub fn new(settings: CircuitSettings) -> Self {
        let settings = sanitize(settings);
        CircuitBreaker {
            wait: settings.initial_wait,
            settings,
            mode: Mode::Closed,
            reason: CircuitReason::Unavailable,
            failures: VecDeque::new(),
        }
    }

    /// The state at `now`: an open circuit whose time has come reads half-open.
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.mode {
            Mode::Closed => CircuitState::Closed,
            Mode::Open { until } if now < until => CircuitState::Open {
                reason: self.reason,
                until,
            },
            Mode::Open { .. } | Mode::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Why the circuit is not closed; `None` when it is.
    pub fn reason(&self) -> Option<CircuitReason> {
        (self.mode != Mode::Closed).then_some(self.reason)
    }

    /// May a call go at `now`? A [`CircuitAdmission::Probe`] answer is only
    /// advice: call [`CircuitBreaker::start_probe`] when the probe is sent.
    pub fn admission(&self, now: Instant) -> CircuitAdmission {
        match self.mode {
            Mode::Closed => CircuitAdmission::Call,
            Mode::Open { until } if now < until => CircuitAdmission::OpenUntil(until),
            Mode::Open { .. } | Mode::HalfOpen { probe_out: false } => CircuitAdmission::Probe,
            Mode::HalfOpen { probe_out: true } => CircuitAdmission::ProbeInFlight,
        }
    }

    /// The probe is on its way; no other until it reports.
    pub fn start_probe(&mut self, now: Instant) {
        if self.admission(now) == CircuitAdmission::Probe {
            self.mode = Mode::HalfOpen { probe_out: true };
        }
    }

    /// A call sent at `sent` succeeded. Returns the new state if this
    /// changed it. It clears the failures of calls sent before it: failures
    /// are consecutive in the order calls were sent, so the late answer of a
    /// call sent before an outage does not hide the outage.
    pub fn on_success(&mut self, probe: bool, now: Instant, sent: Instant) -> Option<CircuitState> {
        match self.mode {
            Mode::Closed => {
                self.failures.retain(|&t| t > sent);
                None
            }
            Mode::HalfOpen { probe_out: true } if probe => {
                self.mode = Mode::Closed;
                self.failures.clear();
                self.wait = self.settings.initial_wait;
                Some(self.state(now))
            }
            _ => None,
        }
    }

    /// A call sent at `sent` failed transiently. Returns the new state if
    /// this changed it.
    pub fn on_transient(
        &mut self,
        probe: bool,
        now: Instant,
        sent: Instant,
        rng: &mut impl Rng,
    ) -> Option<CircuitState> {
        match self.mode {
            Mode::Closed => {
                let window = self.settings.window;
                self.failures.push_back(sent);
                self.failures
                    .retain(|&t| now.saturating_duration_since(t) <= window);
                if self.failures.len() < self.settings.threshold as usize {
                    return None;
                }
                Some(self.open(CircuitReason::Unavailable, now, rng))
            }
            Mode::HalfOpen { probe_out: true } if probe => {
                Some(self.reopen(CircuitReason::Unavailable, now, rng))
            }
            _ => None,
        }
    }

    /// The route refused as a whole: open at once (or again, if this was the probe).
    pub fn on_route_failure(
        &mut self,
        reason: CircuitReason,
        probe: bool,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<CircuitState> {
        match self.mode {
            Mode::Closed => Some(self.open(reason, now, rng)),
            Mode::HalfOpen { probe_out: true } if probe => Some(self.reopen(reason, now, rng)),
            _ => None,
        }
    }

    /// The call told nothing about the route (a per-task rejection, a 429, a
    /// call dropped unsent): a probe's place is freed for the next one.
    pub fn on_neutral(&mut self, probe: bool) {
        if probe && self.mode == (Mode::HalfOpen { probe_out: true }) {
            self.mode = Mode::HalfOpen { probe_out: false };
        }
    }

    /// The circuit as stored; `now` and `wall` are the same moment on both clocks.
    pub fn snapshot(&self, now: Instant, wall: DateTime<Utc>) -> CircuitSnapshot {
        let wait_ms = u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX);
        match self.mode {
            Mode::Closed => CircuitSnapshot::Closed,
            Mode::Open { until } => {
                let left = until.saturating_duration_since(now);
                let left = chrono::TimeDelta::from_std(left).unwrap_or(chrono::TimeDelta::MAX);
                let until = wall.checked_add_signed(left).unwrap_or(wall);
                CircuitSnapshot::Open {
                    reason: self.reason,
                    until_ms: until.timestamp_millis(),
                    wait_ms,
                }
            }
            Mode::HalfOpen { .. } => CircuitSnapshot::HalfOpen {
                reason: self.reason,
                wait_ms,
            },
        }
    }

    /// A circuit from a snapshot. A probe that was out is gone with the process
    /// that sent it, so a half-open circuit comes back ready for a new probe.
    pub fn restore(
        settings: CircuitSettings,
        snapshot: &CircuitSnapshot,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Self {
        let mut circuit = CircuitBreaker::new(settings);
        let wait = |ms: u64| {
            Duration::from_millis(ms)
                .clamp(circuit.settings.initial_wait, circuit.settings.max_wait)
        };
        match *snapshot {
            CircuitSnapshot::Closed => {}
            CircuitSnapshot::Open {
                reason,
                until_ms,
                wait_ms,
            } => {
                let left = (until_ms - wall.timestamp_millis()).clamp(0, max_ms(wait(wait_ms)));
                circuit.reason = reason;
                circuit.wait = wait(wait_ms);
                circuit.mode = Mode::Open {
                    until: now + Duration::from_millis(left.unsigned_abs()),
                };
            }
            CircuitSnapshot::HalfOpen { reason, wait_ms } => {
                circuit.reason = reason;
                circuit.wait = wait(wait_ms);
                circuit.mode = Mode::HalfOpen { probe_out: false };
            }
        }
        circuit
    }

    fn open(&mut self, reason: CircuitReason, now: Instant, rng: &mut impl Rng) -> CircuitState {
        self.wait = self.settings.initial_wait;
        self.open_for_wait(reason, now, rng)
    }

    fn reopen(&mut self, reason: CircuitReason, now: Instant, rng: &mut impl Rng) -> CircuitState {
        self.wait = self.wait.saturating_mul(2).min(self.settings.max_wait);
        self.open_for_wait(reason, now, rng)
    }

    fn open_for_wait(
        &mut self,
        reason: CircuitReason,
        now: Instant,
        rng: &mut impl Rng,
    ) -> CircuitState {
        let cut = if self.settings.jitter > 0.0 {
            self.settings.jitter * rng.random::<f64>()
        } else {
            0.0
        };
        // `cut` is in [0, 1): the product stays a finite, smaller duration.
        let wait = self.wait.mul_f64(1.0 - cut);
        self.failures.clear();
        self.reason = reason;
        self.mode = Mode::Open { until: now + wait };
        self.state(now)
    }
}

/// Milliseconds of a clamped wait, as the signed type of UTC timestamps.
fn max_ms(wait: Duration) -> i64 {
    i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)
}

fn sanitize(mut s: CircuitSettings) -> CircuitSettings {
    // An hour is far past any sensible probe interval, and keeps `now + wait` safe.
    const CEILING: Duration = Duration::from_secs(3600);
    s.threshold = s.threshold.max(1);
    s.initial_wait = s.initial_wait.clamp(Duration::from_millis(1), CEILING);
    s.max_wait = s.max_wait.clamp(s.initial_wait, CEILING);
    s.jitter = if s.jitter.is_finite() {
        s.jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn settings() -> CircuitSettings {
        CircuitSettings {
            jitter: 0.0,
            ..CircuitSettings::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn opens_on_threshold_consecutive_failures_within_the_window() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut c = CircuitBreaker::new(settings());
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(
                c.on_transient(false, t0 + secs(i), t0 + secs(i), &mut rng),
                None
            );
        }
        let opened = c.on_transient(false, t0 + secs(4), t0 + secs(4), &mut rng);
        assert_eq!(
            opened,
            Some(CircuitState::Open {
                reason: CircuitReason::Unavailable,
                until: t0 + secs(5)
            })
        );
        assert_eq!(c.reason(), Some(CircuitReason::Unavailable));
        assert_eq!(
            c.admission(t0 + secs(4)),
            CircuitAdmission::OpenUntil(t0 + secs(5))
        );
    }

    #[test]
    fn a_success_or_a_slow_run_does_not_open() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut c = CircuitBreaker::new(settings());
        let t0 = Instant::now();
        for i in 0..4 {
            c.on_transient(false, t0 + secs(i), t0 + secs(i), &mut rng);
        }
        assert_eq!(c.on_success(false, t0 + secs(4), t0 + secs(4)), None);
        for i in 5..9 {
            assert_eq!(
                c.on_transient(false, t0 + secs(i), t0 + secs(i), &mut rng),
                None
            );
        }
        // Five failures, but spread over more than ten seconds.
        let mut slow = CircuitBreaker::new(settings());
        for i in 0..20 {
            assert_eq!(
                slow.on_transient(false, t0 + secs(3 * i), t0 + secs(3 * i), &mut rng),
                None
            );
        }
        assert_eq!(c.state(t0 + secs(9)), CircuitState::Closed);
    }

    #[test]
    fn late_answers_of_calls_sent_before_an_outage_do_not_hide_it() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut c = CircuitBreaker::new(settings());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The outage starts at t0: fast failures of new calls interleave with
        // the slow successes of calls sent before it.
        for i in 0..4 {
            let at = t0 + ms(10 * i);
            assert_eq!(c.on_transient(false, at, at, &mut rng), None);
            assert_eq!(c.on_success(false, at + ms(5), t0 - ms(200)), None);
        }
        let at = t0 + ms(40);
        assert!(matches!(
            c.on_transient(false, at, at, &mut rng),
            Some(CircuitState::Open { .. })
        ));
        // A success sent after the failures still clears them.
        let mut d = CircuitBreaker::new(settings());
        for i in 0..4 {
            d.on_transient(false, t0 + ms(i), t0 + ms(i), &mut rng);
        }
        d.on_success(false, t0 + ms(50), t0 + ms(10));
        assert_eq!(
            d.on_transient(false, t0 + ms(60), t0 + ms(60), &mut rng),
            None
        );
    }

    #[test]
    fn a_route_failure_opens_at_once_and_names_its_reason() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut c = CircuitBreaker::new(settings());
        let t0 = Instant::now();
        let state = c.on_route_failure(CircuitReason::Unauthorized, false, t0, &mut rng);
        assert!(matches!(
            state,
            Some(CircuitState::Open {
                reason: CircuitReason::Unauthorized,
                ..
            })
        ));
        assert_eq!(c.reason().map(CircuitReason::as_str), Some("unauthorized"));
        // Stale reports of calls sent before it opened change nothing.
        assert_eq!(c.on_success(false, t0, t0), None);
        assert_eq!(
            c.on_route_failure(CircuitReason::ModelNotFound, false, t0, &mut rng),
            None
        );
        assert_eq!(c.reason(), Some(CircuitReason::Unauthorized));
    }

    #[test]
    fn half_open_lets_one_probe_and_doubles_the_wait_on_failure() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut c = CircuitBreaker::new(settings());
        let mut now = Instant::now();
        c.on_route_failure(CircuitReason::Unavailable, false, now, &mut rng);
        let mut waits = Vec::new();
        for _ in 0..6 {
            let CircuitAdmission::OpenUntil(until) = c.admission(now) else {
                panic!("not open");
            };
            waits.push((until - now).as_secs());
            now = until;
            assert_eq!(c.state(now), CircuitState::HalfOpen);
            assert_eq!(c.admission(now), CircuitAdmission::Probe);
            c.start_probe(now);
            assert_eq!(c.admission(now), CircuitAdmission::ProbeInFlight);
            // A report that is not the probe's decides nothing.
            assert_eq!(c.on_transient(false, now, now, &mut rng), None);
            assert!(c.on_transient(true, now, now, &mut rng).is_some());
        }
        assert_eq!(waits, [1, 2, 4, 8, 15, 15]);

        now += secs(15);
        c.start_probe(now);
        c.on_neutral(true);
        assert_eq!(
            c.admission(now),
            CircuitAdmission::Probe,
            "neutral frees the probe"
        );
        c.start_probe(now);
        assert_eq!(c.on_success(true, now, now), Some(CircuitState::Closed));
        assert_eq!(c.reason(), None);
        // Closed again, the next opening starts from the initial wait.
        c.on_route_failure(CircuitReason::QuotaExhausted, false, now, &mut rng);
        assert_eq!(c.admission(now), CircuitAdmission::OpenUntil(now + secs(1)));
    }

    #[test]
    fn jitter_shortens_the_wait_reproducibly() {
        let jittered = CircuitSettings {
            jitter: 0.5,
            ..CircuitSettings::default()
        };
        let now = Instant::now();
        let open_for = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut c = CircuitBreaker::new(jittered);
            c.on_route_failure(CircuitReason::Unavailable, false, now, &mut rng);
            match c.admission(now) {
                CircuitAdmission::OpenUntil(until) => until - now,
                other => panic!("{other:?}"),
            }
        };
        let waits: Vec<_> = (0..20).map(open_for).collect();
        assert!(waits
            .iter()
            .all(|w| *w > Duration::from_millis(500) && *w <= secs(1)));
        assert!(waits.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(open_for(3), open_for(3));
    }

    #[test]
    fn snapshot_round_trips_through_wall_time() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut c = CircuitBreaker::new(settings());
        let now = Instant::now();
        let wall = Utc::now();
        c.on_route_failure(CircuitReason::ModelNotFound, false, now, &mut rng);
        let snap = c.snapshot(now, wall);
        assert_eq!(
            snap,
            CircuitSnapshot::Open {
                reason: CircuitReason::ModelNotFound,
                until_ms: wall.timestamp_millis() + 1000,
                wait_ms: 1000
            }
        );
        // Restored 400 ms later (wall clock) on a fresh monotonic clock.
        let later = wall + chrono::TimeDelta::milliseconds(400);
        let restored = CircuitBreaker::restore(settings(), &snap, now, later);
        assert_eq!(
            restored.state(now),
            CircuitState::Open {
                reason: CircuitReason::ModelNotFound,
                until: now + Duration::from_millis(600)
            }
        );
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(
            serde_json::from_str::<CircuitSnapshot>(&json).unwrap(),
            snap
        );
        let half = CircuitSnapshot::HalfOpen {
            reason: CircuitReason::Unavailable,
            wait_ms: 4000,
        };
        let restored = CircuitBreaker::restore(settings(), &half, now, wall);
        assert_eq!(restored.admission(now), CircuitAdmission::Probe);
    }
}
