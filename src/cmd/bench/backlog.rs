//! `batchd bench --backlog`: the resident memory of `batchd run` with a
//! small and a large backlog waiting in JetStream (guarantee 5: memory is
//! bounded by configuration, not by the backlog).
//!
//! For each backlog size, on a private `nats-server`: the tasks are
//! published first (timed), then `batchd run` starts as a child process
//! against a simulated provider that answers after an hour, so the backlog
//! stays queued while the engine holds as much as its configuration lets it
//! (`max_ack_pending` per priority). After `--backlog-secs` the child's
//! `VmRSS` (and its peak, `VmHWM`) is read from `/proc/<pid>/status`, and
//! the child is stopped.

use std::fmt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use batchd_actors::task::{Encoding, Priority};
use tokio::time::Instant;

use super::task_body;
use crate::client::{Outgoing, Publisher, Subjects};
use crate::cmd::progress_bar as bar;
use crate::config::Config;
use crate::local_nats::LocalNats;
use crate::sim::{SimConfig, SimServer};

/// The bar: RSS with the large backlog over RSS with the small one.
pub const BACKLOG_BAR: f64 = 1.1;

/// One backlog size, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogResult {
    /// Tasks published before the engine started.
    pub tasks: usize,
    /// Seconds publishing them took (PubAcks awaited).
    pub publish_secs: f64,
    /// Resident memory of `batchd run` at the end, KiB.
    pub rss_kib: u64,
    /// Its peak resident memory, KiB.
    pub peak_kib: u64,
    /// Messages the engine held (delivered, not acked) at the end.
    pub held: u64,
    /// Messages still waiting in JetStream at the end.
    pub waiting: u64,
}

/// The results of `bench --backlog`.
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogReport {
    /// One per size, smallest first.
    pub results: Vec<BacklogResult>,
    /// Seconds the engine ran before each reading.
    pub settle_secs: u64,
}

impl BacklogReport {
    /// RSS of the largest backlog over that of the smallest.
    pub fn ratio(&self) -> Option<f64> {
        let (first, last) = (self.results.first()?, self.results.last()?);
        (first.rss_kib > 0).then(|| last.rss_kib as f64 / first.rss_kib as f64)
    }
}

impl fmt::Display for BacklogReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>10}{:>13}{:>10}{:>11}{:>9}{:>11}",
            "backlog", "publish s", "RSS MiB", "peak MiB", "held", "waiting"
        )?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        for r in &self.results {
            writeln!(
                f,
                "{:>10}{:>13.1}{:>10.1}{:>11.1}{:>9}{:>11}",
                r.tasks,
                r.publish_secs,
                mib(r.rss_kib),
                mib(r.peak_kib),
                r.held,
                r.waiting
            )?;
        }
        match self.ratio() {
            Some(ratio) => write!(
                f,
                "RSS ratio largest/smallest backlog: {ratio:.3} (bar <= {BACKLOG_BAR}: {}); \
                 `batchd run` after {} s with a provider that answers after an hour",
                if ratio <= BACKLOG_BAR {
                    "met"
                } else {
                    "NOT met"
                },
                self.settle_secs
            ),
            None => write!(f, "no ratio: fewer than two readings"),
        }
    }
}

/// Measures each size in `sizes` and prints the table.
pub async fn run(sizes: &[usize], settle_secs: u64) -> anyhow::Result<BacklogReport> {
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("--backlog-sizes needs sizes of at least 1");
    }
    let sim = SimServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            latency: Duration::from_secs(3600),
            ..SimConfig::default()
        },
    )
    .await
    .context("starting the simulated provider")?;
    let mut results = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let r = measure(n, &sim.base_url(), settle_secs).await;
        results.push(r?);
    }
    sim.shutdown().await;
    let report = BacklogReport {
        results,
        settle_secs,
    };
    println!("{report}");
    Ok(report)
}

async fn measure(n: usize, base_url: &str, settle_secs: u64) -> anyhow::Result<BacklogResult> {
    let nats = LocalNats::start().await?;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("batchd.toml");
    std::fs::write(&path, config_toml(nats.url(), base_url))
        .with_context(|| format!("writing {}", path.display()))?;
    let config = Config::load(&path)?;
    let client = crate::nats::connect(&config.nats).await?;
    let topology = crate::nats::ensure_topology(&client, &config).await?;
    let js = jetstream::new(client.clone());

    let subject = Subjects::of(&config.nats).task(Priority::P2);
    let pb = bar(n, &format!("{n} tasks"));
    let started = Instant::now();
    // Bodies made as they are sent: the publisher's memory stays flat too.
    let types: Vec<&String> = config.task_types.keys().collect();
    let outgoing = (0..n).map(|i| {
        let (id, body) = task_body(&types, i);
        Outgoing {
            subject: subject.clone(),
            msg_id: id,
            content_type: Encoding::Json.content_type(),
            body,
        }
    });
    Publisher::new(js.clone())
        .publish_all(outgoing, |_| pb.inc(1))
        .await
        .with_context(|| format!("publishing the backlog of {n}"))?;
    pb.finish_and_clear();
    let publish_secs = started.elapsed().as_secs_f64();
    eprintln!("published {n} tasks in {publish_secs:.1} s; starting batchd run");

    let log = std::fs::File::create(dir.path().join("batchd.log"))?;
    let exe = std::env::current_exe().context("finding the batchd binary")?;
    let mut child = Engine(
        Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting batchd run")?,
    );
    let pid = child.0.id();
    let settle = Duration::from_secs(settle_secs);
    let until = Instant::now() + settle;
    let mut peak_kib = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "batchd run exited early ({status}): {}",
                log_tail(&dir.path().join("batchd.log"))
            );
        }
        peak_kib = peak_kib.max(memory(pid)?.0);
    }
    let (rss_kib, hwm_kib) = memory(pid)?;
    let consumer = crate::nats::consumer_name(&config.nats, Priority::P2);
    let info = topology
        .tasks
        .consumer_info(&consumer)
        .await
        .with_context(|| format!("reading consumer {consumer}"))?;
    drop(child);
    let _ = client.drain().await;
    drop(nats);
    Ok(BacklogResult {
        tasks: n,
        publish_secs,
        rss_kib,
        peak_kib: peak_kib.max(hwm_kib),
        held: u64::try_from(info.num_ack_pending).unwrap_or(0),
        waiting: info.num_pending,
    })
}

/// The child `batchd run`, killed when dropped.
struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The run's config: the defaults, the private server, the slow provider.
fn config_toml(nats_url: &str, base_url: &str) -> String {
    format!(
        r#"
[nats]
url = "{nats_url}"
[dispatch]
request_timeout_secs = 7200
[metrics]
addr = "127.0.0.1:0"
[providers.openai]
base_url = "{base_url}"
base_url_env = "BATCHD_BENCH_UNSET"
api_key_env = "BATCHD_BENCH_UNSET"
api_key = "sk-bench"
"#
    )
}

/// (`VmRSS`, `VmHWM`) of a process, in KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (bench --backlog needs Linux /proc)"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM in {path}"),
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_memory() {
        let (rss, hwm) = memory(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
    }

    #[test]
    fn the_ratio_is_largest_over_smallest() {
        let r = |tasks, rss_kib| BacklogResult {
            tasks,
            publish_secs: 1.0,
            rss_kib,
            peak_kib: rss_kib,
            held: 0,
            waiting: 0,
        };
        let report = BacklogReport {
            results: vec![r(10, 100), r(1000, 105)],
            settle_secs: 1,
        };
        assert!((report.ratio().unwrap() - 1.05).abs() < 1e-9);
        assert!(report.to_string().contains("met"));
    }
}
