//! The engine's settings: the part of the config the actors read.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::RetryPolicy;
use crate::batching::BatchPolicy;
use crate::pricing::PriceTable;
use crate::routing::Catalog;
use crate::task::Priority;

/// One-for-one restart limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed inside the window before the engine shuts down.
    pub max_restarts: u32,
    /// The window, in seconds.
    pub within_secs: u64,
}

/// Everything the actors need to know.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Task types, tiers and served models.
    pub catalog: Catalog,
    /// Batch sealing per priority, indexed by [`Priority::index`].
    pub batching: [BatchPolicy; 3],
    /// Attempts and backoff.
    pub retry: RetryPolicy,
    /// Prices.
    pub prices: PriceTable,
    /// Largest accepted task body.
    pub max_payload_bytes: usize,
    /// Concurrent provider requests per route (provider, model).
    pub route_concurrency: usize,
    /// Of those, how many only priority-1 tasks may use, so premium work
    /// never queues behind a full route of bulk work.
    pub p1_reserved: usize,
    /// Provider request timeout.
    pub request_timeout: Duration,
    /// How long one task waits out 429s in place before being handed back.
    pub rate_limit_patience: Duration,
    /// Longest Retry-After honoured in place.
    pub max_retry_after: Duration,
    /// How long to keep retrying a failed outcome publish before handing the task back.
    pub publish_retry: Duration,
    /// Heartbeat interval for held messages (a third of ack_wait is safe).
    pub lease_heartbeat: Duration,
    /// How often queue depth is sampled.
    pub backlog_interval: Duration,
    /// Supervisor restart limits.
    pub restart: RestartPolicy,
    /// Seed for retry jitter.
    pub seed: u64,
}

impl EngineSettings {
    /// The batch policy of one priority.
    pub fn batch_policy(&self, p: Priority) -> &BatchPolicy {
        &self.batching[p.index()]
    }
}
