//! `batchd sim`: the simulated OpenAI-compatible provider (see [`crate::sim`]).

pub use crate::sim::SimArgs;

/// Runs `batchd sim`.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    crate::sim::run(args).await
}
