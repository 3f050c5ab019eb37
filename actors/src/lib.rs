//! # batchd-actors: the engine
//!
//! The actors of batchd (Intake, Assembler, Dispatcher), their messages,
//! their supervisor and the policies they apply, with no NATS or HTTP
//! inside: all I/O goes through the narrow traits of [`ports`], implemented
//! over JetStream and HTTP by the `batchd` crate and in memory by this
//! crate's tests (`tests/support/`).
//!
//! ## Layout
//!
//! - [`task`]: the protocol's task, outcome and dead letter.
//! - [`codec`]: decoding and validating task bodies; encoding outcomes;
//!   the `reply_to` allow-list.
//! - [`completion`]: reading a provider's answer (fuzzed, like [`codec`]).
//! - [`routing`]: task types, tiers, models; the request sent for a task.
//! - [`classifier`]: the optional tier classifier for `auto` tasks (a cheap
//!   model labels the prompt; verdicts cached; its call billed to the task).
//! - [`route_policy`]: realtime or provider batch job, by priority, deadline
//!   and the task's or its type's `route`.
//! - [`batching`], [`backoff`], [`pricing`], [`offpeak`], [`budgets`]: policies
//!   as plain functions (batch size by queue depth; off-peak windows; budgets).
//! - [`clock`]: the injectable wall clock for deadlines and windows.
//! - [`ledger`]: call records, daily totals, the spend budgets are checked
//!   against; [`memory_ledger`]: the ledger store in memory.
//! - [`route`]: route control: adaptive concurrency, rate budget learned from
//!   the provider's headers, circuit breaker, and the [`route::RouteGate`] that admits calls by priority.
//! - [`route_publisher`]: publishes this replica's route state (paused,
//!   circuit open, limits) through [`ports::RouteBoard`], for `batchd status`.
//! - [`prompt_warmth`]: prompt-cache warm-up: per route, the prefixes
//!   warmed, and which task of a group goes first.
//! - [`call_claim`]: the claim across replicas on a task's provider call.
//! - [`peers`]: the other replicas seen, from their heartbeats.
//! - [`ownership`]: ownership records with a TTL (take, renew, take over
//!   when expired) that make exactly one replica hold a key: a task's call,
//!   a checkpoint to resume, a provider job to poll.
//! - [`lease`]: the hold on a JetStream message; nak on drop, heartbeats.
//!   A source delivers an [`lease::Acker`]; the engine builds the lease.
//! - [`ports`]: the I/O traits ([`ports::TaskSource`], [`ports::OutcomeSink`],
//!   [`ports::AttemptStore`], [`ports::RouteBoard`], [`ports::Provider`]).
//! - [`messages`]: every message between actors.
//! - [`context`]: what every actor shares: settings, ports, the lease keeper,
//!   the directory of current actor refs.
//! - [`settings`]: the engine's settings, read from the daemon's config.
//! - [`intake`], [`assembler`], [`dispatcher`], [`retry_scheduler`]: the actors
//!   of the pipeline; [`retry_scheduler::classify`] says what a failed call means.
//! - [`cost_accountant`]: the ledger of spend per day, tenant, model,
//!   priority and route, each billed call counted once.
//! - [`batch_control`]: the batches the Dispatcher drives, with their pause
//!   flags and progress (what a checkpoint records).
//! - [`preemption_monitor`]: preempts bulk batches while priority 1 waits at
//!   their route, and resumes them in order once it is quiet.
//! - [`recovery`]: checkpoints left by a process that died, read at start;
//!   the redelivered tasks of a preempted batch rejoin it under its id.
//! - [`targets`]: service targets per priority and how close each is to its own.
//! - [`supervisor`]: one-for-one restarts with an intensity limit.
//! - [`engine`]: start, fault injection, shutdown.
//! - [`outcome`]: making outcomes durable before acking.
//! - [`provider_jobs`]: the `batch_api` route: provider batch jobs recorded
//!   in the [`ports::JobStore`] before their tasks are acked, driven through
//!   [`ports::BatchApi`], resumed after a restart.
//! - [`metrics`]: every metric name, once, and the functions that record them.
//!
//! A task's path: consumer → Intake (decode, validate, route) → Assembler
//! (batch by route and priority) → Dispatcher (provider call per task) →
//! outcome (and dead letter) with PubAck → ack.

pub mod assembler;
pub mod backoff;
pub mod batch_control;
pub mod batching;
pub mod budgets;
pub mod call_claim;
pub mod call_sheets;
pub mod classifier;
pub mod clock;
pub mod codec;
pub mod completion;
pub mod context;
pub mod cost_accountant;
pub mod dedupe;
pub mod dispatcher;
pub mod engine;
pub mod intake;
pub mod lease;
pub mod ledger;
pub mod memory_ledger;
pub mod messages;
pub mod metrics;
pub mod offpeak;
pub mod outcome;
pub mod ownership;
pub mod peers;
pub mod ports;
pub mod preemption_monitor;
pub mod pricing;
pub mod prompt_warmth;
pub mod provider_jobs;
pub mod recovery;
pub mod retry_scheduler;
pub mod route;
pub mod route_policy;
pub mod route_publisher;
pub mod routing;
pub mod settings;
pub mod supervisor;
pub mod targets;
pub mod task;

pub use engine::{Engine, EngineError};
