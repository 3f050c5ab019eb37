//! A 3-node nats-server cluster for end-to-end tests: JetStream clustered
//! over routes on loopback, each node with its own free client and cluster
//! port, store and log in one temporary directory.
//!
//! [`NatsCluster::start`] returns once every node answers JetStream (so a
//! meta leader exists) and a stream with three replicas can be created and
//! deleted. A node can be killed (SIGKILL) and started again on the same
//! ports and store. Dropping the cluster kills every node and removes the
//! directory.
#![allow(dead_code)] // not every helper is used by every module

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tempfile::TempDir;
use tokio::time::{sleep, timeout, Instant};

/// Nodes in the cluster.
pub const NODES: usize = 3;
/// How long start (election, first R3 stream) may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const LOG_TAIL_LINES: usize = 30;

struct Node {
    child: Option<Child>,
    client_port: u16,
    config: PathBuf,
    log: PathBuf,
}

/// Three clustered nats-servers with JetStream.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream can create an R3 stream.
    pub async fn start() -> NatsCluster {
        let dir = tempfile::Builder::new()
            .prefix("batchd-cluster-")
            .tempdir()
            .expect("create a temporary dir for the cluster");
        let client_ports = batchd::local_nats::free_ports(NODES).expect("free ports");
        let cluster_ports = batchd::local_nats::free_ports(NODES).expect("free ports");
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let store = dir.path().join(format!("n{i}-store"));
            let conf =
                batchd::local_nats::cluster_node_conf(i, &client_ports, &cluster_ports, &store);
            let config = dir.path().join(format!("n{i}.conf"));
            fs::write(&config, conf).expect("write a node's config");
            let log = dir.path().join(format!("n{i}.log"));
            nodes.push(Node {
                child: Some(spawn(&config, &log)),
                client_port: client_ports[i],
                config,
                log,
            });
        }
        let mut cluster = NatsCluster { nodes, dir };
        cluster.wait_until_ready().await;
        cluster
    }

    /// The URL of node `i`.
    pub fn url_of(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Every node's URL, comma-separated (what `nats.url` takes).
    pub fn urls(&self) -> String {
        (0..NODES)
            .map(|i| self.url_of(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of the cluster that moves to another node when its own goes.
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = (0..NODES).map(|i| self.url_of(i)).collect();
        async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(urls)
            .await
            .unwrap_or_else(|e| panic!("connect to the cluster {}: {e}", self.urls()))
    }

    /// SIGKILLs node `i` (its store stays for [`NatsCluster::restart`]).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let node = &mut self.nodes[i];
        node.child = Some(spawn(&node.config, &node.log));
    }

    /// Waits until each of `streams` answers through `js` again (a stream
    /// whose leader was on a killed node elects another).
    pub async fn wait_for_leaders(&self, js: &jetstream::Context, streams: &[&str]) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for name in streams {
            loop {
                let answered = timeout(PROBE_TIMEOUT, async {
                    js.get_stream(*name)
                        .await
                        .ok()?
                        .info()
                        .await
                        .ok()
                        .map(|_| ())
                })
                .await;
                if matches!(answered, Ok(Some(()))) {
                    break;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "stream {name} has no leader after {READY_TIMEOUT:?}\n{}",
                        self.logs()
                    );
                }
                sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The last lines of every node's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let log = fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
                format!("--- n{i} ---\n{tail}\n")
            })
            .collect()
    }

    /// The temporary directory holding stores, configs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match self.try_r3_stream().await {
                Ok(()) => return,
                Err(e) => e,
            };
            if let Some(i) = self.exited() {
                panic!(
                    "node n{i} exited before the cluster was ready\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the cluster was not ready within {READY_TIMEOUT:?}: {last}\n{}",
                    self.logs()
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    /// A node that was started and has exited by itself.
    fn exited(&mut self) -> Option<usize> {
        self.nodes.iter_mut().position(|n| {
            n.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        })
    }

    /// Every node answers JetStream, and an R3 stream can be created and
    /// deleted through the first.
    async fn try_r3_stream(&self) -> Result<(), String> {
        for i in 0..NODES {
            let probe = async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(PROBE_TIMEOUT)
                    .connect(self.url_of(i))
                    .await
                    .map_err(|e| e.to_string())?;
                jetstream::new(client)
                    .query_account()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            timeout(PROBE_TIMEOUT, probe)
                .await
                .map_err(|_| format!("n{i} did not answer"))?
                .map_err(|e| format!("n{i}: {e}"))?;
        }
        let create = async {
            let client = async_nats::connect(self.url_of(0))
                .await
                .map_err(|e| e.to_string())?;
            let js = jetstream::new(client);
            js.create_stream(stream::Config {
                name: "READY_PROBE".into(),
                subjects: vec!["ready.probe".into()],
                num_replicas: NODES,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating an R3 stream: {e}"))?;
            js.delete_stream("READY_PROBE")
                .await
                .map(|_| ())
                .map_err(|e| format!("deleting the R3 stream: {e}"))
        };
        timeout(READY_TIMEOUT, create)
            .await
            .map_err(|_| "creating an R3 stream hung".to_owned())?
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let mut command = Command::new("nats-server");
    command.arg("-c").arg(config);
    super::nats::spawn_logged(command, log)
}
