//! `batchd submit`.

/// Arguments of `batchd submit`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {}

/// Runs `batchd submit`.
pub async fn run(_args: SubmitArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
