//! The `cairn` command. `cairn dev` runs every service in one process for development; each
//! service reads the same `CAIRN_*` variables it reads when deployed on its own. `cairn streams`
//! shows the registered Redis streams and their consumer groups.

use anyhow::Context;
use cairn_redis::RedisConfig;
use cairn_redis::streams::{StreamInfo, Streams};
use cairn_runtime::LogConfig;
use tokio_util::sync::CancellationToken;
use tracing::info;

cairn_runtime::global_allocator!();

#[derive(clap::Parser)]
#[command(name = "cairn", version, about = "Cairn: durable requests with live, hierarchical progress")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run every service in this one process (ingress on :8080, aggregator gRPC on :50051,
    /// a request processor, the stream trimmer with its admin port on :9093).
    /// Each service is configured by its usual CAIRN_* variables.
    Dev {
        #[command(flatten)]
        log: LogConfig,
    },
    /// Show every registered stream: length, first and last entry id, and each consumer
    /// group's lag (entries not yet delivered) and pending count (delivered, not acknowledged).
    Streams {
        #[command(flatten)]
        redis: RedisConfig,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = cairn_runtime::parse_args();
    match cli.command {
        Command::Dev { log } => dev(&log, cairn_runtime::shutdown_token()).await,
        Command::Streams { redis } => streams(&redis).await,
    }
}

/// Each service parses only its environment here: `cairn dev` takes no service flags.
fn service_config<T: clap::Parser>(name: &str) -> anyhow::Result<T> {
    cairn_runtime::try_parse_from::<T, _, _>([name]).map_err(|message| anyhow::anyhow!("{name}: {message}"))
}

async fn dev(log: &LogConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cairn_runtime::init_logging(log)?;
    let mut aggregator_config: progress_aggregator::Config = service_config("progress-aggregator")?;
    let mut ingress_config: ingress::Config = service_config("ingress")?;
    let mut processor_config: request_processor::Config = service_config("request-processor")?;
    let mut trimmer_config: stream_trimmer::Config = service_config("stream-trimmer")?;
    // A development stack is for this machine: every listener on 127.0.0.1 unless its variable
    // says otherwise (deployed services default to all interfaces, as containers need).
    loopback_unless_set(&mut ingress_config.addr, "CAIRN_INGRESS_ADDR");
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

async fn streams(redis: &RedisConfig) -> anyhow::Result<()> {
    let conn = redis.manager().context("invalid CAIRN_REDIS_URL")?;
    let streams = Streams::new(conn, redis.prefix.clone());
    let keys = streams.registered().await.with_context(|| {
        format!(
            "cannot read the stream registry {} at {}",
            streams.registry(),
            cairn_runtime::redact_url(&redis.url)
        )
    })?;
    let mut found = Vec::with_capacity(keys.len());
    for key in &keys {
        match streams.info(key).await.with_context(|| format!("cannot read stream {key}"))? {
            Some(info) => found.push(info),
            None => eprintln!("{key}: registered but gone (the trimmer unregisters it at its next run)"),
        }
    }
    if found.is_empty() {
        println!("no streams registered under prefix {:?} ({})", redis.prefix, streams.registry());
        return Ok(());
    }
    print!("{}", table(&redis.prefix, &found));
    Ok(())
}

/// One row per consumer group (a stream without groups gets one row with `-`); the stream's
/// columns are shown on its first row only.
fn table(prefix: &str, streams: &[StreamInfo]) -> String {
    let header = ["STREAM", "LENGTH", "FIRST", "LAST", "GROUP", "LAG", "PENDING"].map(str::to_owned);
    let mut rows = vec![header];
    for info in streams {
        let name = info.key.strip_prefix(prefix).and_then(|k| k.strip_prefix(':')).unwrap_or(&info.key);
        let id = |id: &Option<String>| id.clone().unwrap_or_else(|| "-".to_owned());
        let stream = [name.to_owned(), info.length.to_string(), id(&info.first), id(&info.last)];
        let groups: Vec<[String; 3]> = if info.groups.is_empty() {
            vec![["-", "-", "-"].map(str::to_owned)]
        } else {
            let lag = |lag: Option<u64>| lag.map_or_else(|| "?".to_owned(), |lag| lag.to_string());
            info.groups.iter().map(|g| [g.name.clone(), lag(g.lag), g.pending.to_string()]).collect()
        };
        for (i, [group, lag, pending]) in groups.into_iter().enumerate() {
            let [a, b, c, d] = if i == 0 { stream.clone() } else { Default::default() };
            rows.push([a, b, c, d, group, lag, pending]);
        }
    }
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use cairn_redis::streams::GroupState;

    use super::*;

    fn group(name: &str, lag: Option<u64>, pending: u64) -> GroupState {
        GroupState {
            name: name.into(),
            consumers: 1,
            pending,
            last_delivered: "1-0".into(),
            oldest_pending: None,
            lag,
        }
    }

    #[test]
    fn table_has_a_row_per_group() {
        let streams = [
            StreamInfo {
                key: "cairn:requests".into(),
                length: 12,
                first: Some("1-0".into()),
                last: Some("9-3".into()),
                groups: vec![group("processors", Some(4), 2), group("audit", None, 0)],
            },
            StreamInfo { key: "cairn:replies:a".into(), length: 0, first: None, last: None, groups: vec![] },
        ];
        let text = table("cairn", &streams);
        let expected = "\
STREAM     LENGTH  FIRST  LAST  GROUP       LAG  PENDING
requests   12      1-0    9-3   processors  4    2
                                audit       ?    0
replies:a  0       -      -     -           -    -
";
        assert_eq!(text, expected);
    }
}
