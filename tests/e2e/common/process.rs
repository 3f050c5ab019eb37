//! The `batchd run` binary and other child processes as an operator starts
//! them: on a free port, waited for over HTTP, killed on drop.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// A free TCP port on 127.0.0.1 (free when asked; the OS rarely reuses it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// `batchd run` with its metrics address on a free port; killed on drop.
pub struct Batchd {
    child: Child,
    /// The port of `/metrics`, `/healthz` and `/readyz`.
    pub port: u16,
}

impl Batchd {
    /// Starts `batchd run --config <config>` plus `extra` arguments and waits
    /// until `/healthz` answers.
    pub async fn start(config: &Path, extra: &[&str]) -> Batchd {
        Batchd::start_with_env(config, extra, &[]).await
    }

    /// [`Batchd::start`] with environment variables set for the process.
    pub async fn start_with_env(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Batchd {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start batchd");
        let b = Batchd { child, port };
        b.wait_for("/healthz", 200).await;
        b
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Polls `path` until it answers `status`; panics after 20 s.
    pub async fn wait_for(&self, path: &str, status: u16) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(self.url(path)).await {
                if r.status().as_u16() == status {
                    return r.text().await.unwrap_or_default();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never answered {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// SIGTERM, then waits for the exit: a graceful shutdown.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("reap")
    }
}

impl Drop for Batchd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `batchd run` at debug level with its stdout and stderr kept, for tests
/// that read its logs; killed on drop.
pub struct LoggedBatchd {
    child: Child,
    /// The port of `/metrics`.
    pub port: u16,
    readers: Vec<std::thread::JoinHandle<String>>,
}

impl LoggedBatchd {
    /// Starts `batchd run --config <config>` with `env` set (it does not
    /// wait for `/healthz`: tasks may be waiting already).
    pub fn start(config: &Path, env: &[(&str, &str)]) -> LoggedBatchd {
        use std::io::Read as _;
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start batchd");
        let pipes: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stderr.take().expect("stderr")),
            Box::new(child.stdout.take().expect("stdout")),
        ];
        let readers = pipes
            .into_iter()
            .map(|mut pipe| {
                std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = pipe.read_to_string(&mut s);
                    s
                })
            })
            .collect();
        LoggedBatchd {
            child,
            port,
            readers,
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// SIGTERM, at most 20 s for a graceful exit, then SIGKILL; returns
    /// everything it wrote.
    pub fn stop(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::take(&mut self.readers)
            .into_iter()
            .map(|r| r.join().unwrap_or_default())
            .collect()
    }
}

impl Drop for LoggedBatchd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
