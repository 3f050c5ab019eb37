//! Provider rate-limit headers turned into values: OpenAI's `x-ratelimit-*`,
//! Anthropic's `anthropic-ratelimit-*`, `retry-after-ms` and `Retry-After`.
//!
//! Headers come from outside: every duration is clamped to `[0, max_wait]`
//! before it becomes a [`Duration`], and garbage becomes the clamp or `None`,
//! never a panic.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The window a per-minute limit refills over; also the reset assumed when a
/// reading has none.
const WINDOW: Duration = Duration::from_secs(60);

/// One budget as a provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitReading {
    /// The limit per minute.
    pub limit: u64,
    /// What was left when the provider answered (at most `limit`).
    pub remaining: u64,
    /// Time until the budget is full again.
    pub reset: Duration,
}

/// Everything the headers of one response say about the route's limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitInfo {
    pub requests: Option<LimitReading>,
    pub tokens: Option<LimitReading>,
    /// How long the provider asks us to wait (429s and 503s carry it).
    pub retry_after: Option<Duration>,
}

/// Reads the rate-limit headers among `headers` (names in any case).
pub fn parse_rate_limit_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    now: DateTime<Utc>,
    max_wait: Duration,
) -> RateLimitInfo {
    let headers: Vec<(String, &str)> = headers
        .into_iter()
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| *value)
    };
    let clamp = |d: Duration| d.min(max_wait);

    let openai = |unit: &str| {
        reading(
            get(&format!("x-ratelimit-limit-{unit}")),
            get(&format!("x-ratelimit-remaining-{unit}")),
            get(&format!("x-ratelimit-reset-{unit}"))
                .and_then(parse_reset)
                .map(clamp),
            max_wait,
        )
    };
    let anthropic = |unit: &str| {
        reading(
            get(&format!("anthropic-ratelimit-{unit}-limit")),
            get(&format!("anthropic-ratelimit-{unit}-remaining")),
            get(&format!("anthropic-ratelimit-{unit}-reset"))
                .and_then(|text| until_timestamp(text, now))
                .map(clamp),
            max_wait,
        )
    };

    let requests = openai("requests").or_else(|| anthropic("requests"));
    // Anthropic may limit input and output tokens apart. Every token is counted
    // against the one budget we keep, so the smallest limit is the one that
    // binds first; choosing by limit (not by what remains) keeps it stable from
    // one response to the next.
    let tokens = [
        openai("tokens"),
        anthropic("tokens"),
        anthropic("input-tokens"),
        anthropic("output-tokens"),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|r| (r.limit, r.remaining));

    let retry_after = match get("retry-after-ms") {
        Some(ms) => parse_seconds(ms, 1e-3),
        None => get("retry-after")
            .and_then(|text| parse_seconds(text, 1.0).or_else(|| until_http_date(text, now))),
    }
    .map(clamp);

    RateLimitInfo {
        requests,
        tokens,
        retry_after,
    }
}

/// Parses an OpenAI reset: Go duration syntax (`6m0s`, `1s`, `20ms`,
/// `1h2m3.5s`, `0.5s`, `10us`) or plain seconds (`12`, `0.25`). Too large
/// saturates to [`Duration::MAX`]; negative, NaN or malformed is `None`.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Some(duration) = parse_seconds(text, 1.0) {
        return Some(duration);
    }
    let mut rest = text;
    let mut seconds = 0.0_f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        // Longest unit first: `ms` before `m`.
        let (unit, scale) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("μs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .into_iter()
        .find(|(unit, _)| rest.starts_with(unit))?;
        rest = &rest[unit.len()..];
        seconds += number * scale;
    }
    saturating_secs(seconds)
}

/// A reading needs a positive limit and a remaining count; an unreadable
/// reset is taken as a full window (the longest a per-minute budget needs).
fn reading(
    limit: Option<&str>,
    remaining: Option<&str>,
    reset: Option<Duration>,
    max_wait: Duration,
) -> Option<LimitReading> {
    let limit: u64 = limit?.parse().ok().filter(|&l| l > 0)?;
    let remaining: u64 = remaining?.parse().ok()?;
    Some(LimitReading {
        limit,
        remaining: remaining.min(limit),
        reset: reset.unwrap_or(WINDOW.min(max_wait)),
    })
}

/// `text` as a number of units of `scale` seconds; `None` unless it is a
/// number that is neither negative nor NaN.
fn parse_seconds(text: &str, scale: f64) -> Option<Duration> {
    let value: f64 = text.trim().parse().ok()?;
    saturating_secs(value * scale)
}

/// Seconds to a [`Duration`]: `None` for negative or NaN, saturating above
/// what a `Duration` holds (`from_secs_f64` would panic there).
fn saturating_secs(seconds: f64) -> Option<Duration> {
    if seconds.is_nan() || seconds < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

/// Time from `now` until an RFC 3339 timestamp; zero if it has passed.
fn until_timestamp(text: &str, now: DateTime<Utc>) -> Option<Duration> {
    let at = DateTime::parse_from_rfc3339(text).ok()?;
    Some(until(at.with_timezone(&Utc), now))
}

/// Time from `now` until an HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`).
fn until_http_date(text: &str, now: DateTime<Utc>) -> Option<Duration> {
    let at = DateTime::parse_from_rfc2822(text).ok()?;
    Some(until(at.with_timezone(&Utc), now))
}

fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(60);

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap()
    }

    fn parse(headers: &[(&str, &str)]) -> RateLimitInfo {
        parse_rate_limit_headers(headers.iter().copied(), now(), MAX)
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn reset_reads_go_durations_and_plain_seconds() {
        let cases = [
            ("6m0s", ms(360_000)),
            ("1s", ms(1000)),
            ("20ms", ms(20)),
            ("1h2m3.5s", ms(3_723_500)),
            ("0.5s", ms(500)),
            ("1m1.25s", ms(61_250)),
            ("10us", Duration::from_micros(10)),
            ("12", ms(12_000)),
            (" 0.25 ", ms(250)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_reset(text), Some(expected), "{text}");
        }
    }

    #[test]
    fn reset_garbage_is_none_or_saturates() {
        for text in ["", "soon", "-5", "-1s", "NaN", "1x", "s", "1.2.3s", "5m-1s"] {
            assert_eq!(parse_reset(text), None, "{text:?}");
        }
        for text in ["1e20", "inf", "99999999999999999999999h"] {
            assert_eq!(parse_reset(text), Some(Duration::MAX), "{text:?}");
        }
    }

    #[test]
    fn reads_openai_headers_in_any_case() {
        let info = parse(&[
            ("X-RateLimit-Limit-Requests", "12000"),
            ("x-ratelimit-remaining-requests", "11999"),
            ("x-ratelimit-reset-requests", "5ms"),
            ("x-ratelimit-limit-tokens", "1000000"),
            ("x-ratelimit-remaining-tokens", "999000"),
            ("x-ratelimit-reset-tokens", "60ms"),
        ]);
        assert_eq!(
            info.requests,
            Some(LimitReading {
                limit: 12000,
                remaining: 11999,
                reset: ms(5)
            })
        );
        assert_eq!(
            info.tokens,
            Some(LimitReading {
                limit: 1_000_000,
                remaining: 999_000,
                reset: ms(60)
            })
        );
        assert_eq!(info.retry_after, None);
    }

    #[test]
    fn reads_anthropic_headers_with_rfc3339_resets() {
        let info = parse(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            (
                "anthropic-ratelimit-requests-reset",
                "2015-10-21T07:27:01.2Z",
            ),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "39000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2015-10-21T07:27:02Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "7990"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2015-10-21T09:27:02+02:00",
            ),
        ]);
        let requests = info.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (50, 49));
        assert_eq!(requests.reset, ms(1200));
        // The output budget is the smaller one: it binds first.
        assert_eq!(
            info.tokens,
            Some(LimitReading {
                limit: 8000,
                remaining: 7990,
                reset: ms(2000)
            })
        );
    }

    #[test]
    fn anthropic_reset_in_the_past_is_zero_and_far_future_is_clamped() {
        let info = parse(&[
            ("anthropic-ratelimit-tokens-limit", "100"),
            ("anthropic-ratelimit-tokens-remaining", "10"),
            ("anthropic-ratelimit-tokens-reset", "2000-01-01T00:00:00Z"),
            ("anthropic-ratelimit-requests-limit", "100"),
            ("anthropic-ratelimit-requests-remaining", "10"),
            ("anthropic-ratelimit-requests-reset", "9999-01-01T00:00:00Z"),
        ]);
        assert_eq!(info.tokens.unwrap().reset, Duration::ZERO);
        assert_eq!(info.requests.unwrap().reset, MAX);
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let info = parse(&[("retry-after", "3"), ("Retry-After-Ms", "1500.5")]);
        assert_eq!(info.retry_after, Some(Duration::from_micros(1_500_500)));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(parse(&[("Retry-After", "2.5")]).retry_after, Some(ms(2500)));
        let date = parse(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(date.retry_after, Some(ms(60_000)));
        let past = parse(&[("retry-after", "Wed, 21 Oct 2015 07:00:00 GMT")]);
        assert_eq!(past.retry_after, Some(Duration::ZERO));
        let far = parse(&[("retry-after", "Fri, 31 Dec 2100 23:59:59 GMT")]);
        assert_eq!(far.retry_after, Some(MAX));
    }

    #[test]
    fn retry_after_garbage_is_clamped_or_none() {
        for huge in [
            "1e20",
            "inf",
            "99999999999999999999999999",
            "1.7976931348623157e308",
        ] {
            assert_eq!(parse(&[("retry-after", huge)]).retry_after, Some(MAX));
            assert_eq!(parse(&[("retry-after-ms", huge)]).retry_after, Some(MAX));
        }
        for bad in ["", "NaN", "-5", "-inf", "soon", "Wed, 99 Oct 2015"] {
            assert_eq!(parse(&[("retry-after", bad)]).retry_after, None, "{bad:?}");
            assert_eq!(
                parse(&[("retry-after-ms", bad)]).retry_after,
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limit_garbage_drops_the_reading_and_clamps_the_rest() {
        let bad = |limit: &str, remaining: &str| {
            parse(&[
                ("x-ratelimit-limit-requests", limit),
                ("x-ratelimit-remaining-requests", remaining),
            ])
            .requests
        };
        for (limit, remaining) in [
            ("", "1"),
            ("-5", "1"),
            ("1e20", "1"),
            ("99999999999999999999999", "1"),
            ("0", "0"),
            ("100", "NaN"),
            ("100", ""),
        ] {
            assert_eq!(bad(limit, remaining), None, "{limit:?} {remaining:?}");
        }
        // Remaining above the limit is read as the limit; no reset means a full window.
        let reading = bad("100", "500").unwrap();
        assert_eq!((reading.remaining, reading.reset), (100, MAX));
        let clamped = parse(&[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "1e20"),
        ]);
        assert_eq!(clamped.requests.unwrap().reset, MAX);
        let garbage_reset = parse(&[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "NaN"),
        ]);
        assert_eq!(garbage_reset.requests.unwrap().reset, MAX);
    }

    #[test]
    fn no_headers_is_the_default() {
        assert_eq!(
            parse(&[("content-type", "application/json")]),
            RateLimitInfo::default()
        );
    }
}
