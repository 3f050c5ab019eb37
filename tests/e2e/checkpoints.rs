//! The checkpoint store over the `batchd-checkpoints` KV bucket: written,
//! listed, deleted; an entry it cannot read is skipped, not fatal, and
//! deleted on request (at start); and `batchd run` killed while a batch is
//! preempted, then started again.

use crate::common;
use crate::common::nats::NatsServer;

use std::collections::BTreeMap;
use std::time::Duration;

use batchd::nats::KvCheckpoints;
use batchd::sim::SimConfig;
use batchd_actors::ports::{Checkpoint, CheckpointStore, CHECKPOINT_VERSION};
use chrono::Utc;
use common::binary::Batchd;
use serde_json::Value;
use tokio::time::Instant;

fn checkpoint(batch_id: &str) -> Checkpoint {
    Checkpoint {
        version: CHECKPOINT_VERSION,
        batch_id: batch_id.into(),
        provider: "sim".into(),
        model: "gpt-4.1-mini".into(),
        priority: 3,
        finished: vec!["t1".into()],
        remaining: vec!["t2".into(), "t3".into()],
        attempts: BTreeMap::from([("t2".into(), 0), ("t3".into(), 1)]),
        preempted_at: Utc::now(),
        reason: "p1_waiting".into(),
    }
}

#[tokio::test]
async fn checkpoints_are_written_listed_and_deleted_and_an_unreadable_one_is_skipped() {
    let nats = NatsServer::start().await;
    let config = common::config(&nats.url(), "http://127.0.0.1:9/v1");
    let client = nats.client().await;
    let topology = batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("topology");
    let store = KvCheckpoints(topology.checkpoints.clone());
    let (a, b) = (checkpoint("b_A"), checkpoint("b_B"));
    store.put(&a).await.expect("put a");
    store.put(&b).await.expect("put b");
    topology
        .checkpoints
        .put("b_OLD", "{\"format\": 0}".into())
        .await
        .expect("an entry of another layout");

    let mut listed = store.list().await.expect("list");
    listed.sort_by(|x, y| x.batch_id.cmp(&y.batch_id));
    assert_eq!(listed, vec![a.clone(), b.clone()]);

    assert_eq!(
        store.drop_unreadable().await.expect("drop unreadable"),
        ["b_OLD"]
    );
    assert!(topology
        .checkpoints
        .get("b_OLD")
        .await
        .expect("get")
        .is_none());
    assert_eq!(store.list().await.expect("list").len(), 2);

    store.delete("b_A").await.expect("delete");
    store
        .delete("b_gone")
        .await
        .expect("deleting what is absent is fine");
    assert_eq!(store.list().await.expect("list"), vec![b]);
}

/// Checkpoints in the bucket, read the way the engine reads them.
async fn stored(store: &KvCheckpoints) -> Vec<Checkpoint> {
    store.list().await.expect("list checkpoints")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_preempted_then_restart_resumes_the_batch_under_its_id() {
    let nats = NatsServer::start().await;
    let sim = common::start_sim(SimConfig {
        latency: Duration::from_millis(500),
        record_requests: true,
        ..SimConfig::default()
    })
    .await;
    // Two calls at a time; the bulk tasks travel in one batch; a preempted
    // batch stays preempted (priority 1 must stay quiet for a minute). The
    // replica is restarted under its name, so it takes its checkpoint's
    // ownership record back at once.
    let extra = "[dispatch]\nmax_concurrency = 2\ninitial_concurrency = 2\n\
                 [batching.p3]\nmax_size = 20\nmax_wait_ms = 500\n\
                 [preemption]\nresume_after_ms = 60000\n\
                 [nats]\nreplica = \"preempting-replica\"\n";
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, extra).await;
    let config = batchd::config::Config::load(&path).expect("config");
    let topology = batchd::nats::ensure_topology(&nats.client().await, &config)
        .await
        .expect("topology");
    let store = KvCheckpoints(topology.checkpoints.clone());
    let bulk: Vec<(String, Value)> = (0..20)
        .map(|i| {
            (
                "batchd.tasks.p3".to_owned(),
                common::task(&format!("bulk{i}"), 3),
            )
        })
        .collect();
    common::publish_many(&js, &bulk).await;

    let mut first = Batchd::start(&path);
    common::wait_for_count(&js, "BATCHD_RESULTS", 2).await;
    let vips: Vec<(String, Value)> = (0..2)
        .map(|i| {
            (
                "batchd.tasks.p1".to_owned(),
                common::task(&format!("vip{i}"), 1),
            )
        })
        .collect();
    common::publish_many(&js, &vips).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored(&store).await.is_empty() {
        assert!(Instant::now() < deadline, "no batch was preempted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Priority 1 served while the batch stays preempted; then the kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = common::read_all(&js, "BATCHD_RESULTS").await;
        if vips.iter().all(|(_, t)| {
            let id = t["task_id"].as_str().unwrap_or_default();
            done.contains_key(&format!("batchd.results.{id}"))
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "priority 1 was not served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();
    let done_at_kill = common::read_all(&js, "BATCHD_RESULTS").await;
    let n = bulk.len() + vips.len();
    assert!(done_at_kill.len() < n, "killed while bulk work was left");
    // Which batch each task still to do belongs to, by the checkpoints the
    // killed process left.
    let mut batch_of = std::collections::HashMap::new();
    let owners = js.get_key_value("batchd-owners").await.expect("owners");
    for cp in stored(&store).await {
        assert_eq!(cp.priority, 3);
        // The replica that preempted it holds its ownership record.
        let record = owners
            .get(format!("checkpoint.{}", cp.batch_id))
            .await
            .expect("read the record")
            .expect("the checkpoint's ownership record");
        let record: Value = serde_json::from_slice(&record).expect("JSON");
        assert_eq!(record["owner"], "preempting-replica");
        for id in cp.remaining {
            if !done_at_kill.contains_key(&format!("batchd.results.{id}")) {
                batch_of.insert(id, cp.batch_id.clone());
            }
        }
    }
    assert!(
        !batch_of.is_empty(),
        "preempted tasks were left at the kill"
    );

    let _second = Batchd::start(&path);
    let outcomes = common::wait_for_one_outcome_each(&js, n, Duration::from_secs(60)).await;
    for (id, batch_id) in &batch_of {
        let o = &outcomes[&format!("batchd.results.{id}")][0];
        assert_eq!(o["status"], "succeeded", "{id}");
        assert_eq!(
            o["batch_id"],
            batch_id.as_str(),
            "{id} kept its batch id across the kill"
        );
    }
    // A task whose outcome was stored before the kill was sent once; the
    // others at most twice (a call in flight at the kill goes again).
    let sent = common::assert_finished_sent_once(&sim, &done_at_kill, n);
    assert!(sent.values().all(|c| *c <= 2), "{sent:?}");
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stored(&store).await.is_empty() {
        assert!(Instant::now() < deadline, "the checkpoint was not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
