//! What one replica does about the others, against in-memory fakes under
//! paused time: the claim across replicas on each provider call.

mod support;

use std::sync::Arc;
use std::time::Duration;

use batchd_actors::clock::Clock;
use batchd_actors::ownership::{Acquired, Ownership, OwnershipRecord, OwnershipStore};
use batchd_actors::route::ReplicaHeartbeat;
use batchd_actors::settings::EngineSettings;
use batchd_actors::task::Priority;
use support::{healthy, rig, settings, task, until};
use tokio::time::Instant;

/// The test settings with the wall clock following paused time, so claims
/// expire as virtual time passes.
fn replica_settings() -> EngineSettings {
    let mut s = settings();
    s.clock = Clock::following_tokio(chrono::Utc::now());
    s.claim_ttl = Duration::from_secs(15);
    s
}

#[tokio::test(start_paused = true)]
async fn a_call_another_replica_claims_is_handed_back_then_made_once_the_claim_lapses() {
    let s = replica_settings();
    let clock = s.clock.clone();
    let r = rig(s, healthy(Duration::from_millis(5))).await;
    // Another replica is calling the provider for `held` for 6 more seconds.
    let other = OwnershipRecord {
        owner: "replica-b".into(),
        expires_at: clock.now() + chrono::Duration::seconds(6),
    };
    r.owners.create("call.held.g0", &other).await.unwrap();
    let start = Instant::now();
    r.source.publish(Priority::P2, task("held", "held"));
    r.source.publish(Priority::P2, task("free", "free"));
    until(Duration::from_secs(30), || r.source.acks().len() == 2).await;

    let calls = r.provider.calls();
    assert_eq!(calls.len(), 2, "one call each: {calls:?}");
    let held_at = calls.iter().find(|(id, _)| id.contains("held")).unwrap().1;
    assert!(
        held_at - start >= Duration::from_secs(6),
        "called {:?} after publishing, while replica-b held it",
        held_at - start
    );
    let free_at = calls.iter().find(|(id, _)| id.contains("free")).unwrap().1;
    assert!(
        free_at - start < Duration::from_secs(1),
        "free is not held up"
    );
    assert!(r.source.naks() >= 1, "handed back to JetStream");
    assert_eq!(r.sink.max_copies(), 1);
    assert_eq!(
        r.owners.get("call.held.g0").unwrap().owner,
        "test-replica",
        "taken over once expired"
    );
    // The handed-back attempt left no ledger record behind.
    assert_eq!(r.ledger.calls().len(), 2, "{:?}", r.ledger.calls());
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_call_keeps_its_claim_renewed_with_a_few_writes() {
    let s = replica_settings();
    let clock = s.clock.clone();
    let ttl = Duration::from_secs(6);
    let mut s = s;
    s.claim_ttl = ttl;
    let r = rig(s, healthy(Duration::from_secs(25))).await;
    let other = Ownership::new(
        r.owners.clone() as Arc<dyn OwnershipStore>,
        "replica-b",
        ttl,
        clock,
    );
    r.source.publish(Priority::P2, task("long", "x"));
    until(Duration::from_secs(5), || r.provider.calls().len() == 1).await;
    // Three TTLs later, the call still in flight: still ours.
    tokio::time::sleep(3 * ttl).await;
    match other.acquire("call.long.g0").await.unwrap() {
        Acquired::HeldBy(record) => assert_eq!(record.owner, "test-replica"),
        Acquired::Taken(_) => panic!("another replica took a call in flight"),
    }
    until(Duration::from_secs(60), || r.source.acks().len() == 1).await;
    // One create, then one renewal per 2 s of the 25 s call.
    let writes = r.owners.writes();
    assert!((10..=14).contains(&writes), "{writes} writes");
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn no_call_goes_out_unclaimed_while_the_claim_store_fails() {
    let r = rig(replica_settings(), healthy(Duration::from_millis(5))).await;
    r.owners.fail(true);
    r.source.publish(Priority::P1, task("t", "t"));
    until(Duration::from_secs(10), || r.source.naks() >= 3).await;
    assert!(r.provider.calls().is_empty(), "called without a claim");
    assert!(r.ledger.calls().is_empty(), "{:?}", r.ledger.calls());
    r.owners.fail(false);
    until(Duration::from_secs(10), || r.source.acks().len() == 1).await;
    assert_eq!(r.provider.calls().len(), 1);
    assert_eq!(r.sink.max_copies(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn alone_calls_take_no_claim_and_another_replica_appearing_claims_those_in_flight() {
    use batchd_actors::ports::RouteBoard;
    let mut s = replica_settings();
    s.claims = batchd_actors::peers::ClaimMode::Auto;
    let clock = s.clock.clone();
    let r = rig(s, healthy(Duration::from_secs(20))).await;
    // Alone (its own heartbeat only): 4 calls (the route's limit), no
    // ownership write.
    until(Duration::from_secs(5), || !r.board.heartbeats().is_empty()).await;
    for i in 0..4 {
        r.source
            .publish(Priority::P2, task(&format!("a{i}"), &format!("a{i}")));
    }
    until(Duration::from_secs(5), || r.provider.calls().len() == 4).await;
    assert_eq!(r.owners.writes(), 0, "a lone replica claims nothing");

    // replica-b starts while those 4 calls are in flight: each is claimed
    // at once, and kept (replica-b cannot take one over).
    r.board
        .beat(&ReplicaHeartbeat::idle("replica-b", clock.now()))
        .await
        .unwrap();
    until(Duration::from_secs(2), || r.owners.writes() >= 4).await;
    let b = Ownership::new(
        r.owners.clone() as Arc<dyn OwnershipStore>,
        "replica-b",
        Duration::from_secs(15),
        clock.clone(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    for i in 0..4 {
        match b.acquire(&format!("call.a{i}.g0")).await.unwrap() {
            Acquired::HeldBy(record) => assert_eq!(record.owner, "test-replica"),
            Acquired::Taken(_) => panic!("replica-b took a call in flight at test-replica"),
        }
    }
    // A new call while replica-b lives is claimed before it goes out.
    r.board
        .beat(&ReplicaHeartbeat::idle("replica-b", clock.now()))
        .await
        .unwrap();
    r.source.publish(Priority::P2, task("n", "n"));
    until(Duration::from_secs(60), || r.source.acks().len() == 5).await;
    assert_eq!(
        r.owners.get("call.n.g0").map(|rec| rec.owner),
        Some("test-replica".to_owned())
    );
    assert_eq!(r.provider.calls().len(), 5, "one call each");
    assert_eq!(r.sink.max_copies(), 1);

    // replica-b stops cleanly (its heartbeat removed): alone again.
    let writes = r.owners.writes();
    r.board
        .remove(&batchd_actors::route::heartbeat_key("replica-b"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.source.publish(Priority::P2, task("m", "m"));
    until(Duration::from_secs(60), || r.source.acks().len() == 6).await;
    assert!(
        r.owners.get("call.m.g0").is_none(),
        "alone again: no claim for m"
    );
    assert!(
        r.owners.writes() <= writes + 1,
        "no new claim once replica-b is gone"
    );
    r.engine.shutdown().await;
}

/// replica-b's route state on `fake/m`, with calls waiting there, and its
/// heartbeat, written now and every 5 s while the test runs.
fn replica_b_drives_route_m(r: &support::Rig, clock: Clock) -> tokio::task::JoinHandle<()> {
    use batchd_actors::ports::RouteBoard;
    let board = r.board.clone();
    tokio::spawn(async move {
        loop {
            let now = clock.now();
            let status = batchd_actors::route::RouteStatus {
                in_flight: 4,
                rpm_limit: Some(600),
                sharing: 2,
                waiting: [0, 10, 0],
                ..batchd_actors::route::RouteStatus::open(now, 4)
            };
            let state = batchd_actors::route::RouteState::new("replica-b", "fake", "m", &status);
            let key = batchd_actors::route::route_key("replica-b", "fake", "m");
            board.put(&key, &state).await.unwrap();
            board
                .beat(&ReplicaHeartbeat::idle("replica-b", now))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_route_another_replica_drives_too_gets_half_its_rate_limit() {
    let mut s = replica_settings();
    s.route_limits.insert(
        "m".into(),
        batchd_actors::settings::RouteLimits {
            rpm: Some(600),
            tpm: None,
        },
    );
    let clock = s.clock.clone();
    let r = rig(s, healthy(Duration::from_millis(5))).await;
    let b = replica_b_drives_route_m(&r, clock);
    until(Duration::from_secs(5), || r.board.heartbeats().len() == 2).await;
    for i in 0..1000 {
        r.source
            .publish(Priority::P2, task(&format!("t{i}"), &format!("t{i}")));
    }
    // Half the bucket at once (less the 1% reserve), then half the rate:
    // 297 + 150 in 30 s (alone: 594 + 300).
    let start = Instant::now();
    until(Duration::from_secs(5), || !r.provider.calls().is_empty()).await;
    tokio::time::sleep_until(start + Duration::from_secs(30)).await;
    let calls = r.provider.calls().len();
    assert!((430..=460).contains(&calls), "{calls} calls in 30 s");
    let route = r.engine.context().routes.all()[0].gate.status();
    assert_eq!(route.sharing, 2);
    assert_eq!(route.rpm_limit, Some(600));

    // replica-b stops: the whole limit again (its 300 a minute back).
    b.abort();
    {
        use batchd_actors::ports::RouteBoard;
        r.board
            .remove(&batchd_actors::route::heartbeat_key("replica-b"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = r.provider.calls().len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = r.provider.calls().len() - before;
    assert!((295..=320).contains(&after), "{after} calls in 30 s alone");
    assert_eq!(r.engine.context().routes.all()[0].gate.status().sharing, 1);
    r.engine.shutdown().await;
}
