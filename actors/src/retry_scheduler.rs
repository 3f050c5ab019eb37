//! # RetryScheduler
//!
//! Owns the decision after a failed provider call ([`classify`], a plain
//! function) and the timers of tasks waiting to be tried again. A task that
//! failed transiently is held here, its lease heartbeated and its claim kept,
//! for an exponential backoff with full jitter; when due it goes back to the
//! Assembler, not through JetStream, so the wait costs no redelivery.
//!
//! Receives: [`RetryMsg`]. Sends: due tasks to the Assembler.
//!
//! On restart: the timers die with the old state; their tasks' leases nak on
//! drop and JetStream redelivers them at once. The attempts they spent are
//! in the attempt store, so the restart spends none.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::backoff::RetryPolicy;
use crate::context::EngineContext;
use crate::messages::{Accepted, AssemblerMsg, RetryMsg};
use crate::ports::ProviderError;

/// Why a route cannot serve any task right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteFault {
    /// 401 or 403: the key is refused.
    Unauthorized,
    /// 404: the configured model is unknown to the provider.
    ModelNotFound,
    /// 429 `insufficient_quota`: the account is out of credit.
    QuotaExhausted,
}

/// What a failed call means for its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A transient failure (5xx, 408/409, timeout, connection error) with
    /// attempts left: spend one, wait the backoff, try again.
    Retry,
    /// A transient failure and no attempts left: `max_retries`.
    Exhausted,
    /// 429 rate limit: the route pauses; the task waits at the route and
    /// spends no attempt.
    RateLimited,
    /// The route is unusable for every task: its circuit opens; the task
    /// waits for it to close and spends no attempt.
    RouteDown(RouteFault),
    /// The request itself is refused: `provider_rejected` and a dead letter.
    Permanent,
    /// A flex call refused for want of flex capacity: no attempt, no pause;
    /// the task falls back to the default tier or a batch job at once.
    FlexUnavailable,
}

/// Classifies a failed call of a task that has spent `attempts` (this call
/// included, had it counted).
pub fn classify(error: &ProviderError, attempts: u32, policy: &RetryPolicy) -> Verdict {
    match error {
        ProviderError::RateLimited { .. } => Verdict::RateLimited,
        ProviderError::FlexUnavailable { .. } => Verdict::FlexUnavailable,
        ProviderError::QuotaExhausted { .. } => Verdict::RouteDown(RouteFault::QuotaExhausted),
        ProviderError::Rejected { status, .. } => match status {
            401 | 403 => Verdict::RouteDown(RouteFault::Unauthorized),
            404 => Verdict::RouteDown(RouteFault::ModelNotFound),
            _ => Verdict::Permanent,
        },
        ProviderError::Transient { .. } | ProviderError::Timeout { .. }
            if policy.exhausted(attempts) =>
        {
            Verdict::Exhausted
        }
        ProviderError::Transient { .. } | ProviderError::Timeout { .. } => Verdict::Retry,
    }
}

/// The RetryScheduler actor.
pub struct RetryScheduler;

/// Timers of one incarnation; aborted (their tasks naked) when it goes away.
#[derive(Default)]
pub struct Timers(Vec<JoinHandle<()>>);

impl Drop for Timers {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// The RetryScheduler's state.
pub struct RetryState {
    ctx: Arc<EngineContext>,
    timers: Timers,
}

impl Actor for RetryScheduler {
    type Msg = RetryMsg;
    type State = RetryState;
    type Arguments = Arc<EngineContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<RetryMsg>,
        ctx: Arc<EngineContext>,
    ) -> Result<RetryState, ActorProcessingErr> {
        Ok(RetryState {
            ctx,
            timers: Timers::default(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RetryMsg>,
        msg: RetryMsg,
        state: &mut RetryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RetryMsg::Schedule { task, delay } => state.schedule(*task, delay),
            RetryMsg::Release(reply) => {
                // Aborting the timers drops their tasks: each lease naks.
                state.timers = Timers::default();
                let _ = reply.send(());
            }
            RetryMsg::InjectFault => panic!("fault injected into the retry scheduler"),
        }
        Ok(())
    }
}

impl RetryState {
    fn schedule(&mut self, task: Accepted, delay: Duration) {
        if self.ctx.is_stopping() {
            return; // dropped: its lease naks, JetStream keeps it for the next run
        }
        self.timers.0.retain(|h| !h.is_finished());
        let ctx = self.ctx.clone();
        self.timers.0.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            match ctx.directory.assembler() {
                // On a failed send the task is dropped: naked, redelivered.
                Some(a) => {
                    let _ = a.cast(AssemblerMsg::Task(Box::new(task)));
                }
                None => drop(task),
            }
        }));
    }

    /// Tasks waiting for their retry.
    pub fn waiting(&self) -> usize {
        self.timers.0.iter().filter(|h| !h.is_finished()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            base_delay_ms: 100,
            max_delay_ms: 1_000,
        }
    }

    fn transient(status: Option<u16>) -> ProviderError {
        ProviderError::Transient {
            status,
            message: "x".into(),
        }
    }

    fn rejected(status: u16) -> ProviderError {
        ProviderError::Rejected {
            status,
            message: "x".into(),
        }
    }

    #[test]
    fn transient_failures_retry_until_attempts_run_out() {
        for status in [None, Some(500), Some(503), Some(408), Some(409)] {
            assert_eq!(classify(&transient(status), 1, &policy()), Verdict::Retry);
            assert_eq!(classify(&transient(status), 2, &policy()), Verdict::Retry);
            assert_eq!(
                classify(&transient(status), 3, &policy()),
                Verdict::Exhausted
            );
        }
    }

    #[test]
    fn timeouts_retry_like_other_transient_failures() {
        let e = ProviderError::Timeout {
            message: "no answer within 1s".into(),
        };
        assert_eq!(classify(&e, 1, &policy()), Verdict::Retry);
        assert_eq!(classify(&e, 3, &policy()), Verdict::Exhausted);
    }

    #[test]
    fn rate_limits_never_spend_attempts() {
        let e = ProviderError::RateLimited {
            limits: Default::default(),
            message: "slow down".into(),
        };
        assert_eq!(classify(&e, 99, &policy()), Verdict::RateLimited);
    }

    #[test]
    fn route_level_refusals_open_the_circuit_instead_of_failing_tasks() {
        assert_eq!(
            classify(&rejected(401), 1, &policy()),
            Verdict::RouteDown(RouteFault::Unauthorized)
        );
        assert_eq!(
            classify(&rejected(403), 1, &policy()),
            Verdict::RouteDown(RouteFault::Unauthorized)
        );
        assert_eq!(
            classify(&rejected(404), 1, &policy()),
            Verdict::RouteDown(RouteFault::ModelNotFound)
        );
        let quota = ProviderError::QuotaExhausted {
            message: "You exceeded your current quota".into(),
        };
        assert_eq!(
            classify(&quota, 99, &policy()),
            Verdict::RouteDown(RouteFault::QuotaExhausted)
        );
    }

    #[test]
    fn other_client_errors_are_permanent_for_their_task_only() {
        for status in [400, 413, 422] {
            assert_eq!(
                classify(&rejected(status), 1, &policy()),
                Verdict::Permanent
            );
        }
    }
}
