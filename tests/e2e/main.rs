//! End-to-end tests against a real `nats-server` and the simulated provider
//! over HTTP, one module per area, in one test binary (one link instead of
//! one per file).

mod common;

mod actor_restart;
mod anthropic;
mod anthropic_batches;
mod bad_input;
mod batch_api;
mod bench;
mod chaos;
mod checkpoints;
mod cli;
mod cost;
mod demo;
mod dlq;
mod e2e_flow;
mod examples;
mod faults;
mod health;
mod lanes;
mod nats_harness;
mod ops;
mod replicas;
mod route_control;
mod scheduling;
mod security;
mod service_tiers;
mod sim;
mod sim_batches;
mod sim_message_batches;
mod stack;
mod status;
mod submit;
mod tier_classifier;
