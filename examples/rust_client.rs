//! A batchd producer and consumer in Rust with nothing but async-nats:
//! publish tasks with `Nats-Msg-Id` and wait for each PubAck, then read each
//! task's one outcome from `batchd.results.<task_id>` (docs/PROTOCOL.md).
//!
//! ```sh
//! cargo run --example rust_client -- nats://127.0.0.1:4222 10
//! ```

use std::time::Duration;

use async_nats::jetstream;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let n: usize = args.next().map_or(Ok(10), |s| s.parse())?;
    let js = jetstream::new(async_nats::connect(&url).await?);

    // Producer.
    let run = std::process::id();
    let mut ids = Vec::new();
    for i in 0..n {
        let priority = i % 3 + 1;
        let task_id = format!("rs_{run}_{i}");
        let task = serde_json::json!({
            "task_id": task_id,
            "type": "classification",
            "payload": {"text": format!("Ticket {i}: the invoice is wrong"), "options": {"labels": "billing,bug,other"}},
            "priority": priority,
            "tenant": "rust-example",
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", task_id.as_str());
        headers.insert("Content-Type", "application/json");
        js.publish_with_headers(
            format!("batchd.tasks.p{priority}"),
            headers,
            serde_json::to_vec(&task)?.into(),
        )
        .await?
        .await?; // the PubAck: batchd now owes this task exactly one outcome
        ids.push(task_id);
    }
    println!("published {} tasks", ids.len());

    // Consumer: the outcome is the last message on the task's result subject.
    let results = js.get_stream("BATCHD_RESULTS").await?;
    let mut failed = 0;
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let outcome: serde_json::Value = loop {
            match results
                .get_last_raw_message_by_subject(&format!("batchd.results.{id}"))
                .await
            {
                Ok(msg) => break serde_json::from_slice(&msg.payload)?,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(format!("{id}: no outcome: {e}").into()),
            }
        };
        if outcome["status"] != "succeeded" {
            failed += 1;
        }
        println!("{id}: {} model={}", outcome["status"], outcome["model"]);
    }
    println!("{} succeeded, {failed} failed", ids.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
