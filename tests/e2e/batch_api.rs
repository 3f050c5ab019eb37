//! The `batch_api` route end to end: priority-3 tasks go through the
//! simulator's Batch API (Files + Batches over HTTP) with a real
//! nats-server; each gets one outcome, priced at the batch discount, equal
//! to the simulator's batch bill; a line error fails its task only; an
//! expired job's tasks run again without spending an attempt; a SIGKILL
//! mid-job neither loses a task nor submits the job twice.

use std::collections::HashMap;
use std::time::Duration;

use batchd::config::Config;
use batchd::sim::{BatchFaults, SimConfig, SimServer};
use batchd_actors::task::{RouteKind, Usage};
use serde_json::Value;

use crate::common;
use common::binary::Batchd;
use common::nats::NatsServer;

/// Batch jobs on, assembled and polled fast enough for a test.
pub const BATCH_ON: &str = r#"
[providers.openai]
batch = true
[batching.batch_api]
max_wait_ms = 300
poll_initial_ms = 50
poll_max_ms = 200
"#;

pub(crate) fn sim_config(batch: Duration) -> SimConfig {
    SimConfig {
        batch_duration: batch,
        ..SimConfig::default()
    }
}

/// `n` tasks `<prefix><i>` on `priority`.
pub(crate) fn tasks_on(n: usize, prefix: &str, priority: u8) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            (
                format!("batchd.tasks.p{priority}"),
                common::task(&id, priority),
            )
        })
        .collect()
}

/// The simulator's batch bill priced at the batch rate, in pico-dollars.
pub(crate) fn batch_bill(sim: &SimServer, config: &Config) -> (u64, u64) {
    let mut total = 0;
    let mut lines = 0;
    for (model, b) in sim.batch_bill() {
        let usage = Usage {
            input_tokens: b.prompt_tokens,
            cached_input_tokens: b.cached_tokens,
            output_tokens: b.completion_tokens,
            cache_write_input_tokens: 0,
        };
        total += config
            .prices
            .cost_picousd(&model, &usage, RouteKind::BatchApi)
            .expect("priced");
        lines += b.requests;
    }
    (total, lines)
}

/// Batch lines the simulator billed, all models.
pub(crate) fn billed_lines(sim: &SimServer) -> u64 {
    sim.batch_bill().values().map(|b| b.requests).sum()
}

pub(crate) fn outcome_of<'a>(outcomes: &'a HashMap<String, Vec<Value>>, id: &str) -> &'a Value {
    &outcomes[&format!("batchd.results.{id}")][0]
}

/// Makes `n` tasks `<prefix><i>` on a priority.
pub(crate) type MakeTasks = fn(usize, &str, u8) -> Vec<(String, Value)>;

/// 40 priority-3 tasks (`bulk7` refused by the provider) and 6 priority-1
/// tasks through `stack`, whose batch jobs go to `provider`: one outcome
/// each, the bulk ones on the `batch_api` route at half the realtime price,
/// their sum equal to the simulator's batch bill and to the ledger's batch
/// records; only `bulk7` fails, with a dead letter; only priority 1 goes
/// realtime.
pub(crate) async fn bulk_goes_through_batches_at_the_discount(
    stack: &common::Stack,
    config: &Config,
    make: MakeTasks,
    provider: &str,
) {
    let js = &stack.js;
    stack.sim.set_batch_faults(BatchFaults {
        failing_custom_ids: ["bulk7".to_owned()].into(),
        ..BatchFaults::default()
    });
    let mut all = make(40, "bulk", 3);
    all.extend(make(6, "prem", 1));
    common::publish_many(js, &all).await;
    let outcomes = common::wait_for_one_outcome_each(js, 46, Duration::from_secs(60)).await;

    let mut cost = 0.0;
    for i in 0..40 {
        let o = outcome_of(&outcomes, &format!("bulk{i}"));
        assert_eq!(o["route"], "batch_api", "{o}");
        assert_eq!(o["provider"], provider, "{o}");
        if i == 7 {
            // A refused line fails its own task only, with a dead letter.
            assert_eq!(o["status"], "failed", "{o}");
            assert_eq!(o["error"]["kind"], "provider_rejected");
            assert_eq!(o["error"]["status_code"], 400);
            continue;
        }
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["attempts"], 1);
        assert!(o["output"].is_string());
        let usage: Usage = serde_json::from_value(o["usage"].clone()).unwrap();
        let model = o["model"].as_str().unwrap();
        let full = config
            .prices
            .cost(model, &usage, RouteKind::Realtime)
            .unwrap();
        let paid = o["cost_usd"].as_f64().unwrap();
        assert!(
            paid > 0.0 && (paid - full / 2.0).abs() < 1e-9,
            "{paid} vs {full}"
        );
        cost += paid;
    }
    for i in 0..6 {
        assert_eq!(
            outcome_of(&outcomes, &format!("prem{i}"))["route"],
            "realtime"
        );
    }
    let dlq = common::read_all(js, "BATCHD_DLQ").await;
    assert_eq!(
        dlq.len(),
        1,
        "only the refused line's task is dead-lettered"
    );
    assert!(dlq.contains_key("batchd.dlq.bulk7"));

    let (billed, lines) = batch_bill(&stack.sim, config);
    assert_eq!(lines, 39, "one billed line per succeeded task");
    // Each line is priced on its own and rounded to a pico-dollar.
    let diff = (cost - batchd_actors::pricing::usd(billed)).abs();
    assert!(
        diff <= 39e-12,
        "outcomes {cost} vs bill {}",
        batchd_actors::pricing::usd(billed)
    );
    // The ledger's call records of batch lines add up to the same bill.
    let (ledger, recorded) = batch_ledger(js).await;
    assert_eq!(recorded, 39, "one ledger record per answered line");
    assert!(
        ledger.abs_diff(billed) <= 39,
        "ledger {ledger} vs bill {billed} pico-USD"
    );
    assert!((batchd_actors::pricing::usd(ledger) - cost).abs() < 1e-9);
    assert!(stack.sim.batch_creations() >= 1);
    assert_eq!(
        stack.sim.stats().requests,
        6,
        "only priority 1 went realtime"
    );
    common::wait_until_empty(js, "BATCHD_TASKS", Duration::from_secs(10)).await;
}

/// 10 priority-3 tasks through `stack` while batches expire after 3 lines:
/// the unanswered ones go in a new job and every task succeeds on its
/// first attempt.
pub(crate) async fn expired_tasks_run_again_without_an_attempt(
    stack: &common::Stack,
    make: MakeTasks,
) {
    let js = &stack.js;
    stack.sim.set_batch_faults(BatchFaults {
        expire_after_lines: Some(3),
        ..BatchFaults::default()
    });
    common::publish_many(js, &make(10, "late", 3)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stack.sim.batch_creations() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no batch created");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Later batches complete.
    stack.sim.set_batch_faults(BatchFaults::default());
    let outcomes = common::wait_for_one_outcome_each(js, 10, Duration::from_secs(60)).await;
    for (subject, list) in &outcomes {
        let o = &list[0];
        assert_eq!(o["status"], "succeeded", "{subject}: {o}");
        assert_eq!(o["route"], "batch_api");
        assert_eq!(o["attempts"], 1, "{subject}: an expiry spends no attempt");
    }
    assert!(
        stack.sim.batch_creations() >= 2,
        "the expired tasks went in a new job"
    );
    assert_eq!(billed_lines(&stack.sim), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_tasks_go_through_the_batch_api_with_one_discounted_outcome_each_equal_to_the_bill() {
    let stack = common::stack(sim_config(Duration::from_millis(400)), BATCH_ON).await;
    let config = common::config_with("nats://127.0.0.1:1", &stack.sim.base_url(), BATCH_ON);
    bulk_goes_through_batches_at_the_discount(&stack, &config, tasks_on, "openai").await;
}

/// `batch = "auto"` (the default): a provider that lists batch jobs when
/// asked at start takes priority 3's work by batch job; one without batch
/// endpoints (404, like an OpenAI-compatible server without a Batch API)
/// gets it realtime. Every task succeeds either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sends_bulk_by_batch_job_where_the_provider_has_a_batch_api_and_realtime_where_not() {
    let auto = BATCH_ON.replace("batch = true", "batch = \"auto\"");
    for has_batch_api in [true, false] {
        let mut stack =
            common::stack_for("openai", sim_config(Duration::from_millis(300)), |sim| {
                sim.set_batch_api(has_batch_api);
                auto.clone()
            })
            .await;
        // The probe ends once the provider answered either way.
        tokio::time::timeout(Duration::from_secs(20), stack.running.probes.join_next())
            .await
            .expect("the probe answers")
            .expect("one probe for the one provider")
            .expect("the probe ran to its end");
        let all = tasks_on(12, "auto", 3);
        common::publish_many(&stack.js, &all).await;
        let outcomes =
            common::wait_for_one_outcome_each(&stack.js, 12, Duration::from_secs(60)).await;
        let want = if has_batch_api {
            "batch_api"
        } else {
            "realtime"
        };
        for i in 0..12 {
            let o = outcome_of(&outcomes, &format!("auto{i}"));
            assert_eq!(o["status"], "succeeded", "{o}");
            assert_eq!(o["route"], want, "batch API served: {has_batch_api}: {o}");
        }
        assert_eq!(
            billed_lines(&stack.sim),
            if has_batch_api { 12 } else { 0 },
            "batch lines billed"
        );
        assert_eq!(stack.sim.batch_creations() > 0, has_batch_api);
    }
}

/// Priority 2 by batch job with a patience: a job the provider ends in time
/// answers at the discount; one still running when the patience ends is
/// cancelled and its tasks go realtime, each with one outcome, no attempt
/// spent, billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_two_goes_by_batch_job_and_a_job_past_its_patience_is_cancelled_to_realtime() {
    let patient = format!("{BATCH_ON}p2_patience_secs = 2\n");
    let n = 8;
    for (batch, want) in [
        (Duration::from_millis(300), "batch_api"),
        (Duration::from_secs(600), "realtime"),
    ] {
        let stack = common::stack(sim_config(batch), &patient).await;
        common::publish_many(&stack.js, &tasks_on(n, "patient", 2)).await;
        let outcomes =
            common::wait_for_one_outcome_each(&stack.js, n, Duration::from_secs(60)).await;
        for i in 0..n {
            let o = outcome_of(&outcomes, &format!("patient{i}"));
            assert_eq!(o["status"], "succeeded", "{o}");
            assert_eq!(o["route"], want, "{o}");
            assert_eq!(o["attempts"], 1, "{o}");
        }
        assert!(
            stack.sim.batch_creations() >= 1,
            "priority 2 went by batch job first"
        );
        let realtime: u64 = stack.sim.bill().values().map(|b| b.requests).sum();
        let lines = billed_lines(&stack.sim);
        let billed = if want == "batch_api" { (n, 0) } else { (0, n) };
        assert_eq!((lines, realtime), (billed.0 as u64, billed.1 as u64));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_jobs_unanswered_tasks_run_again_and_succeed_without_spending_an_attempt() {
    let stack = common::stack(sim_config(Duration::from_millis(300)), BATCH_ON).await;
    expired_tasks_run_again_without_an_attempt(&stack, tasks_on).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_job_resumes_the_same_job_with_one_creation_and_one_outcome_each() {
    let nats = NatsServer::start().await;
    let sim = common::start_sim(sim_config(Duration::from_secs(4))).await;
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, BATCH_ON).await;
    let n = 25;
    common::publish_many(&js, &tasks_on(n, "job", 3)).await;
    let first = Batchd::start(&path);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sim.batch_creations() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no batch created");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The job is recorded and its tasks acked: nothing waits in JetStream.
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(10)).await;
    let _second = kill_and_restart(first, &js, &path, n).await;
    // One creation per job: every batch the simulator created carries a
    // different job id.
    assert_each_job_created_once(&sim).await;
    // Every job ended: its record is gone from the jobs bucket.
    let jobs = js.get_key_value("batchd-jobs").await.expect("jobs bucket");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        use futures::StreamExt as _;
        let left = jobs.keys().await.expect("keys").count().await;
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} job records left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(billed_lines(&sim), n as u64);
}

/// Every batch the simulator created carries a different job id, and each
/// creation is one of them: no job was submitted twice.
async fn assert_each_job_created_once(sim: &SimServer) {
    let list: Value = reqwest::get(format!("{}/batches?limit=100", sim.base_url()))
        .await
        .expect("list batches")
        .json()
        .await
        .expect("JSON");
    let tags: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|b| b["metadata"]["batchd_job"].as_str())
        .collect();
    let distinct: std::collections::HashSet<&str> = tags.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        tags.len(),
        "a job was submitted twice: {tags:?}"
    );
    assert_eq!(tags.len() as u64, sim.batch_creations());
}

/// The ledger's call records of batch lines: their cost in pico-dollars,
/// and how many there are (each finished).
pub(crate) async fn batch_ledger(js: &async_nats::jetstream::Context) -> (u64, usize) {
    use futures::StreamExt as _;
    let calls = js
        .get_key_value("batchd-calls")
        .await
        .expect("calls bucket");
    let (mut cost, mut recorded) = (0, 0);
    let mut keys = calls.keys().await.expect("keys");
    while let Some(key) = keys.next().await {
        let Some(value) = calls.get(key.expect("key")).await.expect("get") else {
            continue;
        };
        let sheet: Vec<Value> = serde_json::from_slice(&value).expect("a call sheet");
        for record in sheet.iter().filter(|r| r["route"] == "batch_api") {
            assert_eq!(record["state"], "finished", "{record}");
            cost += record["cost_picousd"].as_u64().expect("cost");
            recorded += 1;
        }
    }
    (cost, recorded)
}

/// Kills `first` mid-job (no outcome published yet), starts batchd again on
/// `path` and waits for the `n` tasks' outcomes: each succeeded on the
/// `batch_api` route. The second batchd.
pub(crate) async fn kill_and_restart(
    mut first: Batchd,
    js: &async_nats::jetstream::Context,
    path: &std::path::Path,
    n: usize,
) -> Batchd {
    first.kill();
    assert_eq!(
        common::stream_len(js, "BATCHD_RESULTS").await,
        0,
        "killed mid-job"
    );
    let second = Batchd::start(path);
    let outcomes = common::wait_for_one_outcome_each(js, n, Duration::from_secs(60)).await;
    assert!(outcomes
        .values()
        .all(|l| l[0]["status"] == "succeeded" && l[0]["route"] == "batch_api"));
    second
}

/// A recorded job's task as the engine writes it, for task `id`.
pub(crate) fn recorded_task(id: &str) -> batchd_actors::provider_jobs::JobTask {
    use base64::Engine as _;
    let body = common::task(id, 3);
    let now = chrono::Utc::now();
    batchd_actors::provider_jobs::JobTask {
        task_id: id.to_owned(),
        request: serde_json::json!({"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": format!("document {id}")}], "max_completion_tokens": 20}),
        priority: 3,
        tenant: "acme".into(),
        reply_to: None,
        metadata: None,
        attempts: 0,
        retry_count: 0,
        generation: 0,
        created_at: now,
        published_at: now,
        subject: "batchd.tasks.p3".into(),
        content_type: Some("application/json".into()),
        body_base64: base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&body).expect("json")),
        original: body,
        msgpack: false,
        tier: None,
        tier_reason: None,
        classifier_picousd: 0,
        shares: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_upload_and_create_leaves_no_task_behind_and_creates_each_job_once() {
    use batchd_actors::ports::{BatchApi, JobStore};
    use batchd_actors::provider_jobs::{JobStep, ProviderJob, CHAT_ENDPOINT, JOB_VERSION};
    let nats = NatsServer::start().await;
    let sim = common::start_sim(sim_config(Duration::from_millis(300))).await;
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, BATCH_ON).await;
    let api = batchd::provider::OpenAiBatchApi::new(&sim.base_url(), None, Duration::from_secs(5))
        .expect("client");
    let store = batchd::nats::KvJobs(js.get_key_value("batchd-jobs").await.expect("bucket"));
    // Three runs killed at three points: before the upload, between upload
    // and create, and after create but before the creation was recorded.
    for (name, point) in [("before", 0), ("between", 1), ("after", 2)] {
        let mut job = ProviderJob {
            version: JOB_VERSION,
            id: format!("j_{name}"),
            provider: "openai".into(),
            model: "gpt-4.1-nano".into(),
            endpoint: CHAT_ENDPOINT.into(),
            batch_id: format!("b_{name}"),
            recorded_at: chrono::Utc::now(),
            step: JobStep::Recorded,
            tasks: (0..3)
                .map(|i| recorded_task(&format!("{name}{i}")))
                .collect(),
            cancel_at: None,
            cancelled: false,
        };
        if point >= 1 {
            let input_file_id = api
                .upload("x.jsonl", job.input_file())
                .await
                .expect("upload");
            if point == 2 {
                api.create(
                    &input_file_id,
                    &bytes::Bytes::new(),
                    CHAT_ENDPOINT,
                    "24h",
                    &serde_json::json!({"batchd_job": job.id}),
                )
                .await
                .expect("create");
            }
            job.step = JobStep::Uploaded { input_file_id };
        }
        store.put(&job).await.expect("record the job");
    }
    assert_eq!(store.list().await.expect("list").len(), 3);
    assert_eq!(sim.batch_creations(), 1);
    // `batchd status` lists them from the jobs bucket.
    let config = Config::load(&path).expect("config");
    let status = batchd::client::status::read(&nats.client().await, &config).await;
    let mut steps: Vec<(String, String, usize)> = status
        .provider_jobs
        .expect("jobs bucket read")
        .into_iter()
        .map(|j| (j.id, j.step, j.tasks))
        .collect();
    steps.sort();
    assert_eq!(
        steps,
        [
            ("j_after".into(), "uploaded".into(), 3),
            ("j_before".into(), "recorded".into(), 3),
            ("j_between".into(), "uploaded".into(), 3)
        ]
    );

    let _batchd = Batchd::start(&path);
    let outcomes = common::wait_for_one_outcome_each(&js, 9, Duration::from_secs(60)).await;
    assert!(outcomes
        .values()
        .all(|l| l[0]["status"] == "succeeded" && l[0]["route"] == "batch_api"));
    assert_eq!(
        sim.batch_creations(),
        3,
        "one creation per job: the one created before the kill was found, not repeated"
    );
    assert_eq!(billed_lines(&sim), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_budget_gets_no_batch_job_and_its_tasks_fail_budget_exceeded() {
    let extra = format!("{BATCH_ON}\n[budgets.tenants]\nbroke = {{ daily_usd = 0.0 }}\n");
    let stack = common::stack(sim_config(Duration::from_millis(200)), &extra).await;
    let js = &stack.js;
    let mut all = tasks_on(5, "paid", 3);
    all.extend(tasks_on(5, "broke", 3).into_iter().map(|(s, mut t)| {
        t["tenant"] = "broke".into();
        (s, t)
    }));
    common::publish_many(js, &all).await;
    let outcomes = common::wait_for_one_outcome_each(js, 10, Duration::from_secs(60)).await;
    for i in 0..5 {
        let paid = outcome_of(&outcomes, &format!("paid{i}"));
        assert_eq!(paid["status"], "succeeded", "{paid}");
        assert_eq!(paid["route"], "batch_api");
        let broke = outcome_of(&outcomes, &format!("broke{i}"));
        assert_eq!(broke["status"], "failed", "{broke}");
        assert_eq!(broke["error"]["kind"], "budget_exceeded", "{broke}");
    }
    assert_eq!(
        billed_lines(&stack.sim),
        5,
        "only the tenant within its budget went in a job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_deadline_passes_while_its_job_runs_gets_expired_with_its_billed_cost() {
    // The deadline leaves time to be assembled into a job, not for the job.
    let stack = common::stack(sim_config(Duration::from_secs(5)), BATCH_ON).await;
    let js = &stack.js;
    let mut late = common::task("due0", 3);
    late["route"] = "batch_api".into();
    late["deadline"] = (chrono::Utc::now() + chrono::Duration::milliseconds(2_500))
        .to_rfc3339()
        .into();
    let mut all = tasks_on(3, "free", 3);
    all.push(("batchd.tasks.p3".to_owned(), late));
    common::publish_many(js, &all).await;
    let outcomes = common::wait_for_one_outcome_each(js, 4, Duration::from_secs(60)).await;
    let o = outcome_of(&outcomes, "due0");
    assert_eq!(o["status"], "failed", "{o}");
    assert_eq!(o["error"]["kind"], "expired", "{o}");
    assert_eq!(o["route"], "batch_api");
    for i in 0..3 {
        assert_eq!(
            outcome_of(&outcomes, &format!("free{i}"))["status"],
            "succeeded"
        );
    }
    assert!(common::read_all(js, "BATCHD_DLQ")
        .await
        .contains_key("batchd.dlq.due0"));
    // Its line was answered and billed: its cost is in its outcome, and the
    // outcomes still add up to the bill.
    assert!(o["cost_usd"].as_f64().unwrap() > 0.0, "{o}");
    let config = common::config_with("nats://127.0.0.1:1", &stack.sim.base_url(), BATCH_ON);
    let (billed, lines) = batch_bill(&stack.sim, &config);
    assert_eq!(lines, 4);
    let cost: f64 = outcomes
        .values()
        .map(|l| l[0]["cost_usd"].as_f64().unwrap())
        .sum();
    assert!((cost - batchd_actors::pricing::usd(billed)).abs() <= 4e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_lines_of_a_job_are_sent_once_with_dedupe_on() {
    // One job per model: the batch waits for all its tasks.
    let extra = BATCH_ON.replace(
        "max_wait_ms = 300",
        "max_wait_ms = 1500\nseal_when_drained = false",
    ) + "[dedupe]\nenabled = true\n";
    let stack = common::stack(sim_config(Duration::from_millis(300)), &extra).await;
    let js = &stack.js;
    let mut all = tasks_on(8, "twin", 3);
    for (_, body) in &mut all {
        body["type"] = "summarization".into();
        body["payload"]["text"] = "the same document".into();
    }
    all.extend(tasks_on(4, "solo", 3));
    common::publish_many(js, &all).await;
    let outcomes = common::wait_for_one_outcome_each(js, 12, Duration::from_secs(60)).await;
    let config = common::config_with("nats://127.0.0.1:1", &stack.sim.base_url(), &extra);
    let (billed, lines) = batch_bill(&stack.sim, &config);
    assert_eq!(lines, 5, "one line for the eight twins, one per other task");
    let mut cost = 0.0;
    let mut shared = 0;
    for id in (0..8)
        .map(|i| format!("twin{i}"))
        .chain((0..4).map(|i| format!("solo{i}")))
    {
        let o = outcome_of(&outcomes, &id);
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["route"], "batch_api", "{o}");
        if o["shared_call"] == true {
            shared += 1;
            assert!(id.starts_with("twin"), "{o}");
            assert_eq!(o["cost_usd"], 0.0, "{o}");
            assert_eq!(o["attempts"], 0, "{o}");
            assert!(
                o["call_id"].as_str().is_some_and(|c| c.starts_with("twin")),
                "{o}"
            );
        }
        cost += o["cost_usd"].as_f64().unwrap_or(0.0);
    }
    assert_eq!(shared, 7);
    let diff = (cost - batchd_actors::pricing::usd(billed)).abs();
    assert!(diff <= 5e-12, "outcomes {cost} vs bill {billed}");
}

/// Who holds each provider job's ownership record, by job key.
async fn job_owners(
    js: &async_nats::jetstream::Context,
) -> std::collections::BTreeMap<String, String> {
    use futures::TryStreamExt as _;
    let owners = js
        .get_key_value("batchd-owners")
        .await
        .expect("owners bucket");
    let keys: Vec<String> = owners
        .keys()
        .await
        .expect("keys")
        .try_collect()
        .await
        .expect("keys");
    let mut out = std::collections::BTreeMap::new();
    for key in keys.into_iter().filter(|k| k.starts_with("job.")) {
        if let Some(value) = owners.get(&key).await.expect("get") {
            let record: Value = serde_json::from_slice(&value).expect("record JSON");
            out.insert(key, record["owner"].as_str().expect("owner").to_owned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_drive_each_job_once_and_a_killed_owners_job_is_taken_over() {
    let nats = NatsServer::start().await;
    let sim = common::start_sim(sim_config(Duration::from_secs(5))).await;
    let extra = |name: &str| {
        format!("{BATCH_ON}\n[nats]\nreplica = \"{name}\"\n[dispatch]\nclaim_ttl_secs = 3\n")
    };
    let (_dir_a, path_a, js) = common::binary_setup_with(&nats, &sim, &extra("ra")).await;
    let dir_b = tempfile::tempdir().expect("tempdir");
    let path_b = common::config_file(dir_b.path(), &nats.url(), &sim.base_url(), &extra("rb"));
    let n = 30;
    common::publish_many(&js, &tasks_on(n, "own", 3)).await;
    let mut replicas = [
        ("ra", Batchd::start(&path_a)),
        ("rb", Batchd::start(&path_b)),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sim.batch_creations() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no batch created");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(10)).await;
    // Each job has one owner; kill the owner of the first, mid-job.
    let owners = job_owners(&js).await;
    let victim = owners.values().next().expect("a job owner").clone();
    assert!(
        owners.values().all(|o| o == "ra" || o == "rb"),
        "{owners:?}"
    );
    let (_, killed) = replicas
        .iter_mut()
        .find(|(name, _)| *name == victim)
        .expect("the owner is one of the replicas");
    killed.kill();
    assert_eq!(
        common::stream_len(&js, "BATCHD_RESULTS").await,
        0,
        "killed mid-job"
    );
    // The survivor takes the dead owner's jobs over once their records
    // expire, and finishes them: one outcome each.
    let outcomes = common::wait_for_one_outcome_each(&js, n, Duration::from_secs(60)).await;
    assert!(outcomes
        .values()
        .all(|l| l[0]["status"] == "succeeded" && l[0]["route"] == "batch_api"));
    let survivor = if victim == "ra" { "rb" } else { "ra" };
    let after = job_owners(&js).await;
    for key in owners.keys() {
        assert_eq!(
            after.get(key).map(String::as_str),
            Some(survivor),
            "{key}: taken over by the survivor"
        );
    }
    // Every job created once, every line billed once.
    assert_each_job_created_once(&sim).await;
    assert_eq!(billed_lines(&sim), n as u64);
}
