//! `batchd bench --replicas`: the throughput of 1, 2 and 3 replicas sharing
//! the durable consumers, with the instant provider, against a private
//! single nats-server (streams and buckets with one copy) and a private
//! 3-node cluster (three copies, `nats.replicas = 3`).
//!
//! Each run gets fresh servers: the tasks are published first, then the
//! replicas start (engines of their own, each with its own NATS connection
//! and replica name, in this process) and the run is timed until every
//! outcome is in the results stream. Reported beside the rate: this
//! process's CPU per task (all replicas) and the nats-server processes' CPU
//! per task, the two figures docs/SCALING.md estimates larger deployments from.

use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context as _};
use batchd_actors::task::Priority;
use tokio::time::Instant;

use super::{cpu_since, instant_providers, process_cpu, publish_tasks, task_bodies, until_stored};
use crate::cmd::progress_bar as bar;
use crate::config::Config;
use crate::local_nats::{LocalCluster, LocalNats};

/// Where the replicas run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One nats-server, one copy of everything.
    Single,
    /// Three clustered nats-servers, three copies of everything.
    Cluster3,
}

impl Topology {
    fn name(self) -> &'static str {
        match self {
            Topology::Single => "1 server, R1",
            Topology::Cluster3 => "3-node cluster, R3",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRun {
    /// Where.
    pub topology: Topology,
    /// How many replicas.
    pub replicas: usize,
    /// Tasks.
    pub tasks: usize,
    /// Seconds from the replicas' start to the last outcome.
    pub seconds: f64,
    /// CPU of this process (every replica), seconds.
    pub batchd_cpu: Option<f64>,
    /// CPU of the nats-server processes, seconds.
    pub nats_cpu: Option<f64>,
}

impl ReplicaRun {
    /// Tasks per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tasks as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn us_per_task(&self, cpu: Option<f64>) -> String {
        cpu.filter(|_| self.tasks > 0).map_or_else(
            || "-".into(),
            |c| format!("{:.1}", c * 1e6 / self.tasks as f64),
        )
    }
}

/// The runs of `bench --replicas`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicasReport {
    /// In the order run.
    pub runs: Vec<ReplicaRun>,
    /// Logical cores.
    pub cores: usize,
}

impl fmt::Display for ReplicasReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<22}{:>9}{:>8}{:>10}{:>10}{:>18}{:>18}",
            "NATS", "replicas", "tasks", "seconds", "tasks/s", "batchd CPU us/t", "nats CPU us/t"
        )?;
        for r in &self.runs {
            writeln!(
                f,
                "{:<22}{:>9}{:>8}{:>10.2}{:>10.0}{:>18}{:>18}",
                r.topology.name(),
                r.replicas,
                r.tasks,
                r.seconds,
                r.rate(),
                r.us_per_task(r.batchd_cpu),
                r.us_per_task(r.nats_cpu),
            )?;
        }
        write!(
            f,
            "instant provider; every replica and every nats-server on this machine ({} cores)",
            self.cores
        )
    }
}

/// Runs every topology with each count of replicas; prints and returns the table.
pub async fn run(
    tasks: usize,
    counts: &[usize],
    timeout: Duration,
) -> anyhow::Result<ReplicasReport> {
    if tasks == 0 || counts.contains(&0) {
        bail!("--tasks and every --replica-counts must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut runs = Vec::new();
    for topology in [Topology::Single, Topology::Cluster3] {
        for &k in counts {
            eprintln!(
                "batchd bench --replicas: {}, {k} replica(s), {tasks} tasks",
                topology.name()
            );
            runs.push(measure(topology, k, tasks, timeout).await?);
        }
    }
    let report = ReplicasReport { runs, cores };
    println!("{report}");
    Ok(report)
}

/// Private servers of one topology, and their process ids.
enum Servers {
    Single(LocalNats),
    Cluster(LocalCluster),
}

impl Servers {
    async fn start(t: Topology) -> anyhow::Result<Servers> {
        Ok(match t {
            Topology::Single => Servers::Single(LocalNats::start().await?),
            Topology::Cluster3 => Servers::Cluster(LocalCluster::start(3).await?),
        })
    }

    fn url(&self) -> String {
        match self {
            Servers::Single(s) => s.url().to_owned(),
            Servers::Cluster(c) => c.url(),
        }
    }

    fn cpu(&self) -> Option<f64> {
        let pids = match self {
            Servers::Single(s) => vec![s.pid()],
            Servers::Cluster(c) => c.pids(),
        };
        pids.into_iter()
            .map(|p| super::cpu_of(&format!("/proc/{p}/stat")))
            .sum()
    }
}

async fn measure(
    topology: Topology,
    replicas: usize,
    tasks: usize,
    timeout: Duration,
) -> anyhow::Result<ReplicaRun> {
    let servers = Servers::start(topology).await?;
    let mut config = Config::defaults()?;
    config.realtime_only();
    config.nats.url = servers.url();
    config.nats.replicas = if topology == Topology::Cluster3 { 3 } else { 1 };
    config
        .nats
        .size_tasks_for(u64::try_from(tasks.max(60_000)).unwrap_or(u64::MAX));
    let client = crate::nats::connect(&config.nats).await?;
    let topo = crate::nats::ensure_topology(&client, &config).await?;
    let bodies = task_bodies(&config, tasks);
    let js = async_nats::jetstream::new(client.clone());
    publish_tasks(&js, &config.subjects().task(Priority::P2), &bodies, "pub").await?;

    let pb = bar(tasks, &format!("{replicas}x"));
    let (cpu_before, nats_before) = (process_cpu(), servers.cpu());
    let started = Instant::now();
    let mut running = Vec::with_capacity(replicas);
    for i in 0..replicas {
        let mut c = config.clone();
        c.nats.replica = format!("bench-{i}");
        running.push(
            crate::app::start(&c, instant_providers(&c))
                .await
                .with_context(|| format!("starting replica {i}"))?,
        );
    }
    let mut results = topo.results.clone();
    let label = format!("{replicas}x");
    let outcome = until_stored(&mut results, tasks, started, timeout, &pb, &label)
        .await
        .map(|()| {
            (
                started.elapsed(),
                cpu_since(cpu_before),
                servers.cpu().zip(nats_before).map(|(a, b)| a - b),
            )
        });
    pb.finish_and_clear();
    for r in running {
        r.engine.shutdown().await;
        let _ = r.client.drain().await;
    }
    let _ = client.drain().await;
    let (elapsed, batchd_cpu, nats_cpu) = outcome?;
    Ok(ReplicaRun {
        topology,
        replicas,
        tasks,
        seconds: elapsed.as_secs_f64(),
        batchd_cpu,
        nats_cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_rates_and_cpu_per_task() {
        let report = ReplicasReport {
            runs: vec![ReplicaRun {
                topology: Topology::Cluster3,
                replicas: 2,
                tasks: 1000,
                seconds: 0.5,
                batchd_cpu: Some(0.1),
                nats_cpu: None,
            }],
            cores: 2,
        };
        let text = report.to_string();
        let row = text.lines().nth(1).unwrap();
        for part in ["3-node cluster, R3", " 2 ", "2000", "100.0", "-"] {
            assert!(row.contains(part), "{part} in {row}");
        }
    }
}
