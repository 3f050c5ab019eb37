//! Adaptive concurrency for one route: how many calls may be in flight,
//! learned with AIMD in the style of Vector's adaptive request concurrency
//! and Netflix's concurrency-limits.
//!
//! - Slow start: until the first back-off the limit grows by one per success,
//!   doubling every round trip, so a large provider is found in a few seconds
//!   rather than minutes.
//! - Then additive increase: about +1 per `limit` successes (one per round trip).
//! - Multiplicative decrease on back pressure (a 429, a route failure,
//!   transient failures above a tolerated rate, optionally latency far above
//!   the minimum), at most once per round trip: one burst of failures is one
//!   signal, not fifty. A steady trickle of random 5xx is not back pressure:
//!   cutting on each one would hold a busy route near a handful of calls.
//! - The limit grows only while it is actually reached: a route held back by
//!   its rate budget must not report (and later unleash) a limit it never used.
//!
//! Pure: the caller passes `now` and round-trip times.

use std::time::Duration;

use tokio::time::Instant;

/// Weight of one answer in the moving share of transient failures.
const FAILURE_WEIGHT: f64 = 1.0 / 32.0;

/// Round-trip times above this are read as this (keeps the arithmetic finite).
const MAX_RTT: Duration = Duration::from_secs(600);

/// Tuning of [`AdaptiveConcurrency`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencySettings {
    /// The limit before anything is learned.
    pub initial: usize,
    /// The ceiling (at least 1).
    pub max: usize,
    /// Factor applied on a 429 or a route failure.
    pub rate_limited_factor: f64,
    /// Factor applied on a transient failure (5xx, timeout): gentler, since
    /// those are often unrelated to load.
    pub transient_factor: f64,
    /// Transient failures count as back pressure only while their share of
    /// recent answers (a moving average) is above this.
    pub transient_tolerance: f64,
    /// Back off (with `transient_factor`) when the smoothed round trip exceeds
    /// the minimum by this factor. Off by default: an LLM's latency follows the
    /// length of its answer more than the provider's queue.
    pub latency_tolerance: Option<f64>,
}

impl Default for ConcurrencySettings {
    fn default() -> Self {
        ConcurrencySettings {
            initial: 8,
            max: 512,
            rate_limited_factor: 0.5,
            transient_factor: 0.9,
            transient_tolerance: 0.2,
            latency_tolerance: None,
        }
    }
}

/// What pushed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// 429 rate limit.
    RateLimited,
    /// 5xx, 408, 409, timeout, connection error.
    Transient,
    /// The route itself refused (outage, auth, unknown model, quota).
    RouteFailure,
}

/// The concurrency limit of one route.
#[derive(Debug, Clone)]
pub struct AdaptiveConcurrency {
    settings: ConcurrencySettings,
    /// Fractional so that additive increase can add `1 / limit` per success.
    limit: f64,
    slow_start: bool,
    smoothed_rtt: Option<Duration>,
    min_rtt: Option<Duration>,
    last_decrease: Option<Instant>,
    /// Last time the calls in flight reached the limit.
    last_saturated: Option<Instant>,
    /// Moving share of transient failures among answers.
    failure_share: f64,
}

impl AdaptiveConcurrency {
    pub fn new(settings: ConcurrencySettings) -> Self {
        let settings = sanitize(settings);
        AdaptiveConcurrency {
            limit: settings.initial as f64,
            settings,
            slow_start: true,
            smoothed_rtt: None,
            min_rtt: None,
            last_decrease: None,
            last_saturated: None,
            failure_share: 0.0,
        }
    }

    /// Resumes at a limit learned before (a restart): no slow start, since the
    /// operating point is known.
    pub fn resume(settings: ConcurrencySettings, limit: usize) -> Self {
        let mut concurrency = AdaptiveConcurrency::new(settings);
        concurrency.limit = limit.clamp(1, concurrency.settings.max) as f64;
        concurrency.slow_start = false;
        concurrency
    }

    /// Calls allowed in flight now.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(1, self.settings.max)
    }

    /// Tells how many calls are in flight after an admission.
    pub fn note_in_flight(&mut self, in_flight: usize, now: Instant) {
        if in_flight >= self.limit() {
            self.last_saturated = Some(now);
        }
    }

    /// A call that took `rtt` succeeded.
    pub fn on_success(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.min(MAX_RTT);
        self.failure_share *= 1.0 - FAILURE_WEIGHT;
        let smoothed = match self.smoothed_rtt {
            // EWMA with weight 1/8, as TCP does.
            Some(s) => s * 7 / 8 + rtt / 8,
            None => rtt,
        };
        self.smoothed_rtt = Some(smoothed);
        let min_rtt = self.min_rtt.map_or(rtt, |m| m.min(rtt));
        self.min_rtt = Some(min_rtt);

        if let Some(tolerance) = self.settings.latency_tolerance {
            if smoothed.as_secs_f64() > min_rtt.as_secs_f64() * tolerance {
                self.decrease(self.settings.transient_factor, now);
                return;
            }
        }
        // Grow only if the limit was reached while this call was in flight.
        let sent_at = now.checked_sub(rtt).unwrap_or(now);
        if self.last_saturated.is_none_or(|t| t < sent_at) {
            return;
        }
        let step = if self.slow_start {
            1.0
        } else {
            1.0 / self.limit
        };
        self.limit = (self.limit + step).min(self.settings.max as f64);
    }

    /// The provider pushed back.
    pub fn on_backoff(&mut self, kind: Backoff, now: Instant) {
        let factor = match kind {
            Backoff::RateLimited | Backoff::RouteFailure => self.settings.rate_limited_factor,
            Backoff::Transient => {
                self.failure_share = self.failure_share * (1.0 - FAILURE_WEIGHT) + FAILURE_WEIGHT;
                if self.failure_share <= self.settings.transient_tolerance {
                    return;
                }
                self.settings.transient_factor
            }
        };
        self.decrease(factor, now);
    }

    fn decrease(&mut self, factor: f64, now: Instant) {
        self.slow_start = false;
        // Calls that were already in flight when we cut back report the same
        // congestion: one decrease per round trip.
        let rtt = self.smoothed_rtt.unwrap_or(Duration::ZERO);
        if self.last_decrease.is_some_and(|t| now < t + rtt) {
            return;
        }
        self.last_decrease = Some(now);
        self.limit = (self.limit * factor).max(1.0);
    }
}

fn sanitize(mut s: ConcurrencySettings) -> ConcurrencySettings {
    let factor = |f: f64, default: f64| {
        if f.is_finite() {
            f.clamp(0.1, 1.0)
        } else {
            default
        }
    };
    s.max = s.max.max(1);
    s.initial = s.initial.clamp(1, s.max);
    s.rate_limited_factor = factor(s.rate_limited_factor, 0.5);
    s.transient_factor = factor(s.transient_factor, 0.9);
    s.transient_tolerance = if s.transient_tolerance.is_finite() {
        s.transient_tolerance.clamp(0.0, 1.0)
    } else {
        0.2
    };
    s.latency_tolerance = s
        .latency_tolerance
        .filter(|t| t.is_finite())
        .map(|t| t.max(1.0));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(100);

    fn settings() -> ConcurrencySettings {
        ConcurrencySettings {
            initial: 4,
            max: 64,
            ..ConcurrencySettings::default()
        }
    }

    /// One round trip with the limit fully used.
    fn saturated_round(c: &mut AdaptiveConcurrency, now: &mut Instant) {
        let limit = c.limit();
        c.note_in_flight(limit, *now);
        *now += RTT;
        for _ in 0..limit {
            c.on_success(RTT, *now);
        }
    }

    #[test]
    fn slow_start_doubles_per_round_trip_up_to_the_ceiling() {
        let mut now = Instant::now();
        let mut c = AdaptiveConcurrency::new(settings());
        let mut seen = vec![c.limit()];
        for _ in 0..6 {
            saturated_round(&mut c, &mut now);
            seen.push(c.limit());
        }
        assert_eq!(seen, [4, 8, 16, 32, 64, 64, 64]);
    }

    #[test]
    fn after_a_backoff_it_grows_by_about_one_per_round_trip() {
        let mut now = Instant::now();
        let mut c = AdaptiveConcurrency::resume(settings(), 20);
        c.on_backoff(Backoff::RateLimited, now);
        assert_eq!(c.limit(), 10);
        for expected in [11, 12, 13] {
            saturated_round(&mut c, &mut now);
            // 1/limit per success, `limit` successes: +1, give or take rounding.
            assert!(c.limit().abs_diff(expected) <= 1, "{}", c.limit());
        }
    }

    #[test]
    fn does_not_grow_while_the_limit_is_not_reached() {
        let mut now = Instant::now();
        let mut c = AdaptiveConcurrency::new(settings());
        c.note_in_flight(2, now);
        for _ in 0..100 {
            now += RTT;
            c.on_success(RTT, now);
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn decreases_at_most_once_per_round_trip() {
        let mut now = Instant::now();
        let mut c = AdaptiveConcurrency::resume(settings(), 64);
        c.on_success(RTT, now);
        for _ in 0..10 {
            c.on_backoff(Backoff::RateLimited, now);
        }
        assert_eq!(c.limit(), 32);
        now += RTT;
        c.on_backoff(Backoff::Transient, now);
        assert_eq!(c.limit(), 32, "one transient failure is not back pressure");
        for _ in 0..10 {
            c.on_backoff(Backoff::Transient, now);
        }
        assert_eq!(c.limit(), 28, "0.9 for transient failures in numbers");
        for _ in 0..20 {
            now += RTT;
            c.on_backoff(Backoff::RouteFailure, now);
        }
        assert_eq!(c.limit(), 1, "never below one");
    }

    #[test]
    fn random_transient_failures_do_not_hold_the_limit_down() {
        let mut now = Instant::now();
        let mut c = AdaptiveConcurrency::resume(settings(), 32);
        for round in 0..200 {
            c.note_in_flight(c.limit(), now);
            now += RTT;
            for call in 0..c.limit() {
                // One call in twenty fails.
                if (round * 64 + call) % 20 == 0 {
                    c.on_backoff(Backoff::Transient, now);
                } else {
                    c.on_success(RTT, now);
                }
            }
        }
        assert_eq!(c.limit(), 64);
        // Half of them failing is back pressure.
        for _ in 0..100 {
            now += RTT;
            c.on_success(RTT, now);
            c.on_backoff(Backoff::Transient, now);
        }
        assert!(c.limit() < 8, "{}", c.limit());
    }

    #[test]
    fn latency_far_above_the_minimum_backs_off_when_enabled() {
        let mut now = Instant::now();
        let mut c = AdaptiveConcurrency::resume(
            ConcurrencySettings {
                latency_tolerance: Some(2.0),
                ..settings()
            },
            40,
        );
        c.on_success(RTT, now);
        for _ in 0..40 {
            now += RTT * 5;
            c.on_success(RTT * 5, now);
        }
        assert!(c.limit() < 40, "{}", c.limit());
    }

    #[test]
    fn settings_are_sanitized_and_huge_rtts_do_not_panic() {
        let mut c = AdaptiveConcurrency::new(ConcurrencySettings {
            initial: 0,
            max: 0,
            rate_limited_factor: f64::NAN,
            transient_factor: 7.0,
            transient_tolerance: f64::NAN,
            latency_tolerance: Some(f64::INFINITY),
        });
        assert_eq!(c.limit(), 1);
        let now = Instant::now();
        c.note_in_flight(1, now);
        c.on_success(Duration::MAX, now);
        c.on_success(Duration::MAX, now);
        c.on_backoff(Backoff::RateLimited, now);
        assert_eq!(c.limit(), 1);
    }
}
