//! The `cairn` command. `cairn dev` runs every service in one process for development; each
//! service reads the same `CAIRN_*` variables it reads when deployed on its own.

use anyhow::Context;
use cairn_runtime::LogConfig;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(clap::Parser)]
#[command(name = "cairn", version, about = "Cairn: durable requests with live, hierarchical progress")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run every service in this one process (ingress on :8080, aggregator gRPC on :50051,
    /// a request processor).
    /// Each service is configured by its usual CAIRN_* variables.
    Dev {
        #[command(flatten)]
        log: LogConfig,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = cairn_runtime::parse_args();
    match cli.command {
        Command::Dev { log } => dev(&log, cairn_runtime::shutdown_token()).await,
    }
}

/// Each service parses only its environment here: `cairn dev` takes no service flags.
fn service_config<T: clap::Parser>(name: &str) -> anyhow::Result<T> {
    cairn_runtime::try_parse_from::<T, _, _>([name]).map_err(|message| anyhow::anyhow!("{name}: {message}"))
}

async fn dev(log: &LogConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cairn_runtime::init_logging(log)?;
    let aggregator_config: progress_aggregator::Config = service_config("progress-aggregator")?;
    let ingress_config: ingress::Config = service_config("ingress")?;
    let aggregator =
        progress_aggregator::App::build(aggregator_config).await.context("progress-aggregator")?;
    let ingress = ingress::App::build(ingress_config).await.context("ingress")?;
    info!(
        ingress = %ingress.local_addr(),
        aggregator_grpc = %aggregator.grpc_addr(),
        aggregator_admin = %aggregator.admin_addr(),
        "cairn dev: every service runs in this process; ctrl-c stops them"
    );
    let (a, i) = tokio::join!(aggregator.run(shutdown.clone()), ingress.run(shutdown.clone()));
    a.context("progress-aggregator")?;
    i.context("ingress")
}
