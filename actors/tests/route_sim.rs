//! The route against a provider that enforces its limits the way `batchd sim`
//! does: a token bucket per limit, holding `limit` and refilled continuously
//! over a minute, `x-ratelimit-*` headers computed when a call is admitted,
//! 429 with `retry-after-ms` when the bucket is short. Nothing about the
//! limits is configured: the gate learns them from the headers.
//!
//! The bar: over five minutes, at least 95% of the limit used and fewer than
//! 0.5% of the calls answered 429. The provider's bucket starts full, so the
//! first minute holds a burst of up to one extra minute's worth; the last four
//! minutes are checked on their own as well, so that the burst does not hide
//! a pace below the limit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchd_actors::route::{parse_rate_limit_headers, CallReport, RouteGate, RouteSettings};
use batchd_actors::task::Priority;
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const RUN: Duration = Duration::from_secs(300);
/// When the steady state is measured from.
const STEADY_FROM: Duration = Duration::from_secs(60);
const WINDOW_SECS: f64 = 60.0;

/// One limit of the fake provider, as `src/sim/rate_limit.rs` keeps it.
struct Bucket {
    limit: u64,
    available: f64,
    updated: Instant,
}

impl Bucket {
    fn new(limit: u64, now: Instant) -> Self {
        Bucket {
            limit,
            available: limit as f64,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.available =
            (self.available + elapsed * self.limit as f64 / WINDOW_SECS).min(self.limit as f64);
        self.updated = now;
    }

    /// Time until `amount` is in the bucket; `None` if it never will be.
    fn wait_for(&self, amount: u64) -> Option<Duration> {
        (amount <= self.limit).then(|| self.time_to_refill(amount as f64 - self.available))
    }

    fn time_to_refill(&self, missing: f64) -> Duration {
        let seconds = missing.max(0.0) * WINDOW_SECS / self.limit as f64;
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(60))
    }

    fn headers(&self, unit: &str, out: &mut Vec<(String, String)>) {
        let remaining = self.available.max(0.0).floor() as u64;
        let reset = self.time_to_refill(self.limit as f64 - self.available);
        out.push((format!("x-ratelimit-limit-{unit}"), self.limit.to_string()));
        out.push((
            format!("x-ratelimit-remaining-{unit}"),
            remaining.to_string(),
        ));
        out.push((format!("x-ratelimit-reset-{unit}"), format_duration(reset)));
    }
}

/// Go-style durations, as the sim writes resets: `120ms`, `1.5s`, `6m0s`.
fn format_duration(duration: Duration) -> String {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let minutes = millis / 60_000;
    let seconds = (millis % 60_000) as f64 / 1000.0;
    if minutes == 0 {
        format!("{seconds}s")
    } else {
        format!("{minutes}m{seconds}s")
    }
}

/// The provider: both limits, and what it answered.
struct Provider {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    calls: u64,
    limited: u64,
    succeeded: u64,
    tokens_succeeded: u64,
    steady_from: Instant,
    /// Successes (and their tokens) admitted from `steady_from` on.
    steady: u64,
    steady_tokens: u64,
}

enum Answer {
    Granted(Vec<(String, String)>),
    Limited(Vec<(String, String)>),
}

impl Provider {
    fn new(rpm: Option<u64>, tpm: Option<u64>, now: Instant) -> Self {
        Provider {
            requests: rpm.map(|l| Bucket::new(l, now)),
            tokens: tpm.map(|l| Bucket::new(l, now)),
            calls: 0,
            limited: 0,
            succeeded: 0,
            tokens_succeeded: 0,
            steady_from: now + STEADY_FROM,
            steady: 0,
            steady_tokens: 0,
        }
    }

    /// Takes one request and `tokens` tokens, or neither (and answers 429).
    fn admit(&mut self, now: Instant, tokens: u64) -> Answer {
        self.calls += 1;
        self.admit_uncounted(now, tokens)
    }

    /// Another client of the same account: spends the budget, not counted.
    fn admit_neighbour(&mut self, now: Instant, tokens: u64) {
        let (calls, limited, succeeded, tokens_succeeded, steady, steady_tokens) = (
            self.calls,
            self.limited,
            self.succeeded,
            self.tokens_succeeded,
            self.steady,
            self.steady_tokens,
        );
        self.admit_uncounted(now, tokens);
        self.calls = calls;
        self.limited = limited;
        self.succeeded = succeeded;
        self.tokens_succeeded = tokens_succeeded;
        self.steady = steady;
        self.steady_tokens = steady_tokens;
    }

    fn admit_uncounted(&mut self, now: Instant, tokens: u64) -> Answer {
        for bucket in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            bucket.refill(now);
        }
        let wait = [(&self.requests, 1), (&self.tokens, tokens)]
            .into_iter()
            .filter_map(|(bucket, amount)| bucket.as_ref().map(|b| b.wait_for(amount)))
            .find(|wait| *wait != Some(Duration::ZERO));
        if let Some(wait) = wait {
            self.limited += 1;
            let wait = wait.unwrap_or(Duration::from_secs(60));
            let millis = wait.as_micros().div_ceil(1000).max(1);
            let mut headers = vec![
                ("retry-after-ms".to_owned(), millis.to_string()),
                ("retry-after".to_owned(), millis.div_ceil(1000).to_string()),
            ];
            self.quota(&mut headers);
            return Answer::Limited(headers);
        }
        if let Some(bucket) = &mut self.requests {
            bucket.available -= 1.0;
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.available -= tokens as f64;
        }
        self.succeeded += 1;
        self.tokens_succeeded += tokens;
        if now >= self.steady_from {
            self.steady += 1;
            self.steady_tokens += tokens;
        }
        let mut headers = Vec::new();
        self.quota(&mut headers);
        Answer::Granted(headers)
    }

    fn quota(&self, out: &mut Vec<(String, String)>) {
        if let Some(b) = &self.requests {
            b.headers("requests", out);
        }
        if let Some(b) = &self.tokens {
            b.headers("tokens", out);
        }
    }
}

struct Scenario {
    rpm: Option<u64>,
    tpm: Option<u64>,
    latency: Duration,
    /// Extra latency, uniform in `[0, jitter]`, as `batchd sim --jitter-ms`.
    jitter: Duration,
    callers: usize,
    /// Requests per minute another client of the account sends, evenly.
    neighbour_rpm: u64,
    /// Mean tokens per call; the estimate is within 5% of the real count.
    tokens: u64,
}

impl Scenario {
    /// `callers` tasks of 100 tokens against `rpm` alone, answered after
    /// `latency_ms`, with no jitter and no other client.
    fn requests(rpm: u64, latency_ms: u64, callers: usize) -> Scenario {
        Scenario {
            rpm: Some(rpm),
            tpm: None,
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::ZERO,
            callers,
            neighbour_rpm: 0,
            tokens: 100,
        }
    }
}

struct Figures {
    calls: u64,
    limited: u64,
    succeeded: u64,
    tokens_succeeded: u64,
    steady: u64,
    steady_tokens: u64,
}

async fn run(scenario: Scenario) -> Figures {
    let start = Instant::now();
    let end = start + RUN;
    let provider = Arc::new(Mutex::new(Provider::new(scenario.rpm, scenario.tpm, start)));
    let gate = RouteGate::new(RouteSettings::default());
    let mut callers = Vec::new();
    if scenario.neighbour_rpm > 0 {
        let provider = Arc::clone(&provider);
        let every = Duration::from_secs(60) / scenario.neighbour_rpm as u32;
        let tokens = scenario.tokens;
        callers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while tick.tick().await < end {
                provider
                    .lock()
                    .unwrap()
                    .admit_neighbour(Instant::now(), tokens);
            }
        }));
    }
    for i in 0..scenario.callers {
        let gate = gate.clone();
        let provider = Arc::clone(&provider);
        let (base, jitter, mean) = (scenario.latency, scenario.jitter, scenario.tokens);
        let mut rng = StdRng::seed_from_u64(i as u64);
        let priority = Priority::ALL[i % 3];
        callers.push(tokio::spawn(async move {
            // Each caller stands for an endless backlog of tasks.
            loop {
                let real = rng.random_range(mean * 4 / 5..=mean * 6 / 5);
                let est = real * rng.random_range(95..=105) / 100;
                let permit = gate.admit(priority, est).await;
                let now = Instant::now();
                if now >= end {
                    return;
                }
                let answer = provider.lock().unwrap().admit(now, real);
                let report = match answer {
                    Answer::Granted(headers) => {
                        let latency = base + jitter.mul_f64(rng.random::<f64>());
                        tokio::time::sleep(latency).await;
                        CallReport::Success {
                            latency,
                            limits: parse(&headers),
                            tokens: real,
                        }
                    }
                    Answer::Limited(headers) => CallReport::RateLimited {
                        limits: parse(&headers),
                    },
                };
                gate.report(permit, report);
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let status = gate.status();
    let p = provider.lock().unwrap();
    assert_eq!(status.rpm_limit, scenario.rpm, "learned from the headers");
    assert_eq!(status.tpm_limit, scenario.tpm, "learned from the headers");
    Figures {
        calls: p.calls,
        limited: p.limited,
        succeeded: p.succeeded,
        tokens_succeeded: p.tokens_succeeded,
        steady: p.steady,
        steady_tokens: p.steady_tokens,
    }
}

fn parse(headers: &[(String, String)]) -> batchd_actors::route::RateLimitInfo {
    parse_rate_limit_headers(
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        Utc::now(),
        Duration::from_secs(60),
    )
}

/// What is counted against the limit.
#[derive(Clone, Copy)]
enum Unit {
    Requests,
    Tokens,
}

/// Share of the limit used (whole run and steady state) and share of 429s,
/// checked against the bar.
fn check(name: &str, limit_per_min: u64, unit: Unit, figures: &Figures) {
    let (used, steady) = match unit {
        Unit::Requests => (figures.succeeded, figures.steady),
        Unit::Tokens => (figures.tokens_succeeded, figures.steady_tokens),
    };
    let per_min = limit_per_min as f64;
    let share_used = used as f64 / (per_min * RUN.as_secs_f64() / 60.0);
    let steady_minutes = (RUN - STEADY_FROM).as_secs_f64() / 60.0;
    let share_steady = steady as f64 / (per_min * steady_minutes);
    let share_429 = figures.limited as f64 / figures.calls as f64;
    eprintln!(
        "{name}: {} calls, {} succeeded ({} tokens), {} answered 429 in {} s; \
         limit used: {:.1}% over the run, {:.1}% from minute 1 to 5; 429s: {:.3}%",
        figures.calls,
        figures.succeeded,
        figures.tokens_succeeded,
        figures.limited,
        RUN.as_secs(),
        share_used * 100.0,
        share_steady * 100.0,
        share_429 * 100.0
    );
    assert!(
        share_used >= 0.95,
        "{name}: {:.1}% of the limit used",
        share_used * 100.0
    );
    assert!(
        share_steady >= 0.95,
        "{name}: {:.1}% in the steady state",
        share_steady * 100.0
    );
    assert!(share_429 < 0.005, "{name}: {:.3}% 429s", share_429 * 100.0);
}

#[tokio::test(start_paused = true)]
async fn uses_95_percent_of_12000_rpm_at_1s_latency_with_under_half_a_percent_429s() {
    let figures = run(Scenario::requests(12_000, 1000, 2000)).await;
    check(
        "rpm 12000, latency 1000 ms",
        12_000,
        Unit::Requests,
        &figures,
    );
}

#[tokio::test(start_paused = true)]
async fn uses_95_percent_of_1200_rpm_at_800ms_latency_with_under_half_a_percent_429s() {
    let figures = run(Scenario::requests(1200, 800, 500)).await;
    check("rpm 1200, latency 800 ms", 1200, Unit::Requests, &figures);
}

#[tokio::test(start_paused = true)]
async fn holds_the_bar_when_answers_come_back_out_of_order() {
    let figures = run(Scenario {
        jitter: Duration::from_millis(1500),
        ..Scenario::requests(6000, 300, 1000)
    })
    .await;
    check(
        "rpm 6000, latency 300 ms + 0..1500 ms",
        6000,
        Unit::Requests,
        &figures,
    );
}

#[tokio::test(start_paused = true)]
async fn uses_95_percent_of_a_token_limit_with_under_half_a_percent_429s() {
    let figures = run(Scenario {
        tpm: Some(1_000_000),
        tokens: 1000,
        ..Scenario::requests(10_000, 1000, 1000)
    })
    .await;
    check(
        "tpm 1000000 (rpm 10000), latency 1000 ms",
        1_000_000,
        Unit::Tokens,
        &figures,
    );
}

#[tokio::test(start_paused = true)]
async fn shares_the_account_with_another_client() {
    let figures = run(Scenario {
        neighbour_rpm: 300,
        ..Scenario::requests(1200, 800, 500)
    })
    .await;
    check(
        "rpm 1200 shared with 300 rpm of another client",
        900,
        Unit::Requests,
        &figures,
    );
}
