//! The `batch_api` route through Anthropic's Message Batches, end to end
//! with a real nats-server and the simulator over HTTP: priority-3 `claude`
//! tasks of a provider of `kind = "anthropic"` with `batch = true` go in
//! Message Batches; each gets one outcome at the batch discount, equal to
//! the simulator's batch bill and to the ledger; an errored request fails
//! its task only; an expired request's task runs again without spending an
//! attempt; a SIGKILL mid-job resumes the recorded batch, never a new one.

use std::time::Duration;

use batchd::sim::SimServer;
use serde_json::Value;

use crate::batch_api::{
    billed_lines, bulk_goes_through_batches_at_the_discount,
    expired_tasks_run_again_without_an_attempt, kill_and_restart, sim_config,
};
use crate::common;
use common::binary::Batchd;
use common::nats::NatsServer;

const CLAUDE: &str = "claude-3-5-haiku-latest";

/// The Anthropic provider on the simulator, with batch jobs on, assembled
/// and polled fast enough for a test.
fn claude_batches(sim: &SimServer) -> String {
    format!(
        r#"
[providers.anthropic]
base_url = "{}"
base_url_env = "BATCHD_TEST_UNSET"
api_key_env = "BATCHD_TEST_UNSET"
api_key = "sk-ant-test"
batch = true
[batching.batch_api]
max_wait_ms = 300
poll_initial_ms = 50
poll_max_ms = 200
"#,
        sim.anthropic_base_url()
    )
}

/// `n` tasks `<prefix><i>` for Claude on `priority`.
fn claude_tasks(n: usize, prefix: &str, priority: u8) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            let mut task = common::task(&format!("{prefix}{i}"), priority);
            task["model"] = CLAUDE.into();
            (format!("batchd.tasks.p{priority}"), task)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_p3_tasks_go_through_message_batches_with_one_discounted_outcome_each_equal_to_the_bill(
) {
    let stack = common::stack_for(
        "openai",
        sim_config(Duration::from_millis(400)),
        claude_batches,
    )
    .await;
    let config = common::config_with(
        "nats://127.0.0.1:1",
        &stack.sim.base_url(),
        &claude_batches(&stack.sim),
    );
    bulk_goes_through_batches_at_the_discount(&stack, &config, claude_tasks, "anthropic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_batchs_tasks_run_again_and_succeed_without_spending_an_attempt() {
    let stack = common::stack_for(
        "openai",
        sim_config(Duration::from_millis(300)),
        claude_batches,
    )
    .await;
    expired_tasks_run_again_without_an_attempt(&stack, claude_tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_message_batch_resumes_the_recorded_batch_with_one_creation() {
    let nats = NatsServer::start().await;
    let sim = common::start_sim(sim_config(Duration::from_secs(4))).await;
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, &claude_batches(&sim)).await;
    let n = 12;
    common::publish_many(&js, &claude_tasks(n, "cjob", 3)).await;
    let first = Batchd::start(&path);
    // The job is recorded and its tasks acked: nothing waits in JetStream.
    common::wait_until_empty(&js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    // The creation is recorded right after it: wait for the record's step.
    let jobs = js.get_key_value("batchd-jobs").await.expect("jobs bucket");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        use batchd_actors::ports::JobStore as _;
        let store = batchd::nats::KvJobs(jobs.clone());
        let listed = store.list().await.expect("list");
        if !listed.is_empty()
            && listed.iter().all(|j| {
                matches!(
                    j.step,
                    batchd_actors::provider_jobs::JobStep::Created { .. }
                )
            })
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no batch created");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let created = sim.batch_creations();
    let _second = kill_and_restart(first, &js, &path, n).await;
    assert_eq!(
        sim.batch_creations(),
        created,
        "the recorded batch was resumed, not created again"
    );
    assert_eq!(billed_lines(&sim), n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_creation_and_its_record_creates_the_batch_again_and_each_task_gets_one_outcome(
) {
    use batchd_actors::ports::{BatchApi, JobStore};
    use batchd_actors::provider_jobs::{JobStep, ProviderJob, CHAT_ENDPOINT, JOB_VERSION};
    let nats = NatsServer::start().await;
    let sim = common::start_sim(sim_config(Duration::from_millis(300))).await;
    let (_dir, path, js) = common::binary_setup_with(&nats, &sim, &claude_batches(&sim)).await;
    let api = batchd::provider::AnthropicBatchApi::new(
        &sim.anthropic_base_url(),
        Some("sk-ant-test".into()),
        Duration::from_secs(5),
    )
    .expect("client");
    let store = batchd::nats::KvJobs(js.get_key_value("batchd-jobs").await.expect("bucket"));
    // The job as a run killed right after its creation leaves it: at the
    // `uploaded` step (Anthropic uploads nothing), its batch created.
    let tasks = (0..3)
        .map(|i| {
            let mut t = crate::batch_api::recorded_task(&format!("cgap{i}"));
            t.request["model"] = CLAUDE.into();
            t
        })
        .collect();
    let job = ProviderJob {
        version: JOB_VERSION,
        id: "j_gap".into(),
        provider: "anthropic".into(),
        model: CLAUDE.into(),
        endpoint: CHAT_ENDPOINT.into(),
        batch_id: "b_gap".into(),
        recorded_at: chrono::Utc::now(),
        step: JobStep::Uploaded {
            input_file_id: "inline".into(),
        },
        tasks,
        cancel_at: None,
        cancelled: false,
    };
    api.create(
        "inline",
        &job.input_file(),
        CHAT_ENDPOINT,
        "24h",
        &serde_json::Value::Null,
    )
    .await
    .expect("create");
    store.put(&job).await.expect("record the job");

    let _batchd = Batchd::start(&path);
    let outcomes = common::wait_for_one_outcome_each(&js, 3, Duration::from_secs(60)).await;
    assert!(outcomes
        .values()
        .all(|l| l[0]["status"] == "succeeded" && l[0]["route"] == "batch_api"));
    // A Message Batch carries no tag to find it by: the job is created
    // again, and the first batch is left unread.
    assert_eq!(sim.batch_creations(), 2);
}
