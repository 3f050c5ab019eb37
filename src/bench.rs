//! `batchd bench`.

/// Arguments of `batchd bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {}

/// Runs `batchd bench`.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
