//! The compose stack without a container engine: nats-server with the
//! compose's `config/nats/nats.conf`, `batchd run` with the compose's
//! `config/compose/batchd.toml`, and Prometheus (Debian's `prometheus`) with
//! `config/prometheus/prometheus.yml` and the alert rules, each rewritten
//! only where ports, paths and intervals must differ. After a short
//! workload: Prometheus scrapes batchd, every rule loads and evaluates, and
//! every panel query of the Grafana dashboard returns data. SIGTERM then
//! stops batchd with exit code 0, as `docker stop` would.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use batchd::sim::{SimConfig, SimServer};
use common::process::{free_port, Batchd};
use common::prometheus::{repo, tool, Prometheus};
use serde_json::Value;

/// `text` with `from` replaced by `to`, asserting `from` is there.
fn rewrite(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "expected {from:?} in:\n{text}");
    text.replace(from, to)
}

/// nats-server with the compose's config file; killed on drop.
struct ComposeNats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ComposeNats {
    async fn start() -> ComposeNats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = std::fs::read_to_string(repo().join("config/nats/nats.conf")).unwrap();
        let conf = rewrite(&conf, "port: 4222", &format!("port: {port}"));
        let conf = rewrite(
            &conf,
            "http_port: 8222",
            &format!("http_port: {}", free_port()),
        );
        let store = dir.path().join("store");
        let conf = rewrite(
            &conf,
            "store_dir: /data",
            &format!("store_dir: {:?}", store),
        );
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let nats = ComposeNats {
            child,
            port,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = async_nats::connect(nats.url()).await {
                if async_nats::jetstream::new(c).query_account().await.is_ok() {
                    return nats;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for ComposeNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_natively_prometheus_scrapes_batchd_rules_load_and_every_panel_has_data() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let nats = ComposeNats::start().await;
    let sim = SimServer::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            latency: Duration::from_millis(5),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    // The compose's config, with the addresses of this test: flags and the
    // OpenAI SDK variable override it as in any deployment.
    let mut batchd = Batchd::start_with_env(
        &repo().join("config/compose/batchd.toml"),
        &["--nats-url", &nats.url()],
        &[("OPENAI_BASE_URL", &sim.base_url())],
    )
    .await;
    batchd.wait_for("/readyz", 200).await;

    let config = std::fs::read_to_string(repo().join("config/prometheus/prometheus.yml")).unwrap();
    let config = rewrite(&config, "scrape_interval: 15s", "scrape_interval: 1s");
    let config = rewrite(
        &config,
        "evaluation_interval: 15s",
        "evaluation_interval: 1s",
    );
    let rules = repo().join("config/prometheus/alerts.yml");
    let config = rewrite(
        &config,
        "/etc/prometheus/alerts.yml",
        rules.to_str().unwrap(),
    );
    let config = rewrite(
        &config,
        "batchd:9464",
        &format!("127.0.0.1:{}", batchd.port),
    );
    let prom = Prometheus::start(&prometheus, &config).await;

    // A short workload over the three priorities, with a bad input.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    common::publish_many(&js, &common::tasks(90, "s")).await;
    common::publish(&js, "batchd.tasks.p2", b"not json".to_vec(), None, None).await;
    common::wait_for_messages(&js, "BATCHD_RESULTS", 91, Duration::from_secs(30)).await;

    // Scraped, and every rule loaded and evaluated without error.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut missing: Vec<String>;
    loop {
        let targets = prom.api("/api/v1/targets", &[]).await;
        let up = targets["activeTargets"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["health"] == "up"));
        let groups = prom.api("/api/v1/rules", &[]).await;
        let rules: Vec<&Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let healthy = rules.len() >= 13 && rules.iter().all(|r| r["health"] == "ok");
        missing = Vec::new();
        if up && healthy {
            for (panel, expr) in crate::ops::dashboard_exprs() {
                let expr = expr.replace("$__rate_interval", "1m");
                if prom.query(&expr).await.is_empty() {
                    missing.push(format!("{panel}: {expr}"));
                }
            }
            if missing.is_empty() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "target up: {up}; rules: {rules:?}; panels without data: {missing:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let succeeded = prom
        .query("sum(batchd_tasks_completed_total{status=\"succeeded\"})")
        .await;
    assert_eq!(succeeded[0]["value"][1], "90", "{succeeded:?}");

    let status = batchd.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
}
