use anyhow::Context;
use progress_aggregator::{App, Config};

#[derive(clap::Parser)]
#[command(
    name = "progress-aggregator",
    version,
    about = "Applies progress updates and serves the tree over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Exits 0 when the local admin port answers /healthz (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = cairn_runtime::parse_args();
    if let Some(Command::Healthcheck) = cli.command {
        let url = format!("http://127.0.0.1:{}/healthz", cli.config.admin_addr.port());
        return cairn_runtime::healthcheck(&url).await;
    }
    cairn_runtime::init_logging(&cli.config.log)?;
    let app = App::build(cli.config).await.context("cannot start progress-aggregator")?;
    app.run(cairn_runtime::shutdown_token()).await
}
