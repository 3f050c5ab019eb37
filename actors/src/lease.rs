//! Leases: the engine's hold on one JetStream message. A lease is acked only
//! after the task's outcome has a PubAck. A lease dropped without an ack (an
//! actor crashed, a mailbox was dropped, a send failed) naks its message so
//! JetStream redelivers it at once: nothing that matters lives only in memory.
//! The [`LeaseKeeper`] tells JetStream that held messages are still being
//! worked on, so a slow batch is not redelivered behind its back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

/// Errors talking to the message's server.
#[derive(Debug, thiserror::Error)]
#[error("acknowledging message: {0}")]
pub struct AckError(pub String);

/// The acknowledgement side of one message (implemented over JetStream in `src/`).
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// The task is finished: remove it from the work queue.
    async fn ack(&self) -> Result<(), AckError>;
    /// Redeliver, after `delay` when given.
    async fn nak(&self, delay: Option<Duration>) -> Result<(), AckError>;
    /// Still working: restart the ack-wait timer.
    async fn in_progress(&self) -> Result<(), AckError>;
}

struct LeaseInner {
    acker: Box<dyn Acker>,
    settled: AtomicBool,
}

/// An exclusive hold on one delivered message.
pub struct Lease {
    inner: Arc<LeaseInner>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Lease {
    /// Wraps an acker; `keeper` (if any) keeps the message alive while held.
    pub fn new(acker: Box<dyn Acker>, keeper: Option<&LeaseKeeper>) -> Lease {
        let inner = Arc::new(LeaseInner {
            acker,
            settled: AtomicBool::new(false),
        });
        if let Some(k) = keeper {
            k.track(&inner);
        }
        Lease { inner }
    }

    /// Acks the message. Call only once its outcome is durable.
    pub async fn ack(self) -> Result<(), AckError> {
        self.inner.settled.store(true, Ordering::Release);
        self.inner.acker.ack().await
    }

    /// Hands the message back for redelivery after `delay`.
    pub async fn nak(self, delay: Option<Duration>) -> Result<(), AckError> {
        self.inner.settled.store(true, Ordering::Release);
        self.inner.acker.nak(delay).await
    }

    /// Leaves the message to JetStream's ack-wait redelivery without a nak
    /// (used when the server is unreachable anyway).
    pub fn abandon(self) {
        self.inner.settled.store(true, Ordering::Release);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.inner.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropped unsettled: give the message back now rather than after ack_wait.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            handle.spawn(async move {
                if let Err(e) = inner.acker.nak(None).await {
                    tracing::debug!(error = %e, "nak of a dropped lease failed; ack_wait will redeliver");
                }
            });
        }
    }
}

/// Sends "in progress" for every held lease on an interval.
#[derive(Clone, Default)]
pub struct LeaseKeeper {
    held: Arc<Mutex<Vec<Weak<LeaseInner>>>>,
}

impl LeaseKeeper {
    fn track(&self, inner: &Arc<LeaseInner>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.push(Arc::downgrade(inner));
    }

    /// Number of leases currently held.
    pub fn held(&self) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().filter(|w| w.strong_count() > 0).count()
    }

    /// One sweep: forget settled leases, heartbeat the rest.
    pub async fn sweep(&self) {
        let live: Vec<Arc<LeaseInner>> = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.retain(|w| {
                w.upgrade()
                    .is_some_and(|l| !l.settled.load(Ordering::Acquire))
            });
            held.iter().filter_map(Weak::upgrade).collect()
        };
        for lease in live {
            if let Err(e) = lease.acker.in_progress().await {
                tracing::debug!(error = %e, "lease heartbeat failed");
            }
        }
    }

    /// Runs sweeps every `every` until the returned task is aborted.
    pub fn spawn(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let keeper = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                keeper.sweep().await;
            }
        })
    }
}
