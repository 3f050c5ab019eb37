//! `batchd dlq` end to end: the real binary against a real nats-server,
//! with dead letters made by the real engine (an unserved model gives
//! `invalid_request`, the simulator's `bad_request` fault gives
//! `provider_rejected`), listed, shown, replayed and purged.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use batchd::sim::{Fault, FaultKind, SimConfig};
use serde_json::{json, Value};

const RESULTS: &str = "BATCHD_RESULTS";
const DLQ: &str = "BATCHD_DLQ";
const TASKS: &str = "BATCHD_TASKS";

/// A running engine and a config file for the binary that points at it.
struct Setup {
    stack: common::Stack,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

async fn setup(faults: &[Fault]) -> Setup {
    let stack = common::stack(SimConfig::default(), "").await;
    for f in faults {
        stack.sim.add_fault(f.clone()).expect("add the fault");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::config_file(dir.path(), &stack.nats.url(), &stack.sim.base_url(), "");
    Setup {
        stack,
        _dir: dir,
        config,
    }
}

/// A 400 for every request, for an hour.
fn rejecting() -> Fault {
    Fault::new(
        FaultKind::BadRequest,
        Duration::ZERO..Duration::from_secs(3600),
    )
}

async fn batchd_dlq(config: &Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("BATCHD_NATS_URL")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("batchd dlq finished within 60s")
        .expect("run batchd dlq")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `batchd dlq ARGS` and expects it to fail.
async fn fails(config: &Path, args: &[&str]) -> Output {
    let o = batchd_dlq(config, args).await;
    assert!(!o.status.success(), "batchd dlq {args:?} succeeded");
    o
}

/// Runs `batchd dlq ARGS` and expects success.
async fn ok(config: &Path, args: &[&str]) -> String {
    let o = batchd_dlq(config, args).await;
    assert!(
        o.status.success(),
        "batchd dlq {args:?} failed\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// A task on priority `p` naming a model nobody serves: `invalid_request`.
fn unserved(id: &str, p: u8) -> Value {
    let mut t = common::task(id, p);
    t["model"] = json!("gpt-99");
    t
}

/// Publishes `task` as JSON on priority `p`, with its task id as message id.
async fn publish_json(js: &jetstream::Context, p: u8, task: &Value) {
    let id = task["task_id"].as_str().expect("task_id");
    common::publish_json(js, &format!("batchd.tasks.p{p}"), task, id).await;
}

/// The last message on `subject` of `stream`, decoded, with its `Nats-Msg-Id`.
async fn last(js: &jetstream::Context, stream: &str, subject: &str) -> Option<(Value, String)> {
    let s = js.get_stream(stream).await.expect("stream");
    match s.direct_get_last_for_subject(subject).await {
        Ok(m) => {
            let content_type = batchd::client::read::content_type(Some(&m.headers));
            let v = batchd::client::decode(content_type, &m.payload).expect("decodes");
            let msg_id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            Some((v, msg_id))
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
        Err(e) => panic!("reading {subject}: {e}"),
    }
}

/// Waits until the last message on `subject` of `stream` satisfies `ok`.
async fn wait_last(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    ok: impl Fn(&Value, &str) -> bool,
) -> (Value, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = last(js, stream, subject).await;
        if let Some((v, id)) = &found {
            if ok(v, id) {
                return (v.clone(), id.clone());
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{subject} never got the expected message; last: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages `stream` holds on `subject`.
async fn count_on(js: &jetstream::Context, stream: &str, subject: &str) -> usize {
    common::read_all(js, stream)
        .await
        .get(subject)
        .map_or(0, Vec::len)
}

async fn last_task_sequence(js: &jetstream::Context) -> u64 {
    let mut s = js.get_stream(TASKS).await.expect("tasks stream");
    s.info().await.expect("info").state.last_sequence
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The `id` of each line of `ls --json` output.
fn ids(out: &str) -> Vec<String> {
    json_lines(out)
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_and_show_list_dead_letters_as_a_table_and_as_json() {
    let s = setup(&[]).await;
    let (js, config) = (&s.stack.js, &s.config);
    publish_json(js, 2, &unserved("bad-p2", 2)).await;
    publish_json(js, 3, &unserved("bad-p3", 3)).await;
    publish_json(js, 2, &common::task("fine", 2)).await;
    common::publish(js, "batchd.tasks.p1", b"{not json".to_vec(), None, None).await;
    common::wait_for_messages(js, RESULTS, 4, Duration::from_secs(30)).await;
    common::wait_for_messages(js, DLQ, 3, Duration::from_secs(30)).await;

    let table = ok(config, &["ls"]).await;
    let lines: Vec<&str> = table
        .lines()
        .filter(|l| !l.trim_start().starts_with('-'))
        .collect();
    assert_eq!(lines.len(), 4, "a header and three rows:\n{table}");
    for column in ["ID", "KIND", "PRIORITY", "ATTEMPTS", "AGE", "MESSAGE"] {
        assert!(lines[0].contains(column), "{table}");
    }
    let row = lines
        .iter()
        .find(|l| l.contains("bad-p3"))
        .expect("bad-p3 listed");
    assert!(row.contains("invalid_request"), "{row}");
    assert!(row.contains("model \"gpt-99\" is not served"), "{row}");
    assert!(table.contains("invalid~p1~"), "{table}");
    assert!(!table.contains("fine"), "{table}");

    let all = json_lines(&ok(config, &["ls", "--json"]).await);
    assert_eq!(all.len(), 3);
    let p3 = all.iter().find(|l| l["id"] == "bad-p3").expect("bad-p3");
    assert_eq!(p3["priority"], 3);
    assert_eq!(p3["error"]["kind"], "invalid_request");
    assert_eq!(p3["subject"], "batchd.tasks.p3");
    assert_eq!(p3["task"]["task_id"], "bad-p3");
    assert!(p3["age_secs"].as_f64().is_some_and(|a| a < 60.0), "{p3}");
    let unreadable = all
        .iter()
        .find(|l| l["id"].as_str().unwrap().starts_with("invalid~p1~"))
        .expect("the unreadable task");
    assert!(unreadable["task"].is_null());
    assert!(unreadable["raw_base64"].is_string());

    let p3_only = ok(config, &["ls", "--json", "--priority", "3"]).await;
    assert_eq!(ids(&p3_only), ["bad-p3"]);
    let rejected = ok(config, &["ls", "--json", "--kind", "provider_rejected"]).await;
    assert!(ids(&rejected).is_empty());
    assert_eq!(
        ids(&ok(config, &["ls", "--json", "--newer-than", "1h"]).await).len(),
        3
    );
    assert!(ids(&ok(config, &["ls", "--json", "--older-than", "1d"]).await).is_empty());
    assert_eq!(
        ids(&ok(config, &["ls", "--json", "--limit", "1"]).await).len(),
        1
    );
    let limited = ok(config, &["ls", "--limit", "2"]).await;
    assert!(limited.contains("(2 of 3 shown"), "{limited}");

    let shown = ok(config, &["show", "bad-p2"]).await;
    for expected in [
        "invalid_request",
        "model \"gpt-99\" is not served",
        "batchd.tasks.p2",
        "kept outcome  failed, generation 0",
        "replay        as generation 1 on batchd.tasks.p2",
        "\"task_id\": \"bad-p2\"",
    ] {
        assert!(shown.contains(expected), "{expected:?} missing:\n{shown}");
    }
    let shown: Value = serde_json::from_str(&ok(config, &["show", "bad-p2", "--json"]).await)
        .expect("show --json is one JSON object");
    assert_eq!(shown["id"], "bad-p2");
    assert_eq!(shown["dead_letter"]["error"]["kind"], "invalid_request");
    assert_eq!(shown["dead_letter"]["task"]["model"], "gpt-99");
    assert_eq!(shown["kept_outcome"]["status"], "failed");
    assert_eq!(shown["replay"]["generation"], 1);

    let synthetic = ids(&ok(config, &["ls", "--json", "--priority", "1"]).await);
    let shown = ok(config, &["show", &synthetic[0]]).await;
    assert!(shown.contains("no readable task"), "{shown}");
    assert!(shown.contains("raw bytes (base64)"), "{shown}");

    let missing = fails(config, &["show", "nope"]).await;
    assert!(
        stderr(&missing).contains("no dead letter for nope"),
        "{}",
        stderr(&missing)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_invalid_task_runs_again_and_fails_again_as_generation_1() {
    let s = setup(&[]).await;
    let (js, config) = (&s.stack.js, &s.config);
    publish_json(js, 2, &unserved("again", 2)).await;
    let mp = unserved("again-mp", 3);
    common::publish(
        js,
        "batchd.tasks.p3",
        rmp_serde::to_vec_named(&mp).expect("msgpack"),
        Some("application/msgpack"),
        Some("again-mp"),
    )
    .await;
    common::wait_for_messages(js, DLQ, 2, Duration::from_secs(30)).await;
    let (_, first_id) = last(js, DLQ, "batchd.dlq.again")
        .await
        .expect("dead letter");
    assert_eq!(first_id, "again");

    let out = ok(config, &["replay", "again", "again-mp"]).await;
    assert!(
        out.contains("replayed again as generation 1 on batchd.tasks.p2"),
        "{out}"
    );
    assert!(
        out.contains("replayed again-mp as generation 1 on batchd.tasks.p3"),
        "{out}"
    );
    assert!(out.contains("2 replayed, 0 refused"), "{out}");

    for id in ["again", "again-mp"] {
        let results = format!("batchd.results.{id}");
        let (outcome, msg_id) = wait_last(js, RESULTS, &results, |o, _| o["generation"] == 1).await;
        assert_eq!(outcome["status"], "failed");
        assert_eq!(outcome["error"]["kind"], "invalid_request");
        assert_eq!(msg_id, format!("{id}:g1"));
        assert_eq!(
            count_on(js, RESULTS, &results).await,
            1,
            "only the kept outcome"
        );
        // A new dead letter, from generation 1.
        let dead = format!("batchd.dlq.{id}");
        let (letter, msg_id) = wait_last(js, DLQ, &dead, |_, m| m.ends_with(":g1")).await;
        assert_eq!(msg_id, format!("{id}:g1"));
        assert_eq!(letter["task"]["task_id"], id);
        assert_eq!(count_on(js, DLQ, &dead).await, 1);
    }
    // The MessagePack task was replayed, and answered, in MessagePack.
    let s = js.get_stream(RESULTS).await.unwrap();
    let m = s
        .direct_get_last_for_subject("batchd.results.again-mp")
        .await
        .unwrap();
    assert_eq!(
        batchd::client::read::content_type(Some(&m.headers)),
        Some("application/msgpack")
    );

    // The next replay is generation 2.
    let out = ok(config, &["replay", "again", "--dry-run"]).await;
    assert!(out.contains("would replay again as generation 2"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_the_cause_is_gone_supersedes_the_failed_outcome() {
    let s = setup(&[rejecting()]).await;
    let (js, config) = (&s.stack.js, &s.config);
    for id in ["r1", "r2"] {
        publish_json(js, 2, &common::task(id, 2)).await;
    }
    common::wait_for_messages(js, DLQ, 2, Duration::from_secs(30)).await;
    let listed = json_lines(&ok(config, &["ls", "--json", "--kind", "provider_rejected"]).await);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["error"]["status_code"], 400);

    // The provider is fixed; the tasks were never wrong.
    s.stack.sim.clear_faults();
    let out = ok(config, &["replay", "--kind", "provider_rejected"]).await;
    assert!(out.contains("2 replayed, 0 refused"), "{out}");

    for id in ["r1", "r2"] {
        let results = format!("batchd.results.{id}");
        let (outcome, msg_id) =
            wait_last(js, RESULTS, &results, |o, _| o["status"] == "succeeded").await;
        assert_eq!(outcome["generation"], 1);
        assert_eq!(msg_id, format!("{id}:g1"));
        assert!(outcome["output"].is_string());
        assert_eq!(
            count_on(js, RESULTS, &results).await,
            1,
            "the success replaced the failure"
        );
        assert!(
            last(js, DLQ, &format!("batchd.dlq.{id}")).await.is_none(),
            "the dead letter of {id} is gone"
        );
    }
    assert!(json_lines(&ok(config, &["ls", "--json"]).await).is_empty());
    // Attempts start afresh: nothing is left in the bucket for them.
    let kv = js.get_key_value("batchd-attempts").await.unwrap();
    assert!(kv.get("r1").await.unwrap().is_none());

    // Now succeeded: never replayed again.
    let refused = fails(config, &["replay", "r1"]).await;
    assert!(
        stdout(&refused).contains("refused r1: its kept outcome succeeded (generation 1): a succeeded task is never replayed"),
        "{}",
        stdout(&refused)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_task_is_never_replayed_even_with_a_stray_dead_letter() {
    let s = setup(&[]).await;
    let (js, config) = (&s.stack.js, &s.config);
    publish_json(js, 1, &common::task("done", 1)).await;
    wait_last(js, RESULTS, "batchd.results.done", |o, _| {
        o["status"] == "succeeded"
    })
    .await;
    // A dead letter that should not be there (written by hand).
    let stray = json!({
        "task": common::task("done", 1),
        "error": {"kind": "max_retries", "message": "by hand", "status_code": null},
        "attempts": 4,
        "dead_at": "2026-01-01T00:00:00.000Z",
        "subject": "batchd.tasks.p1",
    });
    common::publish(
        js,
        "batchd.dlq.done",
        serde_json::to_vec(&stray).unwrap(),
        None,
        Some("stray"),
    )
    .await;
    let before = last_task_sequence(js).await;

    for args in [&["replay", "done"][..], &["replay", "--all"][..]] {
        let out = batchd_dlq(config, args).await;
        assert!(
            stdout(&out).contains("refused done: its kept outcome succeeded"),
            "{}",
            stdout(&out)
        );
        assert!(
            stdout(&out).contains("0 replayed, 1 refused"),
            "{}",
            stdout(&out)
        );
        // Named ids that are refused fail the command; a bulk selection does not.
        assert_eq!(out.status.success(), args.contains(&"--all"), "{args:?}");
    }
    let missing = fails(config, &["replay", "never-seen"]).await;
    assert!(stdout(&missing).contains("refused never-seen: no dead letter"));
    assert_eq!(
        last_task_sequence(js).await,
        before,
        "nothing was published"
    );
    assert!(last(js, DLQ, "batchd.dlq.done").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_change_nothing() {
    let s = setup(&[]).await;
    let (js, config) = (&s.stack.js, &s.config);
    publish_json(js, 2, &unserved("dry", 2)).await;
    common::publish(
        js,
        "batchd.tasks.p3",
        vec![0xc1],
        Some("application/msgpack"),
        None,
    )
    .await;
    common::wait_for_messages(js, DLQ, 2, Duration::from_secs(30)).await;
    let before = (
        last_task_sequence(js).await,
        common::read_all(js, DLQ).await,
        common::read_all(js, RESULTS).await,
    );

    let out = ok(config, &["replay", "--all", "--dry-run"]).await;
    assert!(
        out.contains("would replay dry as generation 1 on batchd.tasks.p2"),
        "{out}"
    );
    assert!(out.contains("refused invalid~p3~"), "{out}");
    assert!(out.contains("nothing to replay"), "{out}");
    assert!(
        out.contains("1 would be replayed, 1 would be refused"),
        "{out}"
    );
    let out = ok(config, &["purge", "--all", "--dry-run"]).await;
    assert!(out.contains("would purge dry"), "{out}");
    assert!(out.contains("2 would be purged"), "{out}");
    let out = ok(config, &["purge", "dry", "--dry-run"]).await;
    assert!(out.contains("would purge dry"), "{out}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = (
        last_task_sequence(js).await,
        common::read_all(js, DLQ).await,
        common::read_all(js, RESULTS).await,
    );
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_dead_letters_by_id_by_kind_and_all() {
    let s = setup(&[rejecting().for_model("gpt-4.1-nano")]).await;
    let (js, config) = (&s.stack.js, &s.config);
    for id in ["inv-a", "inv-b"] {
        publish_json(js, 2, &unserved(id, 2)).await;
    }
    let mut rejected = common::task("rej", 3);
    rejected["model"] = json!("gpt-4.1-nano");
    publish_json(js, 3, &rejected).await;
    common::publish(js, "batchd.tasks.p1", b"\xff".to_vec(), None, None).await;
    common::wait_for_messages(js, DLQ, 4, Duration::from_secs(30)).await;
    let all = ids(&ok(config, &["ls", "--json"]).await);
    let synthetic = all
        .iter()
        .find(|id| id.starts_with("invalid~p1~"))
        .expect("the unreadable task")
        .clone();

    let out = ok(config, &["purge", "inv-a", &synthetic]).await;
    assert!(out.contains("purged inv-a"), "{out}");
    assert!(out.contains(&format!("purged {synthetic}")), "{out}");
    let left = ids(&ok(config, &["ls", "--json"]).await);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&"inv-b".to_owned()) && left.contains(&"rej".to_owned()));

    let out = ok(config, &["purge", "--kind", "provider_rejected"]).await;
    assert!(out.contains("purged rej"), "{out}");
    assert_eq!(ids(&ok(config, &["ls", "--json"]).await), ["inv-b"]);

    let missing = fails(config, &["purge", "inv-a"]).await;
    assert!(stdout(&missing).contains("no dead letter for inv-a"));

    let out = ok(config, &["purge", "--all"]).await;
    assert!(out.contains("purged 1 dead letter message"), "{out}");
    assert_eq!(common::stream_len(js, DLQ).await, 0);
    // Outcomes stay: purging only removes dead letters.
    assert_eq!(common::stream_len(js, RESULTS).await, 4);
}
