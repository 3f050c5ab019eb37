//! `batchd demo`.

/// Arguments of `batchd demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {}

/// Runs `batchd demo`.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
