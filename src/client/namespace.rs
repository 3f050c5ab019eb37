//! Private namespaces on a shared NATS server: a subject prefix, streams,
//! consumers and buckets all named after one token, so a demo or benchmark
//! run shares nothing with the server's other users; [`remove`] deletes what
//! such a run created.

use async_nats::jetstream;

use crate::config::NatsConfig;

/// Names derived from one prefix: subjects `<prefix>.*`, streams
/// `<PREFIX>_TASKS|RESULTS|DLQ`, buckets `<prefix>-checkpoints|ledger|attempts|routes`,
/// consumers `<prefix>-p<N>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    prefix: String,
}

impl Namespace {
    /// The namespace `prefix` (a valid subject token and stream name).
    pub fn new(prefix: impl Into<String>) -> Namespace {
        Namespace {
            prefix: prefix.into(),
        }
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The name of the stream that holds `what` (`TASKS`, `RESULTS`, `DLQ`).
    pub fn stream(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix.to_ascii_uppercase())
    }

    /// The name of the bucket that holds `what` (`checkpoints`, `ledger`,
    /// `attempts`, `routes`).
    pub fn bucket(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// Points every name of `nats` into this namespace.
    pub fn apply(&self, nats: &mut NatsConfig) {
        nats.subject_prefix = self.prefix.clone();
        nats.tasks_stream = self.stream("TASKS");
        nats.results_stream = self.stream("RESULTS");
        nats.dlq_stream = self.stream("DLQ");
        nats.checkpoints_bucket = self.bucket("checkpoints");
        nats.jobs_bucket = self.bucket("jobs");
        nats.ledger_bucket = self.bucket("ledger");
        nats.calls_bucket = self.bucket("calls");
        nats.attempts_bucket = self.bucket("attempts");
        nats.routes_bucket = self.bucket("routes");
        nats.owners_bucket = self.bucket("owners");
        nats.consumer_prefix = self.prefix.clone();
    }
}

/// Streams or buckets that could not be deleted, with the reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not delete {}", .0.join("; "))]
pub struct CleanupError(pub Vec<String>);

/// Deletes the streams and buckets `nats` names (their consumers go with them).
pub async fn remove(js: &jetstream::Context, nats: &NatsConfig) -> Result<(), CleanupError> {
    let mut failed = Vec::new();
    for stream in [&nats.tasks_stream, &nats.results_stream, &nats.dlq_stream] {
        if let Err(e) = js.delete_stream(stream).await {
            failed.push(format!("stream {stream}: {e}"));
        }
    }
    for bucket in [
        &nats.checkpoints_bucket,
        &nats.jobs_bucket,
        &nats.ledger_bucket,
        &nats.calls_bucket,
        &nats.attempts_bucket,
        &nats.routes_bucket,
        &nats.owners_bucket,
    ] {
        if let Err(e) = js.delete_key_value(bucket).await {
            failed.push(format!("bucket {bucket}: {e}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CleanupError(failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_moves_into_the_namespace() {
        let mut nats = crate::config::Config::defaults().unwrap().nats;
        Namespace::new("bench01abc").apply(&mut nats);
        assert_eq!(nats.subject_prefix, "bench01abc");
        assert_eq!(nats.tasks_stream, "BENCH01ABC_TASKS");
        assert_eq!(nats.results_stream, "BENCH01ABC_RESULTS");
        assert_eq!(nats.dlq_stream, "BENCH01ABC_DLQ");
        assert_eq!(nats.checkpoints_bucket, "bench01abc-checkpoints");
        assert_eq!(nats.ledger_bucket, "bench01abc-ledger");
        assert_eq!(nats.attempts_bucket, "bench01abc-attempts");
        assert_eq!(nats.routes_bucket, "bench01abc-routes");
        assert_eq!(nats.owners_bucket, "bench01abc-owners");
        assert_eq!(nats.consumer_prefix, "bench01abc");
    }
}
