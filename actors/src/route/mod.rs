//! Route control: how calls on one route (provider and model) are admitted.
//!
//! Plain policies, each free of I/O and tested on its own, and the gate that
//! combines them:
//!
//! - [`limits`]: the provider's rate-limit headers read into values, safely.
//! - [`concurrency`]: the adaptive limit on calls in flight (AIMD).
//! - [`budget`]: requests and tokens per minute, configured or learned, and
//!   the pause after a 429; a plain value that can be stored.
//! - [`circuit`]: the circuit breaker, with one probe at a time.
//! - [`gate`]: [`RouteGate`], the async admission point, by priority.
//! - [`board`]: what a replica publishes about its routes, and when.

pub mod board;
pub mod budget;
pub mod circuit;
pub mod concurrency;
pub mod gate;
pub mod limits;

#[cfg(test)]
mod tests;

pub use board::{
    heartbeat_key, route_key, BoardSchedule, ReplicaHeartbeat, RouteCondition, RouteState,
};
pub use budget::{Charge, RateBudget};
pub use circuit::{
    CircuitAdmission, CircuitBreaker, CircuitReason, CircuitSettings, CircuitSnapshot, CircuitState,
};
pub use concurrency::{AdaptiveConcurrency, Backoff, ConcurrencySettings};
pub use gate::{CallReport, Permit, Report, RouteGate, RouteSettings, RouteSnapshot, RouteStatus};
pub use limits::{parse_rate_limit_headers, parse_reset, LimitReading, RateLimitInfo};
