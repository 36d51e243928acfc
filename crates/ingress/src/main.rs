use anyhow::Context;
use clap::Parser;
use ingress::{App, Config};

#[derive(Parser)]
#[command(name = "ingress", version, about = "Cairn's public REST API")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Exits 0 when the local HTTP port answers /healthz (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck) = cli.command {
        let url = format!("http://127.0.0.1:{}/healthz", cli.config.addr.port());
        return cairn_runtime::healthcheck(&url).await;
    }
    cairn_runtime::init_logging(&cli.config.log)?;
    let app = App::build(cli.config).await.context("cannot start ingress")?;
    app.run(cairn_runtime::shutdown_token()).await
}
