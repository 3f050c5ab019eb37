//! The engine's wall clock, for decisions by the calendar: deadlines and
//! off-peak windows. Injectable, so tests set the time of day: engine tests
//! run it from tokio's paused time ([`Clock::following_tokio`]), and the
//! daemon can shift it by a configured offset for drills
//! (`offpeak.clock_offset_secs`). Timers still run on tokio time.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A source of the current UTC time.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(Utc::now))
    }

    /// The system clock shifted by `offset` (a drill: "it is 00:00 now").
    pub fn offset(offset: chrono::Duration) -> Clock {
        Clock(Arc::new(move || Utc::now() + offset))
    }

    /// `start` at the moment of the call, then advancing with tokio's clock:
    /// under paused time, `tokio::time::advance` moves the calendar too.
    pub fn following_tokio(start: DateTime<Utc>) -> Clock {
        let origin = tokio::time::Instant::now();
        Clock(Arc::new(move || {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(origin);
            start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
        }))
    }

    /// Now.
    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time() {
        let start = DateTime::parse_from_rfc3339("2026-03-01T05:59:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = Clock::following_tokio(start);
        assert_eq!(c.now(), start);
        tokio::time::advance(std::time::Duration::from_secs(90)).await;
        assert_eq!(c.now(), start + chrono::Duration::seconds(90));
    }

    #[test]
    fn an_offset_clock_is_ahead_of_the_system_clock() {
        let c = Clock::offset(chrono::Duration::hours(3));
        let ahead = c.now() - Utc::now();
        assert!(ahead > chrono::Duration::minutes(179), "{ahead}");
    }
}
