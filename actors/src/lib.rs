//! # batchd-actors: the engine
//!
//! The six actors of batchd, their messages, their supervisor and the
//! policies they apply, with no NATS or HTTP inside: all I/O goes through the
//! narrow traits of [`ports`], implemented over JetStream and HTTP by the
//! `batchd` crate and in memory by this crate's tests.
//!
//! ## Layout
//!
//! - [`task`]: the protocol's task, outcome and dead letter.
//! - [`codec`]: decoding and validating task bodies; encoding outcomes.
//! - [`routing`]: task types, tiers, models; the request sent for a task.
//! - [`batching`], [`backoff`], [`ratelimit`], [`pricing`]: policies as plain functions.
//! - [`route`]: route control per provider and model: adaptive concurrency,
//!   rate budget learned from the provider's headers, circuit breaker, and
//!   [`route::RouteGate`], which admits calls by priority.
//! - [`lease`]: the hold on a JetStream message; nak on drop, heartbeats.
//! - [`ports`]: the I/O traits ([`ports::TaskSource`], [`ports::OutcomeSink`], [`ports::Provider`]).
//! - [`messages`]: every message between actors.
//! - [`intake`], [`assembler`], [`dispatcher`]: the actors of the pipeline.
//! - [`supervisor`]: one-for-one restarts with an intensity limit.
//! - [`engine`]: start, fault injection, shutdown.
//! - [`outcome`]: making outcomes durable before acking.
//! - [`metrics`]: every metric name, once.
//!
//! A task's path: consumer → Intake (decode, validate, route) → Assembler
//! (batch by route and priority) → Dispatcher (provider call per task) →
//! outcome (and dead letter) with PubAck → ack.

pub mod assembler;
pub mod backoff;
pub mod batching;
pub mod codec;
pub mod context;
pub mod dispatcher;
pub mod engine;
pub mod intake;
pub mod lease;
pub mod messages;
pub mod metrics;
pub mod outcome;
pub mod ports;
pub mod pricing;
pub mod ratelimit;
pub mod route;
pub mod routing;
pub mod settings;
pub mod supervisor;
pub mod task;

pub use engine::{Engine, EngineError};
