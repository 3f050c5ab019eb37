//! Preemption of bulk batches for priority 1, in memory under paused time.

mod support;

use std::time::Duration;

use batchd_actors::messages::ActorKind;
use batchd_actors::task::Priority;
use support::*;
use tokio::time::Instant;

/// When the provider was first called for `id` (its text is its id).
fn call_of(r: &Rig, id: &str) -> Option<Instant> {
    r.provider
        .calls()
        .into_iter()
        .find(|(text, _)| text == id)
        .map(|(_, at)| at)
}

/// Test settings with `slots` calls at a time on the route.
fn with_slots(slots: usize) -> batchd_actors::settings::EngineSettings {
    let mut s = settings();
    s.route.max_concurrency = slots;
    s.route.initial_concurrency = slots;
    s
}

/// Publishes `n` bulk tasks that travel in one batch (each names its text
/// after its id); their ids.
fn publish_bulk(r: &Rig, n: usize) -> Vec<String> {
    let bulk: Vec<String> = (0..n).map(|i| format!("bulk{i}")).collect();
    for (i, id) in bulk.iter().enumerate() {
        let pending = (n - 1 - i) as u64;
        r.source
            .publish_with_pending(Priority::P3, task(id, id), Some(pending));
    }
    bulk
}

/// Publishes one priority-1 task named `id`, alone in its queue.
fn publish_vip(r: &Rig, id: &str) {
    r.source
        .publish_with_pending(Priority::P1, task(id, id), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_long_bulk_batch_is_preempted_for_priority_one_then_resumes_under_its_id() {
    // Two calls at a time, one second each; 20 bulk tasks in one batch.
    let s = with_slots(2);
    let resume_after = s.preemption.resume_after;
    let r = rig(s, healthy(Duration::from_secs(1))).await;
    let bulk = publish_bulk(&r, 20);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Three priority-1 tasks arrive while the route is full of bulk work.
    let arrived = Instant::now();
    let vips = ["vip0", "vip1", "vip2"];
    for (i, id) in vips.iter().enumerate() {
        r.source
            .publish_with_pending(Priority::P1, task(id, id), Some((2 - i) as u64));
    }
    until(Duration::from_secs(5), || {
        !r.checkpoints.entries().is_empty()
    })
    .await;
    let (batch_id, cp) = r.checkpoints.entries().into_iter().next().unwrap();
    assert_eq!(cp.priority, 3);
    assert_eq!(cp.reason, "p1_waiting");
    assert_eq!(cp.finished.len(), 2, "two calls had ended before p1 came");
    assert_eq!(cp.remaining.len(), 18);
    assert!(cp.attempts.values().all(|a| *a == 0));

    // Priority 1 takes the slots as the bulk calls in flight end; no bulk
    // call goes out meanwhile.
    until(Duration::from_secs(10), || {
        vips.iter().all(|id| call_of(&r, id).is_some())
    })
    .await;
    let last_vip = vips.iter().filter_map(|id| call_of(&r, id)).max().unwrap();
    let bulk_during: Vec<&String> = bulk
        .iter()
        .filter(|id| call_of(&r, id).is_some_and(|at| at >= arrived && at <= last_vip))
        .collect();
    assert!(
        bulk_during.is_empty(),
        "bulk calls went out while p1 waited: {bulk_during:?}"
    );

    // A priority-1 task arriving in the same burst finds a slot kept free.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = Instant::now();
    publish_vip(&r, "vip-late");
    until(Duration::from_secs(5), || call_of(&r, "vip-late").is_some()).await;
    let waited = call_of(&r, "vip-late").unwrap() - late;
    assert!(
        waited < Duration::from_millis(100),
        "the late p1 task waited {waited:?} for a slot"
    );

    // Priority 1 quiet: the batch resumes, completes under its id, and its
    // checkpoint goes.
    let all = bulk.len() + vips.len() + 1;
    until(Duration::from_secs(60), || r.sink.outcome_count() == all).await;
    let first_resumed = bulk
        .iter()
        .filter_map(|id| call_of(&r, id))
        .filter(|at| *at > arrived)
        .min()
        .unwrap();
    assert!(
        first_resumed >= last_vip + resume_after,
        "bulk resumed {:?} after the last p1 call",
        first_resumed - last_vip
    );
    for id in &bulk {
        let o = r.sink.outcome(id).unwrap();
        assert_eq!(o["status"], "succeeded", "{id}");
        assert_eq!(o["batch_id"], batch_id.as_str(), "{id} kept its batch id");
        assert_eq!(o["attempts"], 1, "{id}: preemption spends no attempt");
    }
    for id in vips.iter().chain(["vip-late"].iter()) {
        assert_eq!(r.sink.outcome(id).unwrap()["status"], "succeeded");
    }
    assert_eq!(r.sink.max_copies(), 1, "one outcome per task");
    assert_eq!(r.provider.calls().len(), all, "one call per task");
    until(Duration::from_secs(5), || r.source.acks().len() == all).await;
    assert_eq!(r.source.naks(), 0, "no lease was given up");
    until(Duration::from_secs(5), || {
        r.checkpoints.entries().is_empty()
    })
    .await;
    assert_eq!(r.checkpoints.written(), 1);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn with_preemption_off_bulk_batches_are_never_paused() {
    let mut s = with_slots(1);
    s.preemption.enabled = false;
    let r = rig(s, healthy(Duration::from_secs(1))).await;
    publish_bulk(&r, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_vip(&r, "vip");
    until(Duration::from_secs(30), || r.sink.outcome_count() == 5).await;
    assert_eq!(r.checkpoints.written(), 0);
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_monitor_resumes_the_batches_its_predecessor_preempted() {
    let r = rig(with_slots(1), healthy(Duration::from_secs(1))).await;
    let bulk = publish_bulk(&r, 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_vip(&r, "vip");
    until(Duration::from_secs(5), || {
        !r.checkpoints.entries().is_empty()
    })
    .await;
    let batch_id = r.checkpoints.entries().into_keys().next().unwrap();
    r.engine.inject_fault(ActorKind::PreemptionMonitor);

    until(Duration::from_secs(60), || r.sink.outcome_count() == 7).await;
    for id in &bulk {
        let o = r.sink.outcome(id).unwrap();
        assert_eq!(o["status"], "succeeded", "{id}");
        assert_eq!(o["batch_id"], batch_id.as_str(), "{id} kept its batch id");
        assert_eq!(o["attempts"], 1, "{id}");
    }
    until(Duration::from_secs(5), || {
        r.checkpoints.entries().is_empty()
    })
    .await;
    assert!(r.engine.is_running());
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn nothing_is_preempted_while_the_route_is_down() {
    // The key is refused for three seconds: the circuit opens on the first
    // call, and priority 1 then waits for the provider, not for bulk work.
    let back = Instant::now() + Duration::from_secs(3);
    let r = rig(with_slots(1), down_until(back, rejected(401, "bad key"))).await;
    publish_bulk(&r, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_vip(&r, "vip");
    until(Duration::from_secs(60), || r.sink.outcome_count() == 5).await;
    assert_eq!(r.sink.outcome("vip").unwrap()["status"], "succeeded");
    assert_eq!(r.checkpoints.written(), 0, "no batch was preempted");
    r.engine.shutdown().await;
}

/// A checkpoint as a killed process left it: `remaining` not done.
fn left_checkpoint(
    batch_id: &str,
    provider: &str,
    finished: &[&str],
    remaining: &[&str],
) -> batchd_actors::ports::Checkpoint {
    let own = |ids: &[&str]| ids.iter().map(|id| (*id).to_owned()).collect::<Vec<_>>();
    batchd_actors::ports::Checkpoint {
        version: batchd_actors::ports::CHECKPOINT_VERSION,
        batch_id: batch_id.into(),
        provider: provider.into(),
        model: "m".into(),
        priority: 3,
        finished: own(finished),
        remaining: own(remaining),
        attempts: remaining.iter().map(|id| ((*id).to_owned(), 0)).collect(),
        preempted_at: chrono::Utc::now(),
        reason: "p1_waiting".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_crash_a_preempted_batch_resumes_first_under_its_id_and_stale_checkpoints_go() {
    use batchd_actors::ports::{CheckpointStore, MemoryCheckpoints};
    use std::sync::Arc;

    // What a killed process left: a preempted batch b_A that had finished
    // a0 and a1 (their outcomes published) and a2 (its outcome published,
    // its message not yet acked), with a3..a10 still to do; a checkpoint
    // whose tasks all have outcomes; one of another layout version; one of
    // a provider no longer configured.
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let sink = Arc::new(FakeSink::default());
    let todo: Vec<String> = (3..=10).map(|i| format!("a{i}")).collect();
    let mut remaining = vec!["a2"];
    remaining.extend(todo.iter().map(String::as_str));
    let mut old = left_checkpoint("b_OLD", "fake", &[], &["o0"]);
    old.version += 1;
    for cp in [
        left_checkpoint("b_A", "fake", &["a0", "a1"], &remaining),
        left_checkpoint("b_DONE", "fake", &[], &["d0"]),
        old,
        left_checkpoint("b_GONE", "nowhere", &[], &["g0"]),
    ] {
        checkpoints.put(&cp).await.unwrap();
    }
    for id in ["a0", "a1", "a2", "d0"] {
        sink.record(
            id,
            serde_json::json!({"task_id": id, "status": "succeeded", "batch_id": "b_A"}),
        );
    }

    let r = rig_after_crash(
        with_slots(2),
        healthy(Duration::from_secs(1)),
        checkpoints.clone(),
        sink.clone(),
    )
    .await;
    let ids = |cps: &MemoryCheckpoints| cps.entries().into_keys().collect::<Vec<_>>();
    assert_eq!(
        ids(&checkpoints),
        ["b_A"],
        "stale checkpoints deleted at start"
    );

    // Newer bulk work arrives first and fills the route.
    let fresh: Vec<String> = (0..10).map(|i| format!("new{i}")).collect();
    for (i, id) in fresh.iter().enumerate() {
        r.source
            .publish_with_pending(Priority::P3, task(id, id), Some((9 - i) as u64));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // b_A's messages come back once ack_wait passes: a2 .. a9 (a10 later).
    for id in std::iter::once("a2").chain(todo[..7].iter().map(String::as_str)) {
        r.source.publish_redelivered(Priority::P3, task(id, id), 2);
    }
    let total = 4 + todo.len() + fresh.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // a10 comes back after b_A was sealed (recover_wait): it is batched anew.
    r.source
        .publish_redelivered(Priority::P3, task("a10", "a10"), 2);
    until(Duration::from_secs(60), || r.sink.outcome_count() == total).await;

    let resumed = &todo[..7];
    for id in resumed {
        let o = r.sink.outcome(id).unwrap();
        assert_eq!(o["status"], "succeeded", "{id}");
        assert_eq!(o["batch_id"], "b_A", "{id} rejoined its batch");
        assert_eq!(o["attempts"], 1, "{id}");
    }
    assert_ne!(r.sink.outcome("a10").unwrap()["batch_id"], "b_A");
    assert_eq!(r.sink.outcome("a10").unwrap()["status"], "succeeded");
    for id in ["a0", "a1", "a2"] {
        assert!(
            call_of(&r, id).is_none(),
            "{id} was finished: not sent again"
        );
    }
    assert_eq!(r.sink.max_copies(), 1, "one outcome per task");
    assert_eq!(r.provider.calls().len(), resumed.len() + 1 + fresh.len());

    // b_A went ahead of the newer bulk work waiting at the route: once its
    // first call went out, no newer task's call went until its last.
    let first = resumed
        .iter()
        .filter_map(|id| call_of(&r, id))
        .min()
        .unwrap();
    let last = resumed
        .iter()
        .filter_map(|id| call_of(&r, id))
        .max()
        .unwrap();
    let jumped: Vec<&String> = fresh
        .iter()
        .filter(|id| call_of(&r, id).is_some_and(|at| at > first && at < last))
        .collect();
    assert!(jumped.is_empty(), "newer work went between: {jumped:?}");
    let fresh_after = fresh.iter().filter(|id| call_of(&r, id).unwrap() > last);
    assert!(fresh_after.count() > 0, "newer work was still waiting");

    until(Duration::from_secs(5), || checkpoints.entries().is_empty()).await;
    until(Duration::from_secs(5), || {
        r.source.acks().len() == total - 3
    })
    .await;
    r.engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_another_replica_holds_is_left_to_it_until_its_record_expires() {
    use batchd_actors::ownership::{MemoryOwnership, OwnershipRecord, OwnershipStore};
    use batchd_actors::ports::{CheckpointStore, MemoryCheckpoints};
    use std::sync::Arc;

    // replica-b preempted b_B (of a provider this replica does not know)
    // and holds its record for 10 more seconds.
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    checkpoints
        .put(&left_checkpoint("b_B", "nowhere", &[], &["x0"]))
        .await
        .unwrap();
    let mut s = with_slots(2);
    s.clock = batchd_actors::clock::Clock::following_tokio(chrono::Utc::now());
    let owners = Arc::new(MemoryOwnership::default());
    owners
        .create(
            "checkpoint.b_B",
            &OwnershipRecord {
                owner: "replica-b".into(),
                expires_at: s.clock.now() + chrono::Duration::seconds(10),
            },
        )
        .await
        .unwrap();
    let r = rig_after_crash_with_owners(
        s,
        healthy(Duration::from_millis(5)),
        checkpoints.clone(),
        Arc::new(FakeSink::default()),
        owners.clone(),
    )
    .await;
    // Left alone while replica-b's record lives: not judged, not deleted.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(checkpoints.entries().len(), 1, "left to its owner");
    assert_eq!(owners.get("checkpoint.b_B").unwrap().owner, "replica-b");
    // Its record expired (replica-b died): taken up here, and judged (its
    // provider is unknown here: dropped).
    until(Duration::from_secs(5), || checkpoints.entries().is_empty()).await;
    assert_eq!(owners.get("checkpoint.b_B").unwrap().owner, "test-replica");
    r.engine.shutdown().await;
}
