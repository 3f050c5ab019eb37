//! The checkpoint store over the `batchd-checkpoints` KV bucket: written,
//! listed, deleted; an entry it cannot read is skipped, not fatal.

use crate::common;
use crate::common::nats::NatsServer;

use std::collections::BTreeMap;

use batchd::nats::KvCheckpoints;
use batchd_actors::ports::{Checkpoint, CheckpointStore, CHECKPOINT_VERSION};
use chrono::Utc;

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

    store.delete("b_A").await.expect("delete");
    store
        .delete("b_gone")
        .await
        .expect("deleting what is absent is fine");
    assert_eq!(store.list().await.expect("list"), vec![b]);
}
