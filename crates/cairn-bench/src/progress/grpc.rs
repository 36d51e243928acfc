//! (d) gRPC `Update` from concurrent callers: `--grpc-callers` tasks share `--grpc-channels`
//! HTTP/2 connections to one in-process aggregator and call `Update` back to back for
//! `--grpc-seconds`, each on keys of its own subtree of a depth-4 tree
//! (`_bench.d{c%4}.t{c}.b{..}.l{..}`). Calls that finish after the deadline are not counted.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use cairn_proto::map_to_struct;
use cairn_proto::v1::UpdateRequest;
use cairn_proto::v1::progress_client::ProgressClient;
use cairn_testkit::{AmqpVhost, RedisNamespace};
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use super::{Aggregator, Args, percentile_ms, round};
use crate::system::{Probe, us_per_item};

/// Time given to every caller to be spawned before the clock starts.
const START_DELAY: Duration = Duration::from_millis(100);

pub(super) async fn measure(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let aggregator = Aggregator::start(&ns, &vhost, args).await?;
    aggregator.wait_ready().await?;
    let url = format!("http://{}", aggregator.grpc);
    let mut clients = Vec::new();
    for _ in 0..args.grpc_channels {
        // One `connect` per channel: each is its own HTTP/2 connection.
        let channel =
            Endpoint::from_shared(url.clone())?.connect().await.context("connecting to the aggregator")?;
        let mut client = ProgressClient::new(channel);
        update(&mut client, "_bench.warmup".into(), 0.5).await.context("warm-up Update call")?;
        clients.push(client);
    }

    eprintln!(
        "cairn-bench: (d) {} callers over {} channels for {} s",
        args.grpc_callers,
        clients.len(),
        args.grpc_seconds
    );
    let mut probe = Probe::new(&ns.url).await?;
    let before = probe.sample().await?;
    let start = tokio::time::Instant::now() + START_DELAY;
    let deadline = start + Duration::from_secs_f64(args.grpc_seconds);
    let mut callers = JoinSet::new();
    for caller in 0..args.grpc_callers {
        let mut client = clients[(caller % args.grpc_channels) as usize].clone();
        callers.spawn(async move {
            tokio::time::sleep_until(start).await;
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            let mut k = 0u64;
            while tokio::time::Instant::now() < deadline {
                let key = format!("_bench.d{}.t{caller}.b{}.l{}", caller % 4, k / 100 % 100, k % 100);
                let sent = Instant::now();
                let result = update(&mut client, key, (k % 100) as f64 / 100.0).await;
                let took = sent.elapsed();
                if tokio::time::Instant::now() <= deadline {
                    match result {
                        Ok(()) => latencies.push(took),
                        Err(_) => errors += 1,
                    }
                }
                k += 1;
            }
            (latencies, errors)
        });
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while let Some(joined) = callers.join_next().await {
        let (mine, failed) = joined.context("a gRPC caller panicked")?;
        latencies.extend(mine);
        errors += failed;
    }
    let after = probe.sample().await?;
    aggregator.stop().await?;
    latencies.sort_unstable();
    let elapsed = deadline.duration_since(start).as_secs_f64();
    let per_s = round(latencies.len() as f64 / elapsed, 0);
    eprintln!("cairn-bench: (d) {per_s} Update calls/s, {errors} errors");

    let mut out = Map::new();
    out.insert("d_grpc_updates_per_s".into(), json!(per_s));
    out.insert("d_p50_ms".into(), json!(percentile_ms(&latencies, 0.5)));
    out.insert("d_p99_ms".into(), json!(percentile_ms(&latencies, 0.99)));
    out.insert("d_calls".into(), json!(latencies.len()));
    out.insert("d_errors".into(), json!(errors));
    let cpu = after.since(&before);
    out.insert("d_cpu_us_per_call".into(), us_per_item(&cpu, latencies.len() as u64));
    out.insert("d_cpu".into(), cpu);
    Ok(out)
}

async fn update(client: &mut ProgressClient<Channel>, key: String, progress: f64) -> anyhow::Result<()> {
    let mut fields = Map::new();
    fields.insert("progress".into(), json!(progress));
    client.update(UpdateRequest { key, fields: Some(map_to_struct(&fields)) }).await?;
    Ok(())
}
