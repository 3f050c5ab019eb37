//! Tests of [`RouteGate`] under paused time: priority, cancel safety, pauses,
//! the circuit seen by waiting calls, snapshots.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{advance, sleep, timeout, Instant};

use super::*;
use crate::task::Priority;

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn serial() -> RouteSettings {
    RouteSettings {
        max_concurrency: 1,
        initial_concurrency: 1,
        ..RouteSettings::default()
    }
}

fn success() -> CallReport {
    CallReport::Success {
        latency: ms(100),
        limits: RateLimitInfo::default(),
        tokens: 0,
    }
}

fn rate_limited(retry_after: Duration) -> CallReport {
    CallReport::RateLimited {
        limits: RateLimitInfo {
            retry_after: Some(retry_after),
            ..RateLimitInfo::default()
        },
    }
}

/// Lets every ready task run (time is paused, nothing sleeps).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A caller that is admitted once, writes down who it is and when, and
/// reports success at once.
fn caller(
    gate: &RouteGate,
    priority: Priority,
    log: &Arc<Mutex<Vec<(Priority, Instant)>>>,
) -> JoinHandle<()> {
    let (gate, log) = (gate.clone(), Arc::clone(log));
    tokio::spawn(async move {
        let permit = gate.admit(priority, 0).await;
        log.lock().unwrap().push((priority, Instant::now()));
        gate.report(permit, success());
    })
}

#[tokio::test(start_paused = true)]
async fn priority_1_goes_strictly_first_then_2_and_3_by_weight() {
    let gate = RouteGate::new(serial());
    let log = Arc::new(Mutex::new(Vec::new()));
    let held = gate.admit(Priority::P2, 0).await;
    let mut callers = Vec::new();
    for _ in 0..12 {
        callers.push(caller(&gate, Priority::P3, &log));
        callers.push(caller(&gate, Priority::P2, &log));
    }
    settle().await;
    for _ in 0..3 {
        callers.push(caller(&gate, Priority::P1, &log));
    }
    settle().await;
    assert_eq!(gate.status().waiting, [3, 12, 12]);
    drop(held);
    for c in callers {
        c.await.unwrap();
    }
    let order: Vec<u8> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.number())
        .collect();
    assert_eq!(&order[..3], [1, 1, 1], "{order:?}");
    // 3:1 while both wait: p3 gets a quarter, never nothing.
    assert_eq!(
        &order[3..19],
        [2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 3, 2]
    );
    assert_eq!(&order[19..], [3; 8]);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_batch_queues_ahead_of_its_priority_in_its_own_order() {
    let gate = RouteGate::new(serial());
    let log = Arc::new(Mutex::new(Vec::new()));
    let held = gate.admit(Priority::P3, 0).await;
    let mut callers = Vec::new();
    for name in ["new0", "ahead0", "new1", "ahead1"] {
        let (gate, log) = (gate.clone(), Arc::clone(&log));
        let ahead = name.starts_with("ahead");
        callers.push(tokio::spawn(async move {
            let permit = gate.admit_in_turn(Priority::P3, 0, ahead).await;
            log.lock().unwrap().push(name);
            gate.report(permit, success());
        }));
        settle().await;
    }
    drop(held);
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(*log.lock().unwrap(), ["ahead0", "ahead1", "new0", "new1"]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_admit_leaves_no_waiter_and_no_slot_behind() {
    let gate = RouteGate::new(serial());
    let held = gate.admit(Priority::P1, 0).await;
    // Given up while waiting for a slot.
    assert!(timeout(ms(500), gate.admit(Priority::P1, 0)).await.is_err());
    assert_eq!(gate.status().waiting, [0, 0, 0]);
    assert_eq!(gate.status().in_flight, 1);

    // Given up right after being woken as the head: the next in line goes.
    let first = tokio::spawn({
        let gate = gate.clone();
        async move { gate.admit(Priority::P1, 0).await }
    });
    settle().await;
    let second = tokio::spawn({
        let gate = gate.clone();
        async move { gate.admit(Priority::P2, 0).await }
    });
    settle().await;
    drop(held);
    first.abort();
    let permit = timeout(ms(10), second).await.unwrap().unwrap();
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(gate.status().in_flight, 1);
    assert_eq!(gate.status().waiting, [0, 0, 0]);

    // A permit dropped unreported frees its slot.
    drop(permit);
    assert_eq!(gate.status().in_flight, 0);
    assert!(gate.admit(Priority::P3, 0).now_or_never().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_the_waiters_and_the_budget_paces_them_after() {
    let gate = RouteGate::new(RouteSettings {
        rpm: Some(60),
        initial_concurrency: 100,
        ..RouteSettings::default()
    });
    let start = Instant::now();
    // Spend the budget, so the next calls wait for its refill.
    let mut spent = Vec::new();
    while let Some(permit) = gate.admit(Priority::P2, 0).now_or_never() {
        spent.push(permit);
    }
    assert_eq!(spent.len(), 59);
    let log = Arc::new(Mutex::new(Vec::new()));
    let callers: Vec<_> = (0..4).map(|_| caller(&gate, Priority::P2, &log)).collect();
    settle().await;

    // A 429 while they wait: 1 s of pause, the budget emptied.
    let report = gate.report(spent.pop().unwrap(), rate_limited(ms(1000)));
    assert_eq!(report.paused_until, Some(start + ms(1000)));
    // The other calls end too (they hold slots the halved limit no longer has).
    spent.clear();
    advance(ms(999)).await;
    assert!(gate.status().paused_until.is_some());
    assert!(
        log.lock().unwrap().is_empty(),
        "nobody goes during the pause"
    );
    advance(ms(1)).await;
    assert!(
        gate.status().paused_until.is_none(),
        "the pause ends by itself"
    );

    for c in callers {
        c.await.unwrap();
    }
    // One a second (60 rpm) once the 1% reserve is back: not all at once.
    let times: Vec<u128> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| (*t - start).as_millis())
        .collect();
    assert_eq!(times, [1600, 2600, 3600, 4600]);
}

#[tokio::test(start_paused = true)]
async fn a_route_failure_opens_the_circuit_at_once() {
    let gate = RouteGate::new(RouteSettings {
        circuit: CircuitSettings {
            jitter: 0.0,
            ..CircuitSettings::default()
        },
        ..RouteSettings::default()
    });
    let start = Instant::now();
    let a = gate.admit(Priority::P1, 0).await;
    let b = gate.admit(Priority::P1, 0).await;
    let report = gate.report(
        a,
        CallReport::RouteFailure {
            reason: CircuitReason::Unauthorized,
        },
    );
    assert_eq!(
        report.circuit_changed,
        Some(CircuitState::Open {
            reason: CircuitReason::Unauthorized,
            until: start + ms(1000)
        })
    );
    // The other call's failure is the same news: no second change to log.
    let again = gate.report(
        b,
        CallReport::RouteFailure {
            reason: CircuitReason::Unauthorized,
        },
    );
    assert_eq!(again.circuit_changed, None);
    assert_eq!(gate.status().circuit, Some(CircuitReason::Unauthorized));
    assert!(gate.admit(Priority::P1, 0).now_or_never().is_none());
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_probes_one_at_a_time_with_backoff_then_lets_everyone_go() {
    let gate = RouteGate::new(RouteSettings {
        circuit: CircuitSettings {
            threshold: 3,
            window: Duration::from_secs(10),
            initial_wait: ms(1000),
            max_wait: ms(4000),
            jitter: 0.0,
            seed: 0,
        },
        initial_concurrency: 64,
        ..RouteSettings::default()
    });
    let start = Instant::now();
    for i in 0..3 {
        let permit = gate.admit(Priority::P2, 0).await;
        let report = gate.report(permit, CallReport::Transient { latency: ms(5) });
        assert_eq!(report.circuit_changed.is_some(), i == 2);
    }
    assert_eq!(gate.status().circuit, Some(CircuitReason::Unavailable));

    let (sender, mut admitted) = mpsc::unbounded_channel();
    for _ in 0..8 {
        let (gate, sender) = (gate.clone(), sender.clone());
        tokio::spawn(async move {
            let permit = gate.admit(Priority::P2, 0).await;
            let _ = sender.send((Instant::now(), permit));
        });
    }
    settle().await;

    // Each probe alone; each failure doubles the wait (1 s, 2 s, 4 s, capped).
    let mut probe_at = start;
    for (wait, failure) in [
        (1000, CallReport::Transient { latency: ms(5) }),
        (
            2000,
            CallReport::RouteFailure {
                reason: CircuitReason::Unauthorized,
            },
        ),
        (4000, CallReport::Transient { latency: ms(5) }),
    ] {
        let (at, probe) = admitted.recv().await.unwrap();
        assert_eq!(at - probe_at, ms(wait));
        assert!(probe.is_probe());
        sleep(ms(300)).await;
        assert!(admitted.try_recv().is_err(), "one probe at a time");
        let report = gate.report(probe, failure);
        assert!(matches!(
            report.circuit_changed,
            Some(CircuitState::Open { .. })
        ));
        probe_at = at + ms(300);
    }
    assert_eq!(gate.status().circuit, Some(CircuitReason::Unavailable));

    // The fourth probe succeeds: closed, and everyone else goes at once.
    let (at, probe) = admitted.recv().await.unwrap();
    assert_eq!(at - probe_at, ms(4000));
    let report = gate.report(probe, success());
    assert_eq!(report.circuit_changed, Some(CircuitState::Closed));
    assert_eq!(gate.status().circuit, None);
    for _ in 0..4 {
        let (when, permit) = admitted.recv().await.unwrap();
        assert_eq!(when, at);
        assert!(!permit.is_probe());
    }
}

#[tokio::test(start_paused = true)]
async fn a_route_cut_to_one_call_grows_again_while_calls_succeed() {
    let gate = RouteGate::new(RouteSettings {
        max_concurrency: 8,
        initial_concurrency: 1,
        ..RouteSettings::default()
    });
    for _ in 0..4 {
        let permit = gate.admit(Priority::P2, 0).await;
        // The latency the caller measures starts a little after admission.
        advance(ms(101)).await;
        gate.report(
            permit,
            CallReport::Success {
                latency: ms(100),
                limits: RateLimitInfo::default(),
                tokens: 0,
            },
        );
    }
    assert!(gate.status().concurrency_limit > 1, "{:?}", gate.status());
}

#[tokio::test(start_paused = true)]
async fn permits_tell_how_long_they_waited() {
    let gate = RouteGate::new(serial());
    let held = gate.admit(Priority::P1, 0).await;
    assert_eq!(held.waited(), Duration::ZERO);
    let waiting = tokio::spawn({
        let gate = gate.clone();
        async move { gate.admit(Priority::P1, 0).await }
    });
    sleep(ms(250)).await;
    drop(held);
    assert_eq!(waiting.await.unwrap().waited(), ms(250));
}

#[tokio::test(start_paused = true)]
async fn learned_limits_pause_and_circuit_survive_a_restore() {
    let wall: DateTime<Utc> = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let settings = RouteSettings {
        circuit: CircuitSettings {
            jitter: 0.0,
            initial_wait: ms(20_000),
            max_wait: ms(60_000),
            ..CircuitSettings::default()
        },
        ..RouteSettings::default()
    };
    let gate = RouteGate::new_at(settings, wall);
    let headers = [
        ("x-ratelimit-limit-requests", "600"),
        ("x-ratelimit-remaining-requests", "599"),
        ("x-ratelimit-reset-requests", "100ms"),
    ];
    let limits = parse_rate_limit_headers(headers, wall, Duration::from_secs(60));
    let permit = gate.admit(Priority::P1, 0).await;
    let report = gate.report(
        permit,
        CallReport::Success {
            latency: ms(10),
            limits,
            tokens: 0,
        },
    );
    assert!(report.limits_changed);
    let permit = gate.admit(Priority::P1, 0).await;
    gate.report(permit, rate_limited(ms(10_000)));
    let permit = gate.admit(Priority::P1, 0).now_or_never();
    assert!(permit.is_none(), "paused");
    let permit = {
        advance(ms(10_000)).await;
        gate.admit(Priority::P1, 0).await
    };
    gate.report(
        permit,
        CallReport::RouteFailure {
            reason: CircuitReason::QuotaExhausted,
        },
    );
    let before = gate.status();
    let snap = gate.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let snap: RouteSnapshot = serde_json::from_str(&json).unwrap();

    // Back 3 s later by the wall clock.
    let restart = wall + TimeDelta::milliseconds(13_000);
    let restored = RouteGate::restore_at(settings, &snap, restart);
    let after = restored.status();
    assert_eq!(after.rpm_limit, Some(600));
    assert_eq!(after.circuit, Some(CircuitReason::QuotaExhausted));
    assert_eq!(after.concurrency_limit, before.concurrency_limit);
    assert_eq!(after.in_flight, 0);
    let start = Instant::now();
    let probe = restored.admit(Priority::P1, 0).await;
    assert!(probe.is_probe());
    assert_eq!(start.elapsed(), ms(17_000), "the rest of the open period");
}
