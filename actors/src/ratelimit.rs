//! Rate-limit budgets per route: a 429 pauses the route until the provider's
//! `Retry-After` has passed, and every request on that route waits it out.

use std::time::Duration;

use tokio::time::Instant;

/// One route's pause state.
#[derive(Debug, Clone, Default)]
pub struct RouteBudget {
    paused_until: Option<Instant>,
}

impl RouteBudget {
    /// Pauses the route for `wait` from `now`; a longer pause already set wins.
    pub fn pause(&mut self, now: Instant, wait: Duration) {
        let until = now + wait;
        if self.paused_until.is_none_or(|u| u < until) {
            self.paused_until = Some(until);
        }
    }

    /// When requests may go again, if the route is paused at `now`.
    pub fn resume_at(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|u| *u > now)
    }
}

/// The wait a 429 asks for: `retry-after-ms`, else `Retry-After` seconds,
/// else `fallback`; clamped to `[min, max]`.
pub fn retry_after(
    retry_after_ms: Option<&str>,
    retry_after_secs: Option<&str>,
    fallback: Duration,
    max: Duration,
) -> Duration {
    let parsed = retry_after_ms
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64((ms / 1000.0).max(0.0)))
        .or_else(|| {
            retry_after_secs
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
        })
        .unwrap_or(fallback);
    parsed.min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pause_holds_until_retry_after() {
        let mut b = RouteBudget::default();
        let now = Instant::now();
        assert!(b.resume_at(now).is_none());
        b.pause(now, Duration::from_secs(2));
        b.pause(now, Duration::from_secs(1));
        assert_eq!(b.resume_at(now), Some(now + Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.resume_at(Instant::now()).is_none());
    }

    #[test]
    fn parses_retry_after_headers() {
        let f = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(
            retry_after(Some("1500"), Some("2"), f, max),
            Duration::from_millis(1500)
        );
        assert_eq!(retry_after(None, Some("3"), f, max), Duration::from_secs(3));
        assert_eq!(retry_after(None, Some("soon"), f, max), f);
        assert_eq!(retry_after(None, Some("9999"), f, max), max);
    }
}
