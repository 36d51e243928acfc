//! The `main` every service binary shares: flags and `CAIRN_*` variables (a bad value names its
//! variable), the `healthcheck` subcommand that distroless containers use instead of curl,
//! logging and traces (flushed at exit), and a run until SIGTERM or SIGINT.

use std::future::Future;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::LogConfig;

#[derive(Parser)]
#[command(version)]
struct ServiceCli<C: Args> {
    #[command(subcommand)]
    command: Option<ServiceCommand>,
    #[command(flatten)]
    config: C,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Exits 0 when this service's own port answers /healthz (for container health checks).
    Healthcheck,
}

/// What a service binary is: its name, what it does, where its `/healthz` is, and how it runs.
pub struct ServiceMain<C> {
    pub name: &'static str,
    pub about: &'static str,
    /// The local port serving `/healthz`.
    pub health_port: fn(&C) -> u16,
    pub log: fn(&C) -> &LogConfig,
}

impl<C: Args + FromArgMatches> ServiceMain<C> {
    /// Parses the command line; answers `healthcheck`, or sets up logging and runs the service
    /// until SIGTERM/SIGINT cancels the token it is given.
    pub async fn run<F, Fut>(self, run: F) -> anyhow::Result<()>
    where
        F: FnOnce(C, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let command = ServiceCli::<C>::command().name(self.name).bin_name(self.name).about(self.about);
        let cli: ServiceCli<C> = crate::args::parse_args_with(command);
        if let Some(ServiceCommand::Healthcheck) = cli.command {
            let url = format!("http://127.0.0.1:{}/healthz", (self.health_port)(&cli.config));
            return crate::healthcheck(&url).await;
        }
        let telemetry = crate::init_telemetry((self.log)(&cli.config), &[self.name])?;
        let result = run(cli.config, crate::shutdown_token()).await;
        // Exporting the last spans blocks; keep it off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        result
    }
}
