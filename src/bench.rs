//! `trstream bench` (placeholder replaced below).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}
pub async fn run(_: BenchArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
