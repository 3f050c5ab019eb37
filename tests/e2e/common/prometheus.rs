//! Prometheus's tools for the operations tests: finding `promtool` and
//! `prometheus` (Debian's `prometheus` package), and a real Prometheus
//! server on a free port with a temporary store, queried over its HTTP API.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The repository root (where docker-compose.yml and config/ live).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `name` on PATH, if there. When it is missing the test is skipped with a
/// message, unless `BATCHD_REQUIRE_TOOLS` is set (`.ci/run` sets it after
/// installing the tools), where a missing tool fails the test.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("BATCHD_REQUIRE_TOOLS").is_none(),
            "{name} is required (BATCHD_REQUIRE_TOOLS is set) but not on PATH"
        );
        eprintln!(
            "SKIPPED: {name} is not on PATH (Debian: apt-get install prometheus docker-compose; `bash .ci/run` installs them)"
        );
    }
    found
}

/// Runs `program args`, asserting success; returns stdout and stderr.
pub fn run_ok(program: &Path, args: &[&str], cwd: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        program.display()
    );
    text
}

/// A Prometheus server with a temporary store; killed on drop.
pub struct Prometheus {
    child: Child,
    /// Its HTTP port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `binary` with `config` (YAML text) on a free port and waits
    /// until it is ready.
    pub async fn start(binary: &Path, config: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = super::process::free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(p.url("/-/ready")).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET <path>` of the API, its `data` field (asserting `status: success`).
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let body: Value = reqwest::Client::new()
            .get(self.url(path))
            .query(query)
            .send()
            .await
            .expect("prometheus API")
            .json()
            .await
            .expect("prometheus API JSON");
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The result vector of an instant query.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
