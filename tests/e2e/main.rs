//! End-to-end tests against a real `nats-server` and the simulated provider
//! over HTTP, one module per area, in one test binary (one link instead of
//! one per file).

mod common;

mod actor_restart;
mod bad_input;
mod cli;
mod demo;
mod e2e_flow;
mod faults;
mod nats_harness;
mod security;
mod sim;
mod submit;
