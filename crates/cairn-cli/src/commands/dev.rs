//! `cairn dev`: every service in this one process, for development; each service reads the same
//! `CAIRN_*` variables it reads when deployed on its own.

use anyhow::Context;
use cairn_runtime::LogConfig;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Each service parses only its environment here: `cairn dev` takes no service flags.
fn service_config<T: clap::Parser>(name: &str) -> anyhow::Result<T> {
    cairn_runtime::try_parse_from::<T, _, _>([name]).map_err(|message| anyhow::anyhow!("{name}: {message}"))
}

/// The services, in the order their traces are set up (spans of shared crates go to the first).
const SERVICES: [&str; 4] = ["ingress", "request-processor", "progress-aggregator", "stream-trimmer"];

pub async fn dev(log: &LogConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // One process, four `service.name`s: each service's spans are exported under its own.
    let telemetry = cairn_runtime::init_telemetry(log, &SERVICES)?;
    let result = run(shutdown).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

async fn run(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut aggregator_config: progress_aggregator::Config = service_config("progress-aggregator")?;
    let mut ingress_config: ingress::Config = service_config("ingress")?;
    let mut processor_config: request_processor::Config = service_config("request-processor")?;
    let mut trimmer_config: stream_trimmer::Config = service_config("stream-trimmer")?;
    // A development stack is for this machine: every listener on 127.0.0.1 unless its variable
    // says otherwise (deployed services default to all interfaces, as containers need).
    loopback_unless_set(&mut ingress_config.addr, "CAIRN_INGRESS_ADDR");
    loopback_unless_set(&mut ingress_config.admin_addr, "CAIRN_INGRESS_ADMIN_ADDR");
    loopback_unless_set(&mut aggregator_config.grpc_addr, "CAIRN_AGGREGATOR_GRPC_ADDR");
    loopback_unless_set(&mut aggregator_config.admin_addr, "CAIRN_AGGREGATOR_ADMIN_ADDR");
    loopback_unless_set(&mut processor_config.admin_addr, "CAIRN_PROCESSOR_ADMIN_ADDR");
    loopback_unless_set(&mut trimmer_config.admin_addr, "CAIRN_TRIMMER_ADMIN_ADDR");
    let aggregator =
        progress_aggregator::App::build(aggregator_config).await.context("progress-aggregator")?;
    let ingress = ingress::App::build(ingress_config).await.context("ingress")?;
    let processor = request_processor::App::build(processor_config).await.context("request-processor")?;
    let trimmer = stream_trimmer::App::build(trimmer_config).await.context("stream-trimmer")?;
    info!(
        ingress = %ingress.local_addr(),
        ingress_admin = %ingress.admin_addr(),
        aggregator_grpc = %aggregator.grpc_addr(),
        aggregator_admin = %aggregator.admin_addr(),
        processor_admin = %processor.admin_addr(),
        trimmer_admin = %trimmer.admin_addr(),
        "cairn dev: every service runs in this process; ctrl-c stops them"
    );
    // One service ending (an error, or a panic) stops the others: a half-running stack would
    // only confuse.
    let stop = shutdown.child_token();
    let mut services = tokio::task::JoinSet::new();
    let service = |name: &'static str, run: futures::future::BoxFuture<'static, anyhow::Result<()>>| {
        let stop = stop.clone();
        async move {
            let result = run.await.context(name);
            stop.cancel();
            result
        }
    };
    services.spawn(service("progress-aggregator", Box::pin(aggregator.run(stop.clone()))));
    services.spawn(service("ingress", Box::pin(ingress.run(stop.clone()))));
    services.spawn(service("request-processor", Box::pin(processor.run(stop.clone()))));
    services.spawn(service("stream-trimmer", Box::pin(trimmer.run(stop.clone()))));
    let mut first_error = None;
    while let Some(joined) = services.join_next().await {
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
