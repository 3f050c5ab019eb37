//! What one replica does about the others, against in-memory fakes under
//! paused time: the claim across replicas on each provider call.

mod support;

use std::sync::Arc;
use std::time::Duration;

use batchd_actors::clock::Clock;
use batchd_actors::ownership::{Acquired, Ownership, OwnershipRecord, OwnershipStore};
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
