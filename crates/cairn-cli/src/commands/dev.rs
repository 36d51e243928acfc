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

pub async fn dev(log: &LogConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cairn_runtime::init_logging(log)?;
    let aggregator_config: progress_aggregator::Config = service_config("progress-aggregator")?;
    let ingress_config: ingress::Config = service_config("ingress")?;
    let processor_config: request_processor::Config = service_config("request-processor")?;
    let trimmer_config: stream_trimmer::Config = service_config("stream-trimmer")?;
    let aggregator =
        progress_aggregator::App::build(aggregator_config).await.context("progress-aggregator")?;
    let ingress = ingress::App::build(ingress_config).await.context("ingress")?;
    let processor = request_processor::App::build(processor_config).await.context("request-processor")?;
    let trimmer = stream_trimmer::App::build(trimmer_config).await.context("stream-trimmer")?;
    info!(
        ingress = %ingress.local_addr(),
        aggregator_grpc = %aggregator.grpc_addr(),
        aggregator_admin = %aggregator.admin_addr(),
        processor_admin = %processor.admin_addr(),
        trimmer_admin = %trimmer.admin_addr(),
        "cairn dev: every service runs in this process; ctrl-c stops them"
    );
    let (a, i, p, t) = tokio::join!(
        aggregator.run(shutdown.clone()),
        ingress.run(shutdown.clone()),
        processor.run(shutdown.clone()),
        trimmer.run(shutdown.clone())
    );
    a.context("progress-aggregator")?;
    i.context("ingress")?;
    p.context("request-processor")?;
    t.context("stream-trimmer")
}
