//! `grpcgate demo` (placeholder; being written).

/// Options of `grpcgate demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Seconds of load to drive through the proxy.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

/// Runs the demo.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
