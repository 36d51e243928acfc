use anyhow::Context;
use stream_trimmer::{App, Config};

#[derive(clap::Parser)]
#[command(
    name = "stream-trimmer",
    version,
    about = "Keeps Cairn's Redis bounded: safe stream trimming and retention of finished work"
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
    let app = App::build(cli.config).await.context("cannot start stream-trimmer")?;
    app.run(cairn_runtime::shutdown_token()).await
}
