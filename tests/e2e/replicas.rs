//! Several `batchd run` replicas on a 3-node NATS cluster: streams and
//! buckets with three copies, the work shared through the durable
//! consumers, a replica SIGKILLed and a NATS node killed mid-run.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use batchd::config::Config;
use batchd::ownership::KvOwnership;
use batchd_actors::clock::Clock;
use batchd_actors::ownership::{Acquired, Ownership, OwnershipError};
use common::binary::Batchd;
use common::cluster::NatsCluster;
use common::nats::NatsServer;
use std::sync::Arc;

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
    // The test's own client stays on node 0 (the test kills another).
    let client = async_nats::connect(cluster.url_of(0))
        .await
        .expect("connect to node 0");
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
        n.owners_bucket,
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
    cluster
        .wait_for_leaders(&js, &["BATCHD_TASKS", "BATCHD_RESULTS"])
        .await;

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

/// A private nats-server with batchd's streams and buckets on it.
async fn private_topology() -> (NatsServer, batchd::nats::Topology) {
    let nats = NatsServer::start().await;
    let config = common::config(&nats.url(), "http://127.0.0.1:9");
    let client = nats.client().await;
    let topology = batchd::nats::ensure_topology(&client, &config)
        .await
        .expect("create the topology");
    (nats, topology)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_records_in_kv_have_one_owner_and_are_taken_over_when_it_dies() {
    let (_nats, topology) = private_topology().await;
    let store = Arc::new(KvOwnership(topology.owners.clone()));
    let ttl = Duration::from_secs(3);
    let owner = |name: &str| Ownership::new(store.clone(), name, ttl, Clock::system());

    // Eight replicas race for one free key: exactly one gets it.
    let racers: Vec<Ownership> = (0..8).map(|i| owner(&format!("r{i}"))).collect();
    let results = futures::future::join_all(racers.iter().map(|o| o.acquire("ck.b_1"))).await;
    let winners: Vec<usize> = (0..8)
        .filter(|&i| matches!(results[i], Ok(Acquired::Taken(_))))
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let (a, mut held) = match &results[winners[0]] {
        Ok(Acquired::Taken(h)) => (&racers[winners[0]], h.clone()),
        _ => unreachable!(),
    };
    let b = owner("b");
    // While the owner renews, nobody else takes it.
    let started = tokio::time::Instant::now();
    while started.elapsed() < 2 * ttl {
        held = a.renew(&held).await.expect("renew");
        assert!(
            matches!(b.acquire("ck.b_1").await, Ok(Acquired::HeldBy(ref r)) if r.owner == a.owner()),
            "taken from a live owner"
        );
        tokio::time::sleep(a.renew_every()).await;
    }
    // The owner dies (stops renewing): b takes over once its record expires.
    let died = tokio::time::Instant::now();
    let taken = loop {
        if let Ok(Acquired::Taken(h)) = b.acquire("ck.b_1").await {
            break h;
        }
        assert!(died.elapsed() < 3 * ttl, "never taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Not before the owner's last record expired (the loop above bounds
    // how long after).
    let now = chrono::Utc::now();
    assert!(
        now >= held.expires_at,
        "taken over at {now}, before the record's expiry {}",
        held.expires_at
    );
    // The old owner's renewal and release leave the new owner alone.
    assert!(matches!(
        a.renew(&held).await,
        Err(OwnershipError::Conflict(_))
    ));
    a.release(held).await.expect("a stale release is no error");
    b.release(taken).await.expect("release");
    assert!(matches!(
        owner("c").acquire("ck.b_1").await,
        Ok(Acquired::Taken(_))
    ));
}

/// The next event of a heartbeat watch, within 10 s.
async fn next(
    events: &mut batchd_actors::ports::ReplicaStream,
) -> batchd_actors::peers::ReplicaEvent {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch goes on")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_heartbeats_and_route_states_in_kv_are_watched_as_they_come_and_go() {
    use batchd_actors::peers::ReplicaEvent;
    use batchd_actors::ports::RouteBoard;
    use batchd_actors::route::{heartbeat_key, ReplicaHeartbeat, RouteState};

    let (_nats, topology) = private_topology().await;
    let board = batchd::nats::KvRouteBoard(topology.routes.clone());
    let beat = |replica: &str| ReplicaHeartbeat {
        calls_in_flight: 2,
        ..ReplicaHeartbeat::idle(replica, chrono::Utc::now())
    };
    let a = beat("a.host-1");
    board.beat(&a).await.expect("a's heartbeat");
    // A route entry beside it is not a heartbeat.
    let route = RouteState::new(
        "a.host-1",
        "openai",
        "gpt-4.1",
        &batchd_actors::route::RouteStatus::open(chrono::Utc::now(), 4),
    );
    board
        .put(
            &batchd_actors::route::route_key("a.host-1", "openai", "gpt-4.1"),
            &route,
        )
        .await
        .expect("a's route");

    let mut events = board.watch_board().await.expect("watch");
    // What is stored, in any order, then Loaded.
    let mut stored = Vec::new();
    loop {
        match next(&mut events).await {
            ReplicaEvent::Loaded => break,
            event => stored.push(event),
        }
    }
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored.contains(&ReplicaEvent::Beat(a.clone())),
        "{stored:?}"
    );
    assert!(
        stored.contains(&ReplicaEvent::Route(route.clone())),
        "{stored:?}"
    );
    // A route state written is reported (its removal is not: a replica
    // gone is told by its heartbeat).
    let busier = RouteState {
        in_flight: 7,
        ..route.clone()
    };
    board
        .put(
            &batchd_actors::route::route_key("a.host-1", "openai", "gpt-4.1"),
            &busier,
        )
        .await
        .expect("a's route again");
    assert_eq!(next(&mut events).await, ReplicaEvent::Route(busier));
    let b = beat("b");
    board.beat(&b).await.expect("b's heartbeat");
    assert_eq!(next(&mut events).await, ReplicaEvent::Beat(b));
    board.remove(&heartbeat_key("b")).await.expect("b stops");
    assert_eq!(
        next(&mut events).await,
        ReplicaEvent::Gone(heartbeat_key("b"))
    );
}
