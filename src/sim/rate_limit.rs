//! OpenAI-style rate limits: a requests-per-minute and a tokens-per-minute
//! budget, each a token bucket refilled continuously, and the
//! `x-ratelimit-*` header values that report them.
//!
//! No I/O and no clock of its own: the caller passes `now`, so the policy is
//! tested with made-up instants.

use std::time::Duration;

use tokio::time::Instant;

/// The window OpenAI's limits are expressed in.
const WINDOW: Duration = Duration::from_secs(60);

/// Which budget refused a request; also the `type` of OpenAI's 429 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
        }
    }
}

/// One budget as the `x-ratelimit-{limit,remaining,reset}-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BudgetState {
    pub limit: u32,
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// Both budgets; `None` where no limit is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Quota {
    pub requests: Option<BudgetState>,
    pub tokens: Option<BudgetState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Granted(Quota),
    Limited(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub kind: LimitKind,
    /// When enough budget will be back; `None` when the request is larger
    /// than the whole per-minute budget and can never pass.
    pub retry_after: Option<Duration>,
    pub limit: u32,
    pub used: u64,
    pub requested: u64,
    pub quota: Quota,
}

#[derive(Debug, Clone)]
struct TokenBucket {
    limit: u32,
    available: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(limit: u32, now: Instant) -> Self {
        TokenBucket {
            limit,
            available: f64::from(limit),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let refilled = elapsed * f64::from(self.limit) / WINDOW.as_secs_f64();
        self.available = (self.available + refilled).min(f64::from(self.limit));
        self.updated = now;
    }

    /// How long until `amount` is available; `None` if it never will be.
    fn wait_for(&self, amount: u64) -> Option<Duration> {
        let amount = amount as f64;
        if amount > f64::from(self.limit) {
            return None;
        }
        Some(self.time_to_refill(amount - self.available))
    }

    fn state(&self) -> BudgetState {
        BudgetState {
            limit: self.limit,
            remaining: self.available.max(0.0).floor() as u64,
            reset: self.time_to_refill(f64::from(self.limit) - self.available),
        }
    }

    fn time_to_refill(&self, missing: f64) -> Duration {
        // Multiply before dividing: 1 * 60 / 3 is exactly 20 s, 1 / (3 / 60) is not.
        let seconds = missing.max(0.0) * WINDOW.as_secs_f64() / f64::from(self.limit);
        Duration::try_from_secs_f64(seconds).unwrap_or(WINDOW)
    }

    fn used(&self) -> u64 {
        (f64::from(self.limit) - self.available).max(0.0).ceil() as u64
    }
}

/// The simulator's requests and tokens budgets; a limit of 0 means unlimited.
#[derive(Debug, Clone)]
pub(crate) struct RateLimiter {
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
}

impl RateLimiter {
    pub(crate) fn new(rpm: u32, tpm: u32, now: Instant) -> Self {
        RateLimiter {
            requests: (rpm > 0).then(|| TokenBucket::new(rpm, now)),
            tokens: (tpm > 0).then(|| TokenBucket::new(tpm, now)),
        }
    }

    /// Takes one request and `tokens` tokens from the budgets, or neither.
    pub(crate) fn admit(&mut self, now: Instant, tokens: u64) -> Admission {
        for bucket in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            bucket.refill(now);
        }
        let checks = [
            (LimitKind::Requests, &self.requests, 1),
            (LimitKind::Tokens, &self.tokens, tokens),
        ];
        for (kind, bucket, amount) in checks {
            let Some(bucket) = bucket else { continue };
            let wait = bucket.wait_for(amount);
            if wait != Some(Duration::ZERO) {
                return Admission::Limited(Refusal {
                    kind,
                    retry_after: wait,
                    limit: bucket.limit,
                    used: bucket.used(),
                    requested: amount,
                    quota: self.quota(),
                });
            }
        }
        if let Some(bucket) = &mut self.requests {
            bucket.available -= 1.0;
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.available -= tokens as f64;
        }
        Admission::Granted(self.quota())
    }

    fn quota(&self) -> Quota {
        Quota {
            requests: self.requests.as_ref().map(TokenBucket::state),
            tokens: self.tokens.as_ref().map(TokenBucket::state),
        }
    }
}

/// Formats a duration the way OpenAI's headers and messages do (Go's
/// `time.Duration` style): `"0s"`, `"120ms"`, `"1.5s"`, `"6m0s"`, `"1h0m0s"`.
pub(crate) fn format_duration(duration: Duration) -> String {
    // Rounded up to whole milliseconds so a pending wait never reads as "0s".
    let millis = duration.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let hours = millis / 3_600_000;
    let minutes = millis / 60_000 % 60;
    let seconds_millis = millis % 60_000;
    let mut seconds = format!("{}.{:03}", seconds_millis / 1000, seconds_millis % 1000);
    while seconds.ends_with('0') {
        seconds.pop();
    }
    if seconds.ends_with('.') {
        seconds.pop();
    }
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, _) => format!("{minutes}m{seconds}s"),
        _ => format!("{hours}h{minutes}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations_like_openai() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(10), "1ms"),
            (Duration::from_millis(120), "120ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(8640), "8.64s"),
            (Duration::from_secs(20), "20s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(61_250), "1m1.25s"),
            (Duration::from_secs(3600), "1h0m0s"),
        ];
        for (duration, expected) in cases {
            assert_eq!(format_duration(duration), expected, "{duration:?}");
        }
    }

    #[test]
    fn unlimited_limiter_always_admits_and_reports_nothing() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(0, 0, now);
        for _ in 0..10_000 {
            assert_eq!(
                limiter.admit(now, 1_000_000),
                Admission::Granted(Quota::default())
            );
        }
    }

    #[test]
    fn requests_budget_refuses_the_request_after_the_limit() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(3, 0, now);
        for remaining in [2, 1, 0] {
            let Admission::Granted(quota) = limiter.admit(now, 10) else {
                panic!("refused within the limit");
            };
            let requests = quota.requests.unwrap();
            assert_eq!(requests.limit, 3);
            assert_eq!(requests.remaining, remaining);
            assert!(quota.tokens.is_none());
        }
        let Admission::Limited(refusal) = limiter.admit(now, 10) else {
            panic!("admitted over the limit");
        };
        assert_eq!(refusal.kind, LimitKind::Requests);
        assert_eq!((refusal.limit, refusal.used, refusal.requested), (3, 3, 1));
        // 3 per minute refills one request every 20 s.
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(20)));
        assert_eq!(
            refusal.quota.requests.unwrap().reset,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn budget_refills_continuously() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(60, 0, start);
        for _ in 0..60 {
            assert!(matches!(limiter.admit(start, 0), Admission::Granted(_)));
        }
        assert!(matches!(limiter.admit(start, 0), Admission::Limited(_)));
        let later = start + Duration::from_millis(999);
        assert!(matches!(limiter.admit(later, 0), Admission::Limited(_)));
        let later = start + Duration::from_secs(1);
        assert!(matches!(limiter.admit(later, 0), Admission::Granted(_)));
    }

    #[test]
    fn tokens_budget_refuses_without_spending_the_request() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(10, 1000, now);
        assert!(matches!(limiter.admit(now, 900), Admission::Granted(_)));
        let Admission::Limited(refusal) = limiter.admit(now, 200) else {
            panic!("admitted over the token limit");
        };
        assert_eq!(refusal.kind, LimitKind::Tokens);
        assert_eq!(refusal.requested, 200);
        assert_eq!(
            refusal.quota.requests.unwrap().remaining,
            9,
            "refused requests are free"
        );
        assert_eq!(refusal.quota.tokens.unwrap().remaining, 100);
        // 100 missing tokens at 1000 per minute.
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(6)));
    }

    #[test]
    fn request_larger_than_the_budget_can_never_pass() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(0, 100, now);
        let Admission::Limited(refusal) = limiter.admit(now, 101) else {
            panic!("admitted a request larger than the budget");
        };
        assert_eq!(refusal.retry_after, None);
    }
}
