//! Supervision against real parts: actors made to panic mid-stream are
//! restarted, the restarts are counted in /metrics, and every task still
//! gets exactly one outcome.

use crate::common;

use std::time::Duration;

use batchd_actors::messages::ActorKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_actors_are_restarted_and_every_task_gets_exactly_one_outcome() {
    let handle = batchd::telemetry::recorder().unwrap();
    let stack = common::stack(common::sim_latency(Duration::from_millis(15)), "").await;
    let js = &stack.js;
    let n = 2000;
    common::publish_many(js, &common::tasks(n, "a")).await;

    let mut threshold = 200;
    for kind in ActorKind::ALL {
        while common::stream_len(js, "BATCHD_RESULTS").await < threshold {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stack.running.engine.inject_fault(kind);
        threshold += 300;
    }
    let outcomes = common::wait_for_one_outcome_each(js, n, Duration::from_secs(120)).await;
    for (subject, list) in &outcomes {
        assert_eq!(list[0]["status"], "succeeded", "{subject}");
    }
    common::wait_until_empty(js, "BATCHD_TASKS", Duration::from_secs(30)).await;
    assert!(stack.running.engine.is_running());

    let text = batchd::telemetry::render(&handle);
    for actor in ActorKind::ALL.map(ActorKind::name) {
        let line = format!("batchd_actor_restarts_total{{actor=\"{actor}\"}} 1");
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
    stack.running.engine.shutdown().await;
}
