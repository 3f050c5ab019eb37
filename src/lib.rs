//! # batchd
//!
//! A self-hosted engine that takes LLM tasks from NATS JetStream subjects per
//! priority, batches them, sends them to OpenAI-compatible providers, and
//! publishes exactly one outcome per task. The engine itself (actors,
//! policies) lives in the `batchd-actors` crate; this crate is the daemon
//! around it.
//!
//! ## Layout
//!
//! - [`config`]: the typed configuration, defaults merged with the user's file.
//! - [`nats`]: connection (version check), streams, consumers, buckets; the
//!   engine's task source and outcome sink over JetStream.
//! - [`provider`]: OpenAI-compatible Chat Completions over HTTP; an instant provider.
//! - [`telemetry`]: logging and the Prometheus `/metrics` endpoint.
//! - [`app`]: wiring for `batchd run`.
//! - [`sim`]: `batchd sim`, a simulated OpenAI-compatible provider.
//! - [`demo`], [`submit`], [`bench`]: the other commands; [`local_nats`]: a private nats-server for them.
//! - [`report`]: collecting outcomes and rendering summary tables.

pub mod app;
pub mod bench;
pub mod config;
pub mod demo;
pub mod local_nats;
pub mod nats;
pub mod provider;
pub mod report;
pub mod sim;
pub mod submit;
pub mod telemetry;
