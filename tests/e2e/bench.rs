//! `batchd bench` as an operator runs it: the floor table, and with
//! `--capacity` the share of a rate-limited provider's limit used and the
//! share of 429s, here on one short setting; `--preemption`, `--replicas`,
//! `--cost` and `--routing` with tiny sizes.

use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Each bench runs alone among these: several of them measure shares of a
/// rate limit over seconds, which another bench's load beside them would
/// skew (other tests may still run beside them).
static ONE_BENCH_AT_A_TIME: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ONE_BENCH_AT_A_TIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The percentage in `row`'s column `index` (whitespace-separated).
fn percent(row: &str, index: usize) -> f64 {
    let cell = row.split_whitespace().nth(index).unwrap_or_default();
    cell.trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("column {index} of {row:?} is not a percentage"))
}

#[test]
fn bench_capacity_prints_the_share_of_the_limit_used_and_few_429s() {
    let _alone = alone();
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["bench", "--tasks", "100", "--capacity"])
        .args(["--capacity-secs", "20", "--capacity-sim", "1200:100"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("(a) JetStream floor"), "{stdout}");
    assert!(stdout.contains("capacity: one model"), "{stdout}");
    assert!(stdout.contains("in this process"), "{stdout}");
    assert!(
        stdout.contains("capacity bar, --rpm 1200 --latency-ms 100:"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("--rpm 1200 --latency-ms 100 ") && l.contains("1200/min"))
        .unwrap_or_else(|| panic!("no capacity row: {stdout}"));
    // sim setting (4 words), secs, limit, steady, from (2 words), whole run, 429s.
    let (steady, rate_limited) = (percent(row, 6), percent(row, 10));
    assert!(rate_limited < 5.0, "{row}");
    assert!(steady >= 80.0, "{row}");
    assert!(
        stdout.contains("--rpm 1200 --latency-ms 100: successes per 10 s (limit 200):"),
        "{stdout}"
    );
    assert!(stdout.contains("learned rpm 1200"), "{stdout}");
}

#[test]
fn three_replicas_share_one_limit_within_it_and_use_most_of_it() {
    let _alone = alone();
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args([
            "bench",
            "--tasks",
            "100",
            "--capacity",
            "--capacity-replicas",
            "3",
        ])
        .args(["--capacity-secs", "40", "--capacity-sim", "1200:800"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = stdout
        .lines()
        .find(|l| {
            l.starts_with("--rpm 1200 --latency-ms 800, 3 replicas ") && l.contains("1200/min")
        })
        .unwrap_or_else(|| panic!("no capacity row: {stdout}"));
    // sim setting (6 words), secs, limit, steady, from (2 words), whole run, 429s.
    let (steady, rate_limited) = (percent(row, 8), percent(row, 12));
    assert!(rate_limited < 0.5, "{row}");
    assert!(steady >= 90.0, "{row}");
    assert!(
        stdout.contains("capacity bar, --rpm 1200 --latency-ms 800, 3 replicas: steady >= 90%"),
        "{stdout}"
    );
}

#[test]
fn bench_preemption_prints_p1_latency_and_the_limit_used_with_preemption_on_and_off() {
    let _alone = alone();
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["bench", "--preemption", "--preemption-bulk", "300"])
        .args(["--preemption-warmup-secs", "1", "--preemption-secs", "2"])
        .args(["--preemption-rate", "5", "--preemption-sim", "1200:100"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("preemption: 300 p3 tasks queued"),
        "{stdout}"
    );
    assert!(stdout.contains("p1 p50"), "{stdout}");
    assert!(stdout.contains("p1 p99"), "{stdout}");
    assert!(stdout.contains("limit used"), "{stdout}");
    assert!(stdout.contains("preemption bar:"), "{stdout}");
    for mode in ["on", "off"] {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(mode))
            .unwrap_or_else(|| panic!("no {mode} row: {stdout}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        // mode, p1 done, p50 (2 words), p99 (2), max (2), limit used, 429s, preempted.
        assert_eq!(cells[1], "10/10", "every p1 task answered: {row}");
        for at in [2, 4, 6] {
            let ms: f64 = cells[at].parse().unwrap_or_else(|_| panic!("{row}"));
            assert!(ms > 0.0, "{row}");
            assert_eq!(cells[at + 1], "ms", "{row}");
        }
        assert!(cells[8].ends_with('%'), "{row}");
    }
}

#[test]
fn bench_replicas_prints_a_row_per_topology_and_replica_count() {
    let _alone = alone();
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args([
            "bench",
            "--replicas",
            "--tasks",
            "300",
            "--replica-counts",
            "1,2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for (topology, replicas) in [
        ("1 server, R1", "1"),
        ("1 server, R1", "2"),
        ("3-node cluster, R3", "1"),
        ("3-node cluster, R3", "2"),
    ] {
        let row = stdout
            .lines()
            .find(|l| {
                l.starts_with(topology)
                    && l[topology.len()..].split_whitespace().next() == Some(replicas)
            })
            .unwrap_or_else(|| panic!("no row for {topology} x{replicas}: {stdout}"));
        let cells: Vec<&str> = row[topology.len()..].split_whitespace().collect();
        assert_eq!(cells[1], "300", "{row}");
        let rate: f64 = cells[3].parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(rate > 0.0, "{row}");
        let nats_cpu: f64 = cells[5].parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(nats_cpu > 0.0, "nats-server CPU measured: {row}");
    }
}

#[test]
fn bench_cost_prints_each_way_priced_from_the_bill_and_what_each_lever_saved() {
    let _alone = alone();
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["bench", "--cost", "--tasks", "200", "--batch-secs", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?}: {stdout}"))
            .to_owned()
    };
    let cost = |row: &str, words: usize| -> f64 {
        let cells: Vec<&str> = row.split_whitespace().collect();
        // label words, tasks, succeeded, cost
        assert_eq!(cells[words], "200", "{row}");
        assert_eq!(cells[words + 1], "200", "every task succeeded: {row}");
        cells[words + 2].parse().unwrap_or_else(|_| panic!("{row}"))
    };
    let naive = cost(&row("(a) naive"), 5);
    let defaults = cost(&row("(b) batchd defaults"), 3);
    let levers = cost(&row("(c) batchd, every lever on"), 5);
    assert!(naive > 0.0, "{stdout}");
    assert!(
        defaults < naive * 0.5,
        "tiering cuts the naive cost: {stdout}"
    );
    assert!(
        levers < naive * 0.5,
        "tiering cuts it with every lever on: {stdout}"
    );
    // The Batch API carried the priority-3 tasks of (b), found by
    // `batch = "auto"`, and of (c).
    for (way, label_words) in [("(b) batchd", 3), ("(c) batchd", 5)] {
        let cells: Vec<String> = row(way).split_whitespace().map(str::to_owned).collect();
        let batch_tasks: usize = cells[label_words + 4]
            .parse()
            .unwrap_or_else(|_| panic!("{cells:?}"));
        assert!(batch_tasks > 100, "{cells:?}");
    }
    for lever in [
        "tiering, the rest",
        "Batch API (p3; p2 with patience)",
        "dedupe of exact duplicates",
    ] {
        assert!(stdout.contains(lever), "{stdout}");
    }
    // The shared system prompts are long enough to cache: (c)'s realtime
    // tasks read them from the provider's cache after a warm-up.
    let caching: f64 = row("  prompt caching (cached tokens), in (c)")
        .split_whitespace()
        .find_map(|cell| cell.parse().ok())
        .unwrap_or_else(|| panic!("a saving: {stdout}"));
    assert!(caching > 0.0, "prompt caching saved something: {stdout}");
    assert!(
        stdout.contains("bar: (b) >= 75% cheaper than (a), (c) >= 85%"),
        "{stdout}"
    );
}

#[test]
fn bench_routing_prints_each_way_priced_from_the_bill_with_p3_latency() {
    let _alone = alone();
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["bench", "--routing", "--tasks", "150", "--batch-secs", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // label, tasks, succeeded, cost, vs (a), p3 batch, p3 flex, refused,
    // p3 p50, p99, realtime p3 p50, p99, seconds
    let row = |prefix: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?}: {stdout}"));
        line[prefix.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let num = |cells: &[String], i: usize| -> f64 {
        cells[i]
            .trim_start_matches('-')
            .trim_end_matches('%')
            .parse()
            .unwrap_or_else(|_| panic!("{cells:?}"))
    };
    let a = row("(a) realtime only");
    let b = row("(b) Batch API for p3");
    let c = row("(c) Batch API + flex");
    for cells in [&a, &b, &c] {
        assert_eq!(cells[0], "150", "{cells:?}");
        assert_eq!(cells.len(), 12, "{cells:?}");
        for p50 in [7, 9] {
            assert!(num(cells, p50) > 0.0, "p50 measured: {cells:?}");
            assert!(
                num(cells, p50 + 1) >= num(cells, p50),
                "p99 >= p50: {cells:?}"
            );
        }
    }
    // Every way gives the same tasks the same outcome (the bad inputs fail).
    assert_eq!(a[1], b[1]);
    assert_eq!(a[1], c[1]);
    let (cost_a, cost_b, cost_c) = (num(&a, 2), num(&b, 2), num(&c, 2));
    assert!(
        cost_a > 0.0 && cost_b < cost_a && cost_c < cost_b,
        "{stdout}"
    );
    assert_eq!(a[3], "-");
    assert!(b[3].starts_with('-') && b[3].ends_with('%'), "{b:?}");
    // (a) sends nothing by Batch API or flex; (b) no flex; (c) both.
    assert_eq!((num(&a, 4), num(&a, 5)), (0.0, 0.0));
    assert!(num(&b, 4) > 0.0 && num(&b, 5) == 0.0, "{b:?}");
    assert!(num(&c, 4) > 0.0 && num(&c, 5) > 0.0, "{c:?}");
    assert!(
        stdout.contains("priority-3 tasks had a deadline 2 h away"),
        "{stdout}"
    );
}
