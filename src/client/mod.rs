//! The producer/consumer side of the protocol, shared by every command and
//! the end-to-end tests: [`Subjects`] spells every subject once; a
//! [`Publisher`] publishes with a bounded window of PubAcks and sorts
//! refusals into [`PublishError`]s; the readers in [`read`] decode outcomes
//! and dead letters in either encoding; [`DeadLetters`] lists, replays and
//! purges dead letters; a [`Namespace`] keeps a run private on a shared
//! server and [`namespace::remove`] cleans up after it.

pub mod dead_letters;
pub mod namespace;
pub mod publish;
pub mod read;
pub mod status;
pub mod subjects;

pub use dead_letters::DeadLetters;
pub use namespace::Namespace;
pub use publish::{Ack, Outgoing, PublishError, PublishFailure, Published, Publisher};
pub use read::{decode, decode_message, DecodeError, OutcomeSubscription, ReadError};
pub use subjects::Subjects;

#[cfg(test)]
pub(crate) mod fixtures {
    //! Outcomes for unit tests.

    use batchd_actors::task::{ErrorKind, Outcome, RouteKind, Status, TaskError, Timings, Usage};

    /// An outcome of `status` with every field set.
    pub(crate) fn outcome(status: Status) -> Outcome {
        Outcome {
            task_id: "a".into(),
            status,
            output: (status == Status::Succeeded).then(|| "hi".into()),
            finish_reason: Some("stop".into()),
            error: (status == Status::Failed)
                .then(|| TaskError::new(ErrorKind::InvalidRequest, "model \"x\" is not served")),
            model: Some("gpt-4.1-nano".into()),
            provider: Some("openai".into()),
            route: Some(RouteKind::Realtime),
            service_tier: None,
            tier: None,
            tier_reason: None,
            classifier_cost_usd: None,
            shared_call: false,
            call_id: None,
            usage: Usage {
                input_tokens: 10,
                cached_input_tokens: 4,
                output_tokens: 3,
                ..Usage::default()
            },
            cost_usd: 0.5,
            attempts: 2,
            batch_id: Some("b_1".into()),
            priority: 3,
            tenant: "default".into(),
            timings: Timings::default(),
            metadata: None,
            generation: 0,
            completed_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }
}
