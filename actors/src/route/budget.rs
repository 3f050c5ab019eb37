//! The rate budget of one route: requests and tokens per minute, and the
//! pause a 429 imposes.
//!
//! Each budget is modelled the way providers enforce it: a bucket holding at
//! most `limit`, refilled continuously over a minute. The limit comes from the
//! config, or is learned from the provider's headers. A call may go when its
//! request and its estimated tokens are in the bucket (plus a small reserve);
//! otherwise the answer is how long until they are. Because the bucket refills
//! at the provider's rate, the calls waiting after a pause go out paced by the
//! refill rather than all at once.
//!
//! The local estimate is corrected by each `remaining` the provider reports.
//! That number was produced when the provider admitted the call, so calls
//! sent after it (still in flight, or already answered) are not in it; the
//! budget numbers what it sends to take exactly those off again.
//!
//! A plain value: times are UTC (the one clock replicas share), so it can be
//! stored in KV and read back by another process.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::limits::{LimitReading, RateLimitInfo};

/// The window a per-minute limit refills over.
const WINDOW_SECS: f64 = 60.0;

/// Share of a limit kept unspent, against the error of the estimates
/// (rounded `remaining`, token estimates, clocks). It costs a fraction of a
/// second once, not throughput: the bucket still drains at the refill rate.
const RESERVE: f64 = 0.01;

/// The longest pause accepted (a bound that keeps the time arithmetic safe).
const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// A route's requests and tokens budgets and its pause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateBudget {
    requests: Bucket,
    tokens: Bucket,
    /// When the buckets were last refilled.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    updated: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_milliseconds_option")]
    paused_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Bucket {
    /// Per minute; `None` while unknown (nothing held back).
    limit: Option<u64>,
    /// This replica's share of `limit` (1 when it drives the route alone):
    /// its bucket holds and refills that share.
    #[serde(default = "whole")]
    share: f64,
    /// From the config: headers may lower the estimate, not change the limit.
    configured: bool,
    /// Estimated units in the provider's bucket; negative when overdrawn.
    available: f64,
    /// Units sent so far, as estimated when sent: numbers each call.
    sent: f64,
}

/// What one call took from the budget; kept until the call is reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Charge {
    /// Requests and estimated tokens sent before this call.
    requests_before: f64,
    tokens_before: f64,
    est_tokens: u64,
    at: DateTime<Utc>,
}

/// The share of a route driven alone.
fn whole() -> f64 {
    1.0
}

impl Bucket {
    fn new(limit: Option<u64>) -> Self {
        let limit = limit.filter(|&l| l > 0);
        Bucket {
            limit,
            share: 1.0,
            configured: limit.is_some(),
            available: limit.map_or(0.0, |l| l as f64),
            sent: 0.0,
        }
    }

    /// This replica's part of the limit, per minute.
    fn slice(&self) -> Option<f64> {
        self.limit.map(|l| l as f64 * self.share)
    }

    fn set_share(&mut self, share: f64) {
        self.share = share;
        if let Some(slice) = self.slice() {
            self.available = self.available.min(slice);
        }
    }

    fn configure(&mut self, limit: Option<u64>) {
        match limit.filter(|&l| l > 0) {
            Some(limit) => {
                self.limit = Some(limit);
                self.configured = true;
                self.available = self.available.min(limit as f64 * self.share);
            }
            None if self.configured => {
                self.limit = None;
                self.configured = false;
            }
            None => {}
        }
    }

    fn refill(&mut self, seconds: f64) {
        if let Some(limit) = self.slice() {
            self.available = (self.available + seconds * limit / WINDOW_SECS).min(limit);
        }
    }

    /// Time until `need` units (plus the reserve) are in the bucket.
    fn wait_for(&self, need: f64) -> Duration {
        let Some(limit) = self.slice() else {
            return Duration::ZERO;
        };
        // More than the whole budget goes when the bucket is full: the
        // provider will say what it thinks of it.
        let target = (need + limit * RESERVE).min(limit);
        secs((target - self.available) * WINDOW_SECS / limit)
    }

    fn take(&mut self, units: f64) {
        self.spend(units);
        self.sent += units;
    }

    /// Takes `units` (gives back if negative). A debt beyond a whole bucket
    /// only comes from a garbage count, and must not hold the route for hours.
    fn spend(&mut self, units: f64) {
        if let Some(limit) = self.slice() {
            self.available = (self.available - units).clamp(-limit, limit);
        }
    }

    /// Corrects the estimate with a reading taken when the call numbered by
    /// `sent_through` (this call included) was admitted, `age` seconds ago.
    /// Returns true when a limit was learned or changed.
    fn correct(&mut self, reading: Option<LimitReading>, sent_through: f64, age: f64) -> bool {
        let Some(reading) = reading else {
            return false;
        };
        let provider_limit = reading.limit as f64;
        let sent_after = (self.sent - sent_through).max(0.0);
        let fresh = (reading.remaining as f64 + age * provider_limit / WINDOW_SECS - sent_after)
            .min(provider_limit);
        if !self.configured && self.limit != Some(reading.limit) {
            self.limit = Some(reading.limit);
            self.available = fresh.min(provider_limit * self.share);
            return true;
        }
        // Only ever lower: a reading may be staler than what we know (other
        // replicas' calls, a 429 since), and being low costs a moment once.
        self.available = self.available.min(fresh);
        false
    }

    fn empty(&mut self) {
        if self.limit.is_some() {
            self.available = self.available.min(0.0);
        }
    }
}

impl RateBudget {
    /// A budget with the configured limits (`None`: learn from the headers).
    pub fn new(rpm: Option<u64>, tpm: Option<u64>, now: DateTime<Utc>) -> Self {
        RateBudget {
            requests: Bucket::new(rpm),
            tokens: Bucket::new(tpm),
            updated: now,
            paused_until: None,
        }
    }

    /// Applies the configured limits to a budget read back from storage: a
    /// configured limit replaces the stored one, and one no longer configured
    /// is learned again.
    pub fn configure(&mut self, rpm: Option<u64>, tpm: Option<u64>) {
        self.requests.configure(rpm);
        self.tokens.configure(tpm);
    }

    /// Sets this replica's share of the route's limits (in `(0, 1]`: other
    /// replicas drive the same route and take the rest): its buckets hold
    /// and refill that share. Anything else is read as 1 (the route alone).
    pub fn set_share(&mut self, share: f64) {
        let share = if share > 0.0 && share <= 1.0 {
            share
        } else {
            1.0
        };
        self.requests.set_share(share);
        self.tokens.set_share(share);
    }

    /// This replica's share of the route's limits.
    pub fn share(&self) -> f64 {
        self.requests.share
    }

    /// Requests per minute, configured or learned.
    pub fn rpm(&self) -> Option<u64> {
        self.requests.limit
    }

    /// Tokens per minute, configured or learned.
    pub fn tpm(&self) -> Option<u64> {
        self.tokens.limit
    }

    /// Until when the route is paused, if it is at `now`.
    pub fn paused_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.paused_until.filter(|&until| until > now)
    }

    /// Pauses the route for `wait` (a longer pause already set wins); returns
    /// the end of the pause.
    pub fn pause(&mut self, wait: Duration, now: DateTime<Utc>) -> DateTime<Utc> {
        let wait = TimeDelta::from_std(wait.min(MAX_PAUSE)).unwrap_or(TimeDelta::zero());
        let until = now.checked_add_signed(wait).unwrap_or(now);
        let until = self.paused_until.map_or(until, |p| p.max(until));
        self.paused_until = Some(until);
        until
    }

    /// Takes a request of about `est_tokens` tokens from the budget, or tells
    /// how long until it may go.
    pub fn try_take(&mut self, est_tokens: u64, now: DateTime<Utc>) -> Result<Charge, Duration> {
        self.refill(now);
        if let Some(until) = self.paused_until(now) {
            return Err((until - now).to_std().unwrap_or(Duration::ZERO));
        }
        // A call never costs more than a whole bucket, whatever its estimate.
        let est_tokens = self
            .tokens
            .slice()
            .map_or(est_tokens, |l| est_tokens.min(l.max(1.0) as u64));
        let est = est_tokens as f64;
        let wait = self.requests.wait_for(1.0).max(self.tokens.wait_for(est));
        if !wait.is_zero() {
            return Err(wait);
        }
        let charge = Charge {
            requests_before: self.requests.sent,
            tokens_before: self.tokens.sent,
            est_tokens,
            at: now,
        };
        self.requests.take(1.0);
        self.tokens.take(est);
        Ok(charge)
    }

    /// The call of `charge` was answered (success, or any answer the provider
    /// billed) using `tokens`, with these headers. Returns true when a limit
    /// was learned or changed.
    pub fn on_answer(
        &mut self,
        charge: &Charge,
        tokens: Option<u64>,
        limits: &RateLimitInfo,
        now: DateTime<Utc>,
    ) -> bool {
        self.refill(now);
        if let (Some(tokens), true) = (tokens, self.tokens.limit.is_some()) {
            // Settle the estimate; `sent` keeps estimates, see `correct`.
            self.tokens.spend(tokens as f64 - charge.est_tokens as f64);
        }
        self.correct(charge, limits, now)
    }

    /// The call of `charge` was refused with a 429: the provider's budget is
    /// spent. Empties the budget that ran out (both when the headers do not
    /// say which); the caller pauses the route. Returns true when a limit was
    /// learned or changed.
    pub fn on_rate_limited(
        &mut self,
        charge: &Charge,
        limits: &RateLimitInfo,
        now: DateTime<Utc>,
    ) -> bool {
        self.refill(now);
        let learned = self.correct(charge, limits, now);
        let short_requests = limits.requests.is_some_and(|r| r.remaining < 1);
        let short_tokens = limits
            .tokens
            .is_some_and(|t| t.remaining < charge.est_tokens);
        if short_requests || !short_tokens {
            self.requests.empty();
        }
        if short_tokens || !short_requests {
            self.tokens.empty();
        }
        learned
    }

    fn correct(&mut self, charge: &Charge, limits: &RateLimitInfo, now: DateTime<Utc>) -> bool {
        let age = seconds_between(charge.at, now);
        let requests = self
            .requests
            .correct(limits.requests, charge.requests_before + 1.0, age);
        let tokens = self.tokens.correct(
            limits.tokens,
            charge.tokens_before + charge.est_tokens as f64,
            age,
        );
        requests || tokens
    }

    fn refill(&mut self, now: DateTime<Utc>) {
        // A clock that went back (another replica's, a restore) refills nothing.
        let seconds = seconds_between(self.updated, now);
        self.requests.refill(seconds);
        self.tokens.refill(seconds);
        self.updated = self.updated.max(now);
    }
}

/// Seconds from `from` to `to`, zero if `to` is earlier.
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).to_std().map_or(0.0, |d| d.as_secs_f64())
}

/// A computed wait in seconds, clamped to `[0, 60 s]`: no budget needs more
/// than a window to refill, and the input may be anything.
fn secs(seconds: f64) -> Duration {
    if seconds.is_nan() || seconds <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(seconds.min(WINDOW_SECS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn at(ms: i64) -> DateTime<Utc> {
        t0() + TimeDelta::milliseconds(ms)
    }

    fn reading(limit: u64, remaining: u64) -> Option<LimitReading> {
        Some(LimitReading {
            limit,
            remaining,
            reset: Duration::ZERO,
        })
    }

    fn requests(limit: u64, remaining: u64) -> RateLimitInfo {
        RateLimitInfo {
            requests: reading(limit, remaining),
            ..RateLimitInfo::default()
        }
    }

    #[test]
    fn unknown_limits_hold_nothing_back() {
        let mut b = RateBudget::new(None, None, t0());
        for _ in 0..10_000 {
            assert!(b.try_take(1_000_000, t0()).is_ok());
        }
        assert_eq!((b.rpm(), b.tpm()), (None, None));
    }

    #[test]
    fn configured_rpm_is_a_bucket_refilled_over_a_minute() {
        let mut b = RateBudget::new(Some(600), None, t0());
        // 600 minus the 1% reserve go at once.
        let burst = (0..1000)
            .take_while(|_| b.try_take(0, t0()).is_ok())
            .count();
        assert_eq!(burst, 594);
        // Then one every 100 ms.
        let wait = b.try_take(0, t0()).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(b.try_take(0, at(101)).is_ok());
        assert!(b.try_take(0, at(101)).is_err());
        assert!(b.try_take(0, at(201)).is_ok());
    }

    /// Takes every request the budget lets go, one look per 10 ms, from
    /// `from` ms for `ms` ms.
    fn taken_over(b: &mut RateBudget, from: i64, ms: i64) -> usize {
        (from..from + ms)
            .step_by(10)
            .map(|t| {
                (0..1000)
                    .take_while(|_| b.try_take(0, at(t)).is_ok())
                    .count()
            })
            .sum()
    }

    #[test]
    fn a_share_holds_and_refills_that_part_of_the_limit() {
        let mut b = RateBudget::new(Some(600), None, t0());
        b.set_share(1.0 / 3.0);
        assert!((b.share() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(b.rpm(), Some(600), "the provider's limit is shown whole");
        // A third of the bucket at once (less the reserve), then a third of
        // the rate: 200 a minute.
        let burst = taken_over(&mut b, 0, 1);
        assert_eq!(burst, 198);
        let minute = taken_over(&mut b, 10, 60_000);
        assert!((195..=201).contains(&minute), "{minute} in a minute");
        // The whole route again: the full rate.
        b.set_share(1.0);
        let minute = taken_over(&mut b, 60_010, 60_000);
        assert!((590..=606).contains(&minute), "{minute} in a minute");
        // Nonsense shares are the whole route.
        for bad in [0.0, -1.0, 2.0, f64::NAN, f64::INFINITY] {
            b.set_share(bad);
            assert_eq!(b.share(), 1.0, "{bad}");
        }
    }

    #[test]
    fn a_limit_learned_under_a_share_fills_only_that_part() {
        let mut b = RateBudget::new(None, None, t0());
        b.set_share(0.5);
        let charge = b.try_take(0, t0()).unwrap();
        assert!(b.on_answer(&charge, None, &requests(1200, 1199), t0()));
        assert_eq!(b.rpm(), Some(1200));
        let burst = taken_over(&mut b, 0, 1);
        assert!((590..=600).contains(&burst), "{burst}");
    }

    #[test]
    fn tokens_wait_for_their_estimate_and_settle_on_the_actual_count() {
        let mut b = RateBudget::new(None, Some(60_000), t0());
        let charge = b.try_take(50_000, t0()).unwrap();
        // 10 000 left; 10 000 more plus the 600-token reserve need 0.6 s...
        let wait = b.try_take(10_000, t0()).unwrap_err();
        assert_eq!(wait.as_millis(), 600);
        // ... but the call used only 40 000: 10 000 back.
        b.on_answer(&charge, Some(40_000), &RateLimitInfo::default(), t0());
        assert!(b.try_take(10_000, t0()).is_ok());
    }

    #[test]
    fn learns_the_limit_from_headers_minus_what_was_sent_since() {
        let mut b = RateBudget::new(None, None, t0());
        let first = b.try_take(0, t0()).unwrap();
        for _ in 0..99 {
            b.try_take(0, t0()).unwrap();
        }
        // The first call's answer, a second later: the provider had 599 left
        // when it admitted it; 99 went after it, and 10 came back since.
        assert!(b.on_answer(&first, None, &requests(600, 599), at(1000)));
        assert_eq!(b.rpm(), Some(600));
        let sendable = (0..1000)
            .take_while(|_| b.try_take(0, at(1000)).is_ok())
            .count();
        assert_eq!(sendable, 600 - 6 - 100 + 10);
    }

    #[test]
    fn headers_only_lower_the_estimate() {
        let mut b = RateBudget::new(None, None, t0());
        let first = b.try_take(0, t0()).unwrap();
        b.on_answer(&first, None, &requests(600, 599), t0());
        let second = b.try_take(0, t0()).unwrap();
        // Someone else spent 300: believed.
        assert!(!b.on_answer(&second, None, &requests(600, 298), t0()));
        let third = b.try_take(0, t0()).unwrap();
        // A higher figure (stale, or another view) is not.
        b.on_answer(&third, None, &requests(600, 590), t0());
        let sendable = (0..1000)
            .take_while(|_| b.try_take(0, t0()).is_ok())
            .count();
        assert_eq!(sendable, 297 - 6);
    }

    #[test]
    fn configured_limits_are_kept_whatever_the_headers_say() {
        let mut b = RateBudget::new(Some(100), Some(1000), t0());
        let charge = b.try_take(10, t0()).unwrap();
        let info = RateLimitInfo {
            requests: reading(10_000, 9_999),
            tokens: reading(2_000, 1_990),
            retry_after: None,
        };
        assert!(!b.on_answer(&charge, Some(10), &info, t0()));
        assert_eq!((b.rpm(), b.tpm()), (Some(100), Some(1000)));
    }

    #[test]
    fn a_429_empties_the_budget_that_ran_out_and_refill_paces_what_follows() {
        let mut b = RateBudget::new(Some(600), Some(60_000), t0());
        let charge = b.try_take(100, t0()).unwrap();
        let info = RateLimitInfo {
            requests: reading(600, 0),
            tokens: reading(60_000, 50_000),
            retry_after: Some(Duration::from_millis(100)),
        };
        b.on_rate_limited(&charge, &info, t0());
        let until = b.pause(Duration::from_millis(100), t0());
        assert_eq!(until, at(100));
        assert_eq!(b.try_take(100, at(50)), Err(Duration::from_millis(50)));
        // After the pause, one request per 100 ms once the reserve is back.
        let first = b.try_take(100, at(100)).unwrap_err();
        assert_eq!(first.as_millis(), 600);
        assert!(b.try_take(100, at(701)).is_ok());
        assert!(b.try_take(100, at(701)).is_err());
        assert!(b.try_take(100, at(801)).is_ok());
        // The tokens budget was not the one that ran out: the header's 50 000,
        // refilled for 801 ms, minus two calls.
        assert!((b.tokens.available - 50_601.0).abs() < 1e-6);
    }

    #[test]
    fn a_longer_pause_wins_and_the_pause_ends_by_itself() {
        let mut b = RateBudget::new(None, None, t0());
        b.pause(Duration::from_secs(2), t0());
        assert_eq!(b.pause(Duration::from_secs(1), t0()), at(2000));
        assert_eq!(b.paused_until(at(1999)), Some(at(2000)));
        assert_eq!(b.paused_until(at(2000)), None);
        // A huge pause is bounded, not a panic.
        b.pause(Duration::MAX, t0());
        assert!(b.paused_until(at(0)).is_some());
    }

    #[test]
    fn survives_a_round_trip_through_json() {
        let mut b = RateBudget::new(Some(600), None, t0());
        b.try_take(0, t0()).unwrap();
        b.pause(Duration::from_secs(3), t0());
        let json = serde_json::to_string(&b).unwrap();
        let back: RateBudget = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn garbage_token_counts_cost_at_most_a_bucket() {
        let mut b = RateBudget::new(None, Some(60_000), t0());
        let charge = b.try_take(u64::MAX, t0()).unwrap();
        b.on_answer(&charge, Some(u64::MAX), &RateLimitInfo::default(), t0());
        // A debt of one bucket: a minute repays it, then 1 600 tokens more.
        assert!(b.try_take(1000, at(61_000)).is_err());
        assert!(b.try_take(1000, at(62_000)).is_ok());
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = RateBudget::new(Some(60), None, at(10_000));
        while b.try_take(0, at(10_000)).is_ok() {}
        assert!(b.try_take(0, t0()).is_err());
        assert!(b.try_take(0, at(11_000)).is_ok());
    }
}
