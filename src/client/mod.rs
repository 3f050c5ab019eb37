//! The producer/consumer side of the protocol, shared by every command and
//! the end-to-end tests: [`Subjects`] spells every subject once; a
//! [`Publisher`] publishes with a bounded window of PubAcks and sorts
//! refusals into [`PublishError`]s; the readers in [`read`] decode outcomes
//! and dead letters in either encoding; a [`Namespace`] keeps a run private
//! on a shared server and [`namespace::remove`] cleans up after it.

pub mod namespace;
pub mod publish;
pub mod read;
pub mod subjects;

pub use namespace::Namespace;
pub use publish::{Ack, Outgoing, PublishError, PublishFailure, Published, Publisher};
pub use read::{decode, decode_message, DecodeError, OutcomeSubscription, ReadError};
pub use subjects::Subjects;
