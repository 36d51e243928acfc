//! `cairn dev`: every service in this one process, for development; each service reads the same
//! `CAIRN_*` variables it reads when deployed on its own.

use anyhow::Context;
use cairn_runtime::LogConfig;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::Service;

/// Each service parses only its environment here: `cairn dev` takes no service flags.
fn service_config<T: clap::Parser>(name: &str) -> anyhow::Result<T> {
    cairn_runtime::try_parse_from::<T, _, _>([name]).map_err(|message| anyhow::anyhow!("{name}: {message}"))
}

/// The services, in the order their traces are set up (spans of shared crates go to the first).
const SERVICES: [(Service, &str); 4] = [
    (Service::Ingress, "ingress"),
    (Service::RequestProcessor, "request-processor"),
    (Service::ProgressAggregator, "progress-aggregator"),
    (Service::StreamTrimmer, "stream-trimmer"),
];

pub async fn dev(log: &LogConfig, only: &[Service], shutdown: CancellationToken) -> anyhow::Result<()> {
    let runs = |service: Service| only.is_empty() || only.contains(&service);
    // One process, a `service.name` per service it runs: each service's spans go under its own.
    let names: Vec<&str> = SERVICES.iter().filter(|(s, _)| runs(*s)).map(|(_, name)| *name).collect();
    let telemetry = cairn_runtime::init_telemetry(log, &names)?;
    let result = run(only, shutdown).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

async fn run(only: &[Service], shutdown: CancellationToken) -> anyhow::Result<()> {
    let runs = |service: Service| only.is_empty() || only.contains(&service);
    // One service ending (an error, or a panic) stops the others: a half-running stack would
    // only confuse.
    let stop = shutdown.child_token();
    let mut services: Vec<(&'static str, BoxFuture<'static, anyhow::Result<()>>)> = Vec::new();
    // A development stack is for this machine: every listener on 127.0.0.1 unless its variable
    // says otherwise (deployed services default to all interfaces, as containers need).
    // Each service is built (and binds its ports) before any starts, so a taken port fails fast.
    if runs(Service::ProgressAggregator) {
        let mut config: progress_aggregator::Config = service_config("progress-aggregator")?;
        loopback_unless_set(&mut config.grpc_addr, "CAIRN_AGGREGATOR_GRPC_ADDR");
        loopback_unless_set(&mut config.admin_addr, "CAIRN_AGGREGATOR_ADMIN_ADDR");
        let app = progress_aggregator::App::build(config).await.context("progress-aggregator")?;
        info!(grpc = %app.grpc_addr(), admin = %app.admin_addr(), "cairn dev: progress-aggregator");
        services.push(("progress-aggregator", Box::pin(app.run(stop.clone()))));
    }
    if runs(Service::Ingress) {
        let mut config: ingress::Config = service_config("ingress")?;
        loopback_unless_set(&mut config.addr, "CAIRN_INGRESS_ADDR");
        loopback_unless_set(&mut config.admin_addr, "CAIRN_INGRESS_ADMIN_ADDR");
        let app = ingress::App::build(config).await.context("ingress")?;
        info!(addr = %app.local_addr(), admin = %app.admin_addr(), "cairn dev: ingress");
        services.push(("ingress", Box::pin(app.run(stop.clone()))));
    }
    if runs(Service::RequestProcessor) {
        let mut config: request_processor::Config = service_config("request-processor")?;
        loopback_unless_set(&mut config.admin_addr, "CAIRN_PROCESSOR_ADMIN_ADDR");
        let app = request_processor::App::build(config).await.context("request-processor")?;
        info!(admin = %app.admin_addr(), "cairn dev: request-processor");
        services.push(("request-processor", Box::pin(app.run(stop.clone()))));
    }
    if runs(Service::StreamTrimmer) {
        let mut config: stream_trimmer::Config = service_config("stream-trimmer")?;
        loopback_unless_set(&mut config.admin_addr, "CAIRN_TRIMMER_ADMIN_ADDR");
        let app = stream_trimmer::App::build(config).await.context("stream-trimmer")?;
        info!(admin = %app.admin_addr(), "cairn dev: stream-trimmer");
        services.push(("stream-trimmer", Box::pin(app.run(stop.clone()))));
    }
    info!(services = services.len(), "cairn dev: running in this process; ctrl-c stops them");
    let mut running = tokio::task::JoinSet::new();
    for (name, run) in services {
        let stop = stop.clone();
        running.spawn(async move {
            let result = run.await.context(name);
            stop.cancel();
            result
        });
    }
    let mut first_error = None;
    while let Some(joined) = running.join_next().await {
        let result = joined.unwrap_or_else(|panic| Err(anyhow::anyhow!("a service panicked: {panic}")));
        if !shutdown.is_cancelled() && first_error.is_none() {
            tracing::error!("a service stopped; stopping the others");
        }
        stop.cancel();
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        Some(error) => Err(error),
        None if shutdown.is_cancelled() => Ok(()),
        None => Err(anyhow::anyhow!("a service stopped by itself")),
    }
}

fn loopback_unless_set(addr: &mut std::net::SocketAddr, variable: &str) {
    if std::env::var_os(variable).is_none() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
}
