//! (f) Reading a large parent: `GET /status/{parent}?depth=2&limit=100` on a parent with
//! `--read-children` children, through an in-process ingress in front of an in-process
//! aggregator (reqwest with keep-alive, one request at a time), then the same read as a gRPC
//! `Get` straight to the aggregator and as a `ProgressStore::get` straight to Redis, so the
//! cost of each layer shows.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use cairn_progress::Update;
use cairn_progress::now_ms;
use cairn_proto::v1::GetRequest;
use cairn_proto::v1::progress_client::ProgressClient;
use cairn_redis::progress::{Change, ReadOptions};
use cairn_testkit::{AmqpVhost, RedisNamespace};
use clap::Parser as _;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::{Aggregator, Args, key, percentile_ms, store};

const PARENT: &str = "_bench.f.p";
const DEPTH: u32 = 2;
const LIMIT: u32 = 100;
const BUILD_BATCH: u64 = 2_000;

pub(super) async fn measure(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let store = store(&ns)?;
    eprintln!("cairn-bench: (f) building a parent with {} children", args.read_children);
    let time_ms = now_ms();
    let mut start = 0;
    while start < args.read_children {
        let end = (start + BUILD_BATCH).min(args.read_children);
        let changes = (start..end)
            .map(|i| {
                let update = Update::new().progress((i % 100) as f64 / 100.0).status("running");
                Ok(Change { key: key(&format!("{PARENT}.c{i}"))?, update, time_ms })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store.apply(&changes).await?;
        start = end;
    }

    let aggregator = Aggregator::start(&ns, &vhost, args).await?;
    aggregator.wait_ready().await?;
    let config = ingress::Config::try_parse_from([
        "ingress".to_owned(),
        "--addr=127.0.0.1:0".to_owned(),
        "--admin-addr=127.0.0.1:0".to_owned(),
        format!("--aggregator-url=http://{}", aggregator.grpc),
    ])
    .context("ingress flags")?;
    let ingress = ingress::App::build(config).await.context("building the ingress")?;
    let rest_url = format!("http://{}/status/{PARENT}?depth={DEPTH}&limit={LIMIT}", ingress.local_addr());
    let stop_ingress = CancellationToken::new();
    let ingress_task = tokio::spawn(ingress.run(stop_ingress.clone()));

    let expected = args.read_children.min(u64::from(LIMIT)) as usize;
    let http = reqwest::Client::new();
    let body: Value = http.get(&rest_url).send().await?.error_for_status()?.json().await?;
    let tasks = body["tasks"].as_array().map_or(0, Vec::len);
    ensure!(tasks == expected, "GET {rest_url} answered {tasks} tasks, expected {expected}");
    eprintln!("cairn-bench: (f) timing {} reads per interface", args.reads);
    let (http, url) = (&http, &rest_url);
    let rest = time_reads(args, move || async move {
        let response = http.get(url).send().await?.error_for_status()?;
        response.bytes().await?;
        Ok(())
    })
    .await?;

    let channel = Endpoint::from_shared(format!("http://{}", aggregator.grpc))?.connect().await?;
    let client = ProgressClient::new(channel);
    let request = GetRequest { key: PARENT.into(), depth: DEPTH, limit: LIMIT, after: String::new() };
    let (client, request) = (&client, &request);
    let grpc = time_reads(args, move || async move {
        let node =
            client.clone().get(request.clone()).await?.into_inner().node.context("Get answered no node")?;
        ensure!(node.tasks.len() == expected, "Get answered {} tasks, expected {expected}", node.tasks.len());
        Ok(())
    })
    .await?;

    let parent = key(PARENT)?;
    let options = ReadOptions { depth: DEPTH, limit: LIMIT, after: None };
    let (store, parent, options) = (&store, &parent, &options);
    let direct = time_reads(args, move || async move {
        store.get(parent, options).await?.context("the parent is missing")?;
        Ok(())
    })
    .await?;

    stop_ingress.cancel();
    ingress_task.await.context("ingress task panicked")??;
    aggregator.stop().await?;
    eprintln!(
        "cairn-bench: (f) p50 REST {} ms, gRPC {} ms, store {} ms",
        percentile_ms(&rest, 0.5),
        percentile_ms(&grpc, 0.5),
        percentile_ms(&direct, 0.5)
    );
    let mut out = Map::new();
    out.insert("f_rest_get_depth2_p50_ms".into(), json!(percentile_ms(&rest, 0.5)));
    out.insert("f_rest_p90_ms".into(), json!(percentile_ms(&rest, 0.9)));
    out.insert("f_rest_p99_ms".into(), json!(percentile_ms(&rest, 0.99)));
    out.insert("f_grpc_get_p50_ms".into(), json!(percentile_ms(&grpc, 0.5)));
    out.insert("f_grpc_p90_ms".into(), json!(percentile_ms(&grpc, 0.9)));
    out.insert("f_grpc_p99_ms".into(), json!(percentile_ms(&grpc, 0.99)));
    out.insert("f_store_get_p50_ms".into(), json!(percentile_ms(&direct, 0.5)));
    out.insert("f_store_p99_ms".into(), json!(percentile_ms(&direct, 0.99)));
    out.insert("f_rest_body_bytes".into(), json!(body.to_string().len()));
    out.insert("f_reads".into(), json!({"rest": rest.len(), "grpc": grpc.len(), "store": direct.len()}));
    Ok(out)
}

/// `--read-warmup` untimed reads, then `--reads` timed ones, one at a time, stopping early once
/// `--read-budget-seconds` have passed; sorted latencies.
async fn time_reads<F, Fut>(args: &Args, mut read: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    for _ in 0..args.read_warmup {
        read().await?;
    }
    let budget = Duration::from_secs_f64(args.read_budget_seconds);
    let mut latencies = Vec::with_capacity(usize::try_from(args.reads)?);
    let timing = Instant::now();
    for _ in 0..args.reads {
        if timing.elapsed() > budget {
            eprintln!("cairn-bench: (f) read budget of {budget:?} spent after {} reads", latencies.len());
            break;
        }
        let started = Instant::now();
        read().await?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(latencies)
}
