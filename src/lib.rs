//! # batchd
//!
//! A self-hosted engine that takes LLM tasks from NATS JetStream subjects per
//! priority, batches them, sends them to OpenAI-compatible and Anthropic
//! providers, and publishes exactly one outcome per task. The engine itself (actors,
//! policies) lives in the `batchd-actors` crate; this crate is the daemon
//! around it.
//!
//! ## Layout
//!
//! Adapters: the engine's ports over real I/O.
//! - [`nats`]: connection (version check), streams, consumers, buckets; the
//!   engine's task source, outcome sink, attempt store and route board over
//!   JetStream.
//! - [`provider`]: OpenAI-compatible Chat Completions and Anthropic Messages
//!   over HTTP; an instant provider.
//! - [`anthropic`]: the Anthropic Messages API's bodies, shared with the sim.
//! - [`ledger`]: the cost ledger (call records, daily totals) over JetStream KV.
//! - [`lanes`]: tenant lanes, pulled in turn beside each priority's subject.
//!
//! Wiring: what starts and observes the engine.
//! - [`config`]: the typed configuration, defaults merged with the user's file.
//! - [`app`]: connect, create the topology, build the ports, start the engine.
//! - [`telemetry`]: logging and the Prometheus `/metrics` endpoint.
//! - [`secrets`]: redacting URLs and scrubbing secrets from messages.
//!
//! The producer/consumer side, shared by every command and the tests.
//! - [`client`]: subjects, publishing with PubAcks, reading outcomes and
//!   dead letters, private namespaces and cleanup, what `batchd status` reads.
//! - [`report`]: outcome reports and the plain-text tables of every summary.
//! - [`local_nats`]: a private `nats-server` for the demo and the benchmark.
//!
//! Commands: [`cmd`], one module per subcommand (`run`, `demo`, `submit`, `dlq`,
//! `status`, `cost`, `bench`, `sim`), each a thin layer over the above; [`sim`] is the
//! simulated OpenAI-compatible provider behind `batchd sim`, the demo and
//! the tests.

pub mod anthropic;
pub mod app;
pub mod client;
pub mod cmd;
pub mod config;
pub mod lanes;
pub mod ledger;
pub mod local_nats;
pub mod nats;
pub mod ownership;
pub mod provider;
pub mod report;
pub mod secrets;
pub mod sim;
pub mod telemetry;
