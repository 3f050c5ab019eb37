//! Several `batchd run` replicas on a 3-node NATS cluster: streams and
//! buckets with three copies, the work shared through the durable
//! consumers, a replica SIGKILLed and a NATS node killed mid-run.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use batchd::config::Config;
use common::binary::Batchd;
use common::cluster::NatsCluster;

/// The test config on `cluster` with three copies of everything, written to
/// a temporary directory, and the topology created through it.
async fn cluster_setup(
    cluster: &NatsCluster,
    base_url: &str,
    extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf, jetstream::Context) {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("[nats]\nreplicas = 3\n{extra}");
    let path = common::config_file(dir.path(), &cluster.urls(), base_url, &extra);
    let config = Config::load(&path).expect("load the test config");
    let client = cluster.client().await;
    batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("create the topology on the cluster");
    (dir, path, jetstream::new(client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_and_bucket_gets_three_copies_and_an_existing_one_is_scaled() {
    let cluster = NatsCluster::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = cluster.client().await;
    // First as a single-copy deployment, then with `nats.replicas = 3`.
    for replicas in [1, 3] {
        let path = common::config_file(
            dir.path(),
            &cluster.urls(),
            "http://127.0.0.1:9",
            &format!("[nats]\nreplicas = {replicas}\n"),
        );
        let config = Config::load(&path).expect("load the test config");
        batchd::nats::ensure_topology(&client, &config)
            .await
            .expect("create the topology");
    }
    let js = jetstream::new(client);
    let n = Config::defaults().expect("defaults").nats;
    let mut names = vec![n.tasks_stream, n.results_stream, n.dlq_stream];
    for bucket in [
        n.checkpoints_bucket,
        n.ledger_bucket,
        n.calls_bucket,
        n.attempts_bucket,
        n.routes_bucket,
    ] {
        names.push(format!("KV_{bucket}"));
    }
    for name in names {
        let info = js
            .get_stream(&name)
            .await
            .unwrap_or_else(|e| panic!("stream {name}: {e}"))
            .info()
            .await
            .unwrap_or_else(|e| panic!("info of {name}: {e}"))
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_work_and_survive_a_sigkill_and_a_nats_node_kill() {
    let mut cluster = NatsCluster::start().await;
    let sim = common::recording_sim().await;
    let (_dir, path, js) = cluster_setup(
        &cluster,
        &sim.base_url(),
        "[intake]\nmax_ack_pending = 200\n",
    )
    .await;
    let n = 3000;
    common::publish_many(&js, &common::tasks(n, "c")).await;

    // Three processes, each named `<hostname>-<pid>` by default.
    let mut replicas: Vec<Batchd> = (0..3).map(|_| Batchd::start(&path)).collect();
    common::wait_for_count(&js, "BATCHD_RESULTS", 600).await;
    replicas[0].kill();
    let done_at_kill: HashSet<String> = common::read_all(&js, "BATCHD_RESULTS")
        .await
        .into_keys()
        .map(|s| s.trim_start_matches("batchd.results.").to_owned())
        .collect();
    cluster.kill(1);
    // Every call that had started by now may be in flight at one of the kills.
    let started_by_kills: HashSet<String> = common::sent_per_task(&sim.recorded_requests())
        .into_keys()
        .collect();
    assert!(done_at_kill.len() < n, "killed mid-run");

    common::wait_for_one_outcome_each(&js, n, Duration::from_secs(90)).await;
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert_eq!(common::stream_len(&js, "BATCHD_RESULTS").await, n as u64);

    let sent = common::sent_per_task(&sim.recorded_requests());
    assert_eq!(sent.len(), n, "every task reached the provider");
    let mut repeated = 0;
    for (id, &count) in &sent {
        if done_at_kill.contains(id) || !started_by_kills.contains(id) {
            assert_eq!(
                count, 1,
                "{id} was not in flight at a kill but was sent {count} times"
            );
        } else {
            assert!(count <= 2, "{id} was sent {count} times");
        }
        repeated += count - 1;
    }
    let in_flight = started_by_kills.difference(&done_at_kill).count();
    eprintln!("{repeated} repeated calls; {in_flight} calls in flight at the kills");
    assert!(
        repeated <= in_flight,
        "{repeated} repeats, {in_flight} in flight"
    );
}
